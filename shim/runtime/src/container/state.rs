//! The life of one process (a container's init or an exec) as one enum,
//! moved only by methods that refuse a wrong transition with a clear error.
//! A container's state is its init process's.
//!
//! ```text
//! Creating ─created─► Created ─begin_start─► Starting ─started─► Running ◄─resume─ Paused
//!    │                  │  ▲                    │                  │  └──pause──────►│
//!    │                  │  └────start_failed────┘                  │                 │
//!    │                  ├───────────────────exit──────────────────►Stopped(exit)◄─exit┘
//!    │                  └──begin_delete──► Deleting ◄──begin_delete──┘
//!    └─(create failed: never seen)
//! ```
//! Exits are recorded from any live state (a process can die while its
//! start is still being answered).

use std::time::SystemTime;

use crate::error::Error;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The exit code, or 128 + signal.
    pub status: u32,
    pub at: SystemTime,
}

impl Exit {
    pub fn now(status: u32) -> Self {
        Self {
            status,
            at: SystemTime::now(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Being made in the guest; not usable yet.
    Creating,
    Created,
    /// The agent is being asked to start it.
    Starting,
    Running,
    Paused,
    Stopped(Exit),
    /// Being removed; the exit it had, if it ran.
    Deleting(Option<Exit>),
}

impl State {
    pub fn exit(&self) -> Option<Exit> {
        match self {
            State::Stopped(e) => Some(*e),
            State::Deleting(e) => *e,
            _ => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            State::Creating => "being created",
            State::Created => "created",
            State::Starting => "starting",
            State::Running => "running",
            State::Paused => "paused",
            State::Stopped(_) => "stopped",
            State::Deleting(_) => "being deleted",
        }
    }

    fn refuse(&self, what: &str, call: &str) -> Error {
        match self {
            State::Deleting(_) => Error::NotFound(what.to_string()),
            _ => Error::FailedPrecondition(format!("{what} is {}: cannot {call}", self.name())),
        }
    }

    /// Creating → Created.
    pub fn created(&mut self, what: &str) -> Result<(), Error> {
        match self {
            State::Creating => {
                *self = State::Created;
                Ok(())
            }
            s => Err(s.refuse(what, "finish creating it")),
        }
    }

    /// Created → Starting.
    pub fn begin_start(&mut self, what: &str) -> Result<(), Error> {
        match self {
            State::Created => {
                *self = State::Starting;
                Ok(())
            }
            s => Err(s.refuse(what, "start it")),
        }
    }

    /// Starting → Running (an exit recorded meanwhile stays).
    pub fn started(&mut self) {
        if *self == State::Starting {
            *self = State::Running;
        }
    }

    /// Starting → Created: the agent did not start it.
    pub fn start_failed(&mut self) {
        if *self == State::Starting {
            *self = State::Created;
        }
    }

    /// Running → Paused.
    pub fn pause(&mut self, what: &str) -> Result<(), Error> {
        match self {
            State::Running => {
                *self = State::Paused;
                Ok(())
            }
            s => Err(s.refuse(what, "pause it")),
        }
    }

    /// Paused → Running.
    pub fn resume(&mut self, what: &str) -> Result<(), Error> {
        match self {
            State::Paused => {
                *self = State::Running;
                Ok(())
            }
            s => Err(s.refuse(what, "resume it")),
        }
    }

    /// Records an exit; false when the process had ended already (the
    /// first exit recorded is the one that counts).
    pub fn exited(&mut self, exit: Exit) -> bool {
        match self {
            State::Stopped(_) | State::Deleting(_) | State::Creating => false,
            _ => {
                *self = State::Stopped(exit);
                true
            }
        }
    }

    /// Created or Stopped → Deleting; anything that runs is refused.
    pub fn begin_delete(&mut self, what: &str) -> Result<Option<Exit>, Error> {
        match *self {
            State::Created => {
                *self = State::Deleting(None);
                Ok(None)
            }
            State::Stopped(e) => {
                *self = State::Deleting(Some(e));
                Ok(Some(e))
            }
            State::Starting | State::Running | State::Paused => Err(Error::FailedPrecondition(
                format!("{what} is {}: kill it first", self.name()),
            )),
            s => Err(s.refuse(what, "delete it")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_goes_through_its_life() {
        let mut s = State::Creating;
        assert!(s.begin_start("c").is_err(), "not created yet");
        s.created("c").unwrap();
        s.begin_start("c").unwrap();
        assert!(s.begin_start("c").is_err(), "a second start is refused");
        assert!(
            s.begin_delete("c").is_err(),
            "a starting process is not deleted"
        );
        s.started();
        assert_eq!(s, State::Running);
        s.pause("c").unwrap();
        assert!(s.pause("c").is_err());
        s.resume("c").unwrap();
        let e = Exit::now(3);
        assert!(s.exited(e));
        assert!(!s.exited(Exit::now(9)), "the first exit counts");
        assert_eq!(s.exit(), Some(e));
        assert!(matches!(
            s.begin_start("c"),
            Err(Error::FailedPrecondition(_))
        ));
        assert_eq!(s.begin_delete("c").unwrap(), Some(e));
        assert!(matches!(s.begin_start("c"), Err(Error::NotFound(_))));
        assert!(matches!(s.begin_delete("c"), Err(Error::NotFound(_))));
    }

    #[test]
    fn an_exit_during_start_is_kept() {
        let mut s = State::Created;
        s.begin_start("c").unwrap();
        assert!(s.exited(Exit::now(0)));
        s.started();
        assert!(matches!(s, State::Stopped(_)));
        let mut s = State::Created;
        s.begin_start("c").unwrap();
        s.start_failed();
        assert_eq!(
            s,
            State::Created,
            "a failed start can be retried or deleted"
        );
    }

    #[test]
    fn running_and_paused_refuse_delete_with_a_precondition() {
        for mut s in [State::Running, State::Paused] {
            let e = s.begin_delete("c1").unwrap_err();
            assert!(e.to_string().contains("kill it first"), "{e}");
            assert_eq!(e.code(), husk_agent_api::ttrpc::Code::FAILED_PRECONDITION);
        }
    }
}
