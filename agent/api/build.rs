//! Generates the protobuf messages and the async ttrpc service from
//! `proto/agent.proto` with ttrpc-codegen (pure Rust: no protoc needed).

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-changed=proto/agent.proto");
    Codegen::new()
        .out_dir(&out)
        .inputs(["proto/agent.proto"])
        .include("proto")
        .rust_protobuf()
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("generating the agent API from proto/agent.proto");
    // The generated files open with inner attributes (`#![allow(...)]`),
    // which `include!` cannot take inside a module: drop them; lib.rs puts
    // the equivalent outer attributes on the modules.
    for f in ["agent.rs", "agent_ttrpc.rs"] {
        let p = out.join(f);
        let text = std::fs::read_to_string(&p).expect("reading generated code");
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("#![") && !l.starts_with("//!"))
            .collect();
        std::fs::write(&p, kept.join("\n")).expect("writing generated code");
    }
}
