//! Containers in the guest: the spec checked ([`spec`]), the process built
//! and started in its namespaces ([`process`]), its cgroup ([`cgroup`]),
//! its seccomp filters ([`seccomp`]), the device nodes its spec asks for ([`nodes`]), its terminal ([`pty`]) and stdio streams ([`stdio`]), the image's view of its user ([`user`]), and the manager
//! that keeps track of them all ([`manager`]).

pub mod cgroup;
pub mod devices;
pub mod manager;
pub mod nodes;
pub mod process;
pub mod pty;
pub mod seccomp;
pub mod spec;
pub mod stdio;
pub mod user;
