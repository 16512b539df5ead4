//! A container's log file, in docker's `json-file` format: one JSON object a
//! line, `{"log":"text\n","stream":"stdout","time":"2026-12-05T23:20:03.123456789Z"}`.
//!
//! Why this format and not the raw bytes: the two streams share one file and
//! must come apart again (`husk logs` writes the container's stderr to its
//! own stderr, as `docker logs` does), each line gets the time it arrived
//! (`husk logs -t`), and tools that read docker's logs read ours.
//!
//! Output is cut into records at newlines, as docker's copier does: a line
//! that has not ended waits for its end, up to [`MAX_PARTIAL`] bytes, then
//! goes out as a record without a newline (a reader just concatenates). The
//! guest's bytes are not trusted to be UTF-8; like docker's, invalid bytes
//! become U+FFFD. The text is JSON-escaped, so no output can forge a record.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::agent::Stream;

/// The longest record: a line that grows past this goes out in pieces
/// (docker's bufio size).
pub const MAX_PARTIAL: usize = 16 << 10;

/// One line of the log file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub log: String,
    pub stream: String,
    pub time: String,
}

impl Record {
    /// Whether it came from the container's stderr.
    pub fn is_stderr(&self) -> bool {
        self.stream == "stderr"
    }
}

/// One line of the log file: a record, or bytes a reader shows as they are
/// (a log written before the format changed, or a note of Husk's own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    Record(Record),
    Raw(Vec<u8>),
}

/// Reads one line of a log file (without its newline).
pub fn parse(line: &[u8]) -> Line {
    match serde_json::from_slice::<Record>(line) {
        Ok(r) => Line::Record(r),
        Err(_) => Line::Raw(line.to_vec()),
    }
}

/// A record's bytes in the file, newline included.
pub fn encode(stream: Stream, text: &[u8], time: SystemTime) -> Vec<u8> {
    let r = Record {
        log: String::from_utf8_lossy(text).into_owned(),
        stream: match stream {
            Stream::Stderr => "stderr",
            _ => "stdout",
        }
        .to_string(),
        time: rfc3339_nanos(time),
    };
    // Serializing three strings cannot fail.
    let mut out = serde_json::to_vec(&r).unwrap_or_default();
    out.push(b'\n');
    out
}

/// Cuts one stream's output into lines (records); keeps what has not
/// ended for the next chunk.
#[derive(Debug, Default)]
pub struct Lines {
    pending: Vec<u8>,
}

impl Lines {
    /// Hands each complete line (with its newline) of `pending + chunk` to
    /// `emit`, and pieces of [`MAX_PARTIAL`] bytes of a line that long.
    pub fn push(&mut self, mut chunk: &[u8], mut emit: impl FnMut(&[u8])) {
        while let Some(i) = chunk.iter().position(|&b| b == b'\n') {
            let (line, rest) = chunk.split_at(i + 1);
            if self.pending.is_empty() {
                emit(line);
            } else {
                self.pending.extend_from_slice(line);
                emit(&self.pending);
                self.pending.clear();
            }
            chunk = rest;
        }
        self.pending.extend_from_slice(chunk);
        while self.pending.len() >= MAX_PARTIAL {
            let rest = self.pending.split_off(MAX_PARTIAL);
            emit(&self.pending);
            self.pending = rest;
        }
    }

    /// What is left when the stream ends: a last line without a newline.
    pub fn finish(&mut self, mut emit: impl FnMut(&[u8])) {
        if !self.pending.is_empty() {
            emit(&self.pending);
            self.pending.clear();
        }
    }
}

/// Unix seconds as RFC 3339 UTC (`2024-03-01T12:00:00Z`).
pub fn rfc3339(secs: u64) -> String {
    let (date, s) = civil(secs);
    format!("{date}T{:02}:{:02}:{:02}Z", s / 3600, s / 60 % 60, s % 60)
}

/// A time as RFC 3339 UTC with nanoseconds, as docker writes log times.
pub fn rfc3339_nanos(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let (date, s) = civil(d.as_secs());
    format!(
        "{date}T{:02}:{:02}:{:02}.{:09}Z",
        s / 3600,
        s / 60 % 60,
        s % 60,
        d.subsec_nanos()
    )
}

/// The civil date (`YYYY-MM-DD`) of Unix seconds and the seconds into that
/// day (Howard Hinnant's days-to-civil algorithm).
fn civil(t: u64) -> (String, u64) {
    let days = (t / 86400) as i64;
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    (format!("{y:04}-{m:02}-{d:02}"), t % 86400)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn lines(chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut l = Lines::default();
        let mut out = Vec::new();
        for c in chunks {
            l.push(c, |x| out.push(x.to_vec()));
        }
        l.finish(|x| out.push(x.to_vec()));
        out
    }

    #[test]
    fn output_is_cut_at_newlines_across_chunks() {
        assert_eq!(
            lines(&[b"a\nb", b"c\n\nd"]),
            vec![
                b"a\n".to_vec(),
                b"bc\n".to_vec(),
                b"\n".to_vec(),
                b"d".to_vec()
            ]
        );
        assert!(lines(&[]).is_empty());
    }

    #[test]
    fn a_line_longer_than_the_limit_goes_out_in_pieces() {
        let long = vec![b'x'; MAX_PARTIAL * 2 + 10];
        let out = lines(&[&long, b"\n"]);
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].len(), MAX_PARTIAL);
        assert_eq!(out[1].len(), MAX_PARTIAL);
        assert_eq!(out[2], b"xxxxxxxxxx\n");
    }

    #[test]
    fn records_round_trip_and_cannot_be_forged() {
        let t = UNIX_EPOCH + Duration::new(1_709_294_400, 5);
        let evil = b"x\"}\n{\"log\":\"forged\",\"stream\":\"stderr\"\xff\n";
        let bytes = encode(Stream::Stdout, evil, t);
        assert_eq!(bytes.iter().filter(|&&b| b == b'\n').count(), 1);
        let Line::Record(r) = parse(bytes.strip_suffix(b"\n").unwrap()) else {
            panic!("not a record")
        };
        assert!(!r.is_stderr());
        assert_eq!(r.time, "2024-03-01T12:00:00.000000005Z");
        assert_eq!(
            r.log,
            "x\"}\n{\"log\":\"forged\",\"stream\":\"stderr\"\u{fffd}\n"
        );
        assert!(
            encode(Stream::Stderr, b"e", t).starts_with(b"{\"log\":\"e\",\"stream\":\"stderr\"")
        );
    }

    #[test]
    fn older_logs_read_as_raw_lines() {
        assert_eq!(parse(b"plain text"), Line::Raw(b"plain text".to_vec()));
        assert_eq!(parse(b"{\"log\":1}"), Line::Raw(b"{\"log\":1}".to_vec()));
    }

    #[test]
    fn times_print_as_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_709_294_400), "2024-03-01T12:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
