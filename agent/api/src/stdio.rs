//! Process stdio streams: the host connects to [`STDIO_PORT`](crate::STDIO_PORT)
//! and names the stream it wants in one line, `<container> <exec> <stream>\n`;
//! what follows the newline is the stream's. [`Handshake`] is that line,
//! encoded and parsed in one place.

use std::fmt;
use std::str::FromStr;

use crate::INIT_PROCESS;

/// The longest handshake line accepted, newline excluded: two ids of at
/// most 128 bytes (containerd's limit), the stream name and the spaces fit
/// with room to spare, and a peer that never sends a newline is cut off.
pub const MAX_HANDSHAKE: usize = 512;

/// How the init process is named on the wire. The line has no empty field
/// (space-separated), so [`INIT_PROCESS`] ("") travels as "-", as it always
/// has: old hosts and agents keep understanding each other.
const INIT_TOKEN: &str = "-";

/// One of a process's three stdio streams. A terminal has only `Stdout`
/// (and `Stdin`): the pty carries both outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    Stdin,
    Stdout,
    Stderr,
}

impl Stream {
    pub const ALL: [Stream; 3] = [Stream::Stdin, Stream::Stdout, Stream::Stderr];

    /// The name on the wire: "stdin", "stdout", "stderr".
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdin => "stdin",
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Stream {
    type Err = HandshakeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Stream::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| HandshakeError::Stream(s.chars().take(32).collect()))
    }
}

/// Why a handshake line was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("stdio handshake longer than {MAX_HANDSHAKE} bytes")]
    TooLong,
    #[error("stdio handshake {0:?}: want \"<container> <exec|-> <stdin|stdout|stderr>\"")]
    Shape(String),
    #[error("stdio handshake: {0:?} is not a stream (stdin, stdout or stderr)")]
    Stream(String),
    #[error("stdio handshake: {what} {id:?} may not hold spaces or newlines, nor be \"-\"")]
    Id { what: &'static str, id: String },
}

/// The first line of a stdio stream: which process, which stream.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Handshake {
    pub container_id: String,
    /// [`INIT_PROCESS`] ("") for the container's own process.
    pub exec_id: String,
    pub stream: Stream,
}

impl Handshake {
    pub fn new(container_id: &str, exec_id: &str, stream: Stream) -> Self {
        Self {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            stream,
        }
    }

    /// The line to send, newline included. Refuses ids the line cannot
    /// carry (a space would shift the fields).
    pub fn to_line(&self) -> Result<String, HandshakeError> {
        let bad = |s: &str| s.is_empty() || s == INIT_TOKEN || s.contains([' ', '\n', '\r']);
        if bad(&self.container_id) {
            return Err(HandshakeError::Id {
                what: "container id",
                id: self.container_id.clone(),
            });
        }
        let exec = if self.exec_id == INIT_PROCESS {
            INIT_TOKEN
        } else if bad(&self.exec_id) {
            return Err(HandshakeError::Id {
                what: "exec id",
                id: self.exec_id.clone(),
            });
        } else {
            &self.exec_id
        };
        let line = format!("{} {exec} {}\n", self.container_id, self.stream);
        if line.len() - 1 > MAX_HANDSHAKE {
            return Err(HandshakeError::TooLong);
        }
        Ok(line)
    }

    /// Parses one line, with or without its newline. "-" as the exec id is
    /// the init process ([`INIT_PROCESS`]).
    pub fn parse(line: &str) -> Result<Self, HandshakeError> {
        let line = line.strip_suffix('\n').unwrap_or(line);
        if line.len() > MAX_HANDSHAKE {
            return Err(HandshakeError::TooLong);
        }
        let shape = || HandshakeError::Shape(line.chars().take(64).collect());
        let mut f = line.split(' ');
        let (Some(c), Some(e), Some(s), None) = (f.next(), f.next(), f.next(), f.next()) else {
            return Err(shape());
        };
        if c.is_empty() || e.is_empty() || c == INIT_TOKEN || line.contains(['\n', '\r']) {
            return Err(shape());
        }
        Ok(Self {
            container_id: c.to_string(),
            exec_id: if e == INIT_TOKEN {
                INIT_PROCESS.to_string()
            } else {
                e.to_string()
            },
            stream: s.parse()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_round_trip() {
        for s in Stream::ALL {
            assert_eq!(s.as_str().parse::<Stream>().unwrap(), s);
            assert_eq!(s.to_string(), s.as_str());
        }
        assert!("stdio".parse::<Stream>().is_err());
    }

    #[test]
    fn the_init_process_is_a_dash_on_the_wire() {
        let h = Handshake::new("c1", INIT_PROCESS, Stream::Stdout);
        assert_eq!(h.to_line().unwrap(), "c1 - stdout\n");
        assert_eq!(Handshake::parse("c1 - stdout\n").unwrap(), h);
        assert_eq!(Handshake::parse("c1 - stdout").unwrap(), h);
        let e = Handshake::new("c1", "e1", Stream::Stdin);
        assert_eq!(Handshake::parse(&e.to_line().unwrap()).unwrap(), e);
    }

    #[test]
    fn bad_lines_are_refused() {
        for bad in [
            "",
            "c1 - stdout x",
            "c1 -",
            " - stdout",
            "c1  stdout",
            "- - stdout",
            "c1 - stdout\r",
        ] {
            assert!(Handshake::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            Handshake::parse("c1 - stdio"),
            Err(HandshakeError::Stream("stdio".into()))
        );
        let long = format!("{} - stdout", "c".repeat(MAX_HANDSHAKE));
        assert_eq!(Handshake::parse(&long), Err(HandshakeError::TooLong));
        for (c, e) in [
            ("a b", "e"),
            ("", "e"),
            ("-", "e"),
            ("c", "-"),
            ("c", "x\ny"),
        ] {
            assert!(
                Handshake::new(c, e, Stream::Stdout).to_line().is_err(),
                "{c:?} {e:?}"
            );
        }
        let long = Handshake::new(&"c".repeat(MAX_HANDSHAKE), "", Stream::Stdout);
        assert_eq!(long.to_line(), Err(HandshakeError::TooLong));
    }
}
