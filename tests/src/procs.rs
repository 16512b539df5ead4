//! Finding processes, for tests that prove nothing was left running.

use std::fs;

/// A process as /proc shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proc {
    pub pid: i32,
    pub ppid: i32,
    pub comm: String,
    pub cmdline: String,
}

/// Every process this kernel shows; processes that vanish mid-scan are skipped.
pub fn all() -> Vec<Proc> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // comm may hold spaces and parentheses: the state follows the last ')'.
        let open = stat.find('(')?;
        let close = stat.rfind(')')?;
        let comm = stat[open + 1..close].to_string();
        let ppid = stat[close + 2..].split_whitespace().nth(1)?.parse().ok()?;
        let cmdline = fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| {
                String::from_utf8_lossy(&b)
                    .replace('\0', " ")
                    .trim()
                    .to_string()
            })
            .unwrap_or_default();
        Some(Proc {
            pid,
            ppid,
            comm,
            cmdline,
        })
    })
    .collect()
}

/// Processes whose command line contains `needle`.
pub fn matching(needle: &str) -> Vec<Proc> {
    all()
        .into_iter()
        .filter(|p| p.cmdline.contains(needle))
        .collect()
}

/// The children of `pid`.
pub fn children_of(pid: i32) -> Vec<Proc> {
    all().into_iter().filter(|p| p.ppid == pid).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_itself_and_its_children() {
        let me = std::process::id() as i32;
        assert!(all().iter().any(|p| p.pid == me));
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let kids = children_of(me);
        assert!(
            kids.iter()
                .any(|p| p.pid == child.id() as i32 && p.comm == "sleep"),
            "{kids:?}"
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
