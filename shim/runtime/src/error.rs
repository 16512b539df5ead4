//! The runtime's errors, and the one place each gets its ttrpc code (the
//! shim answers containerd with it; the CLI prints the message).

use std::path::PathBuf;

use husk_agent_api::ttrpc::Code;
use husk_agent_client::ClientError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}: not found")]
    NotFound(String),
    #[error("{0} exists already")]
    AlreadyExists(String),
    /// The object is in a state the call cannot start from.
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0} is not supported by husk")]
    Unsupported(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Mount(#[from] crate::container::mounts::MountError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("husk-vmm: {0}")]
    Hypervisor(String),
    #[error(transparent)]
    Network(#[from] crate::network::NetError),
    /// The agent refused or could not be reached.
    #[error("{call}: {source}")]
    Agent {
        call: &'static str,
        #[source]
        source: ClientError,
    },
    #[error("the sandbox's VM is gone: {0}")]
    VmGone(String),
}

impl Error {
    pub fn io(what: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Error::Io { what, path, source }
    }

    pub fn agent(call: &'static str) -> impl FnOnce(ClientError) -> Self {
        move |source| Error::Agent { call, source }
    }

    /// The ttrpc code for containerd. An agent's refusal keeps the agent's
    /// code (NOT_FOUND stays NOT_FOUND); a lost agent is UNAVAILABLE.
    pub fn code(&self) -> Code {
        match self {
            Error::NotFound(_) => Code::NOT_FOUND,
            Error::AlreadyExists(_) => Code::ALREADY_EXISTS,
            Error::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            Error::InvalidArgument(_) | Error::Config(_) => Code::INVALID_ARGUMENT,
            Error::Unsupported(_) => Code::UNIMPLEMENTED,
            Error::Agent {
                source: ClientError::Rpc { code, .. },
                ..
            } => *code,
            Error::Agent {
                source: ClientError::CallTimeout { .. },
                ..
            } => Code::DEADLINE_EXCEEDED,
            Error::Agent { .. } | Error::VmGone(_) => Code::UNAVAILABLE,
            Error::Io { .. } | Error::Mount(_) | Error::Hypervisor(_) | Error::Network(_) => {
                Code::INTERNAL
            }
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_its_code() {
        let rpc = |code| Error::Agent {
            call: "X",
            source: ClientError::Rpc {
                call: "X",
                code,
                message: "m".into(),
            },
        };
        for (e, code) in [
            (Error::NotFound("c".into()), Code::NOT_FOUND),
            (Error::AlreadyExists("c".into()), Code::ALREADY_EXISTS),
            (
                Error::FailedPrecondition("running".into()),
                Code::FAILED_PRECONDITION,
            ),
            (Error::InvalidArgument("x".into()), Code::INVALID_ARGUMENT),
            (Error::Unsupported("checkpoint".into()), Code::UNIMPLEMENTED),
            (rpc(Code::NOT_FOUND), Code::NOT_FOUND),
            (rpc(Code::INVALID_ARGUMENT), Code::INVALID_ARGUMENT),
            (
                Error::Agent {
                    call: "X",
                    source: ClientError::CallTimeout {
                        call: "X",
                        timeout: std::time::Duration::from_secs(1),
                    },
                },
                Code::DEADLINE_EXCEEDED,
            ),
            (Error::VmGone("exited".into()), Code::UNAVAILABLE),
            (Error::Hypervisor("x".into()), Code::INTERNAL),
        ] {
            assert_eq!(e.code(), code, "{e}");
        }
    }
}
