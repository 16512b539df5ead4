//! The control interface for the shim: a line-oriented JSON socket and a ready
//! signal.
//!
//! - [`request`]: the protocol, parsed once into a typed [`request::Request`];
//!   pure, so it is tested without sockets or KVM.
//! - [`server`]: the Unix stream socket (`--api-socket`, `"api_socket"`), served
//!   from the event loop like the vsock device: its own epoll set, whose fd is
//!   one event source of the VMM loop.
//! - [`ready`]: `--ready-fd N`, one byte written to an inherited fd once every
//!   vCPU thread is about to enter the guest, so a parent can wait for the VM
//!   without polling.
//!
//! The protocol, one JSON object per line each way:
//!
//! | request | response |
//! | --- | --- |
//! | `{"op":"ping"}` | `{"ok":true}` |
//! | `{"op":"info"}` | `{"ok":true,"vcpus":2,"memory_mib":256,"pid":4242,"vsock_socket":"/run/husk/x/vsock.sock"}` |
//! | `{"op":"shutdown"}` | `{"ok":true}`, then the VM stops and husk-vmm exits 0 |
//! | `{"op":"snapshot"}` | once written to `--snapshot-to`: `{"ok":true}`, and husk-vmm exits 0; without `--snapshot-to`, an error |
//! | anything else | `{"ok":false,"error":"..."}`; the connection stays usable |
//!
//! Lines longer than [`request::MAX_LINE`] are refused with an error and skipped
//! up to the next newline.

pub mod ready;
pub mod request;
pub mod server;

pub use ready::ReadySignal;
pub use request::{Request, Response, VmInfo};
pub use server::{answer_late, ControlServer, SnapshotReply};
