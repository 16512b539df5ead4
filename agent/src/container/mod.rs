//! Containers in the guest. This first part checks an OCI runtime spec,
//! as the host sends it, before anything is built from it: a bad spec is
//! refused with the field named, and nothing in the guest changes. Building
//! and running the container comes with the rest of the containers issue.

pub mod manager;
pub mod process;
pub mod spec;
pub mod stdio;
