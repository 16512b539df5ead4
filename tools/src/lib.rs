//! Husk's host-side tools: the `husk` CLI and the benchmark harness.

pub mod vm;
