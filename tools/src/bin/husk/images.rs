//! `husk pull`, `husk images`, `husk rmi`, `husk image prune`: the image
//! store (husk-runtime's `image` module) as docker shows it.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use husk_runtime::config::Config;
use husk_runtime::image::pull::{self, LayerStatus, Progress, Registries};
use husk_runtime::image::{ImageError, ImageRecord, Images};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

pub fn open(cfg: &Config) -> Result<Images> {
    Images::open(&cfg.storage_root)
        .with_context(|| format!("the image store at {}", cfg.storage_root.display()))
}

pub fn registries(cfg: &Config) -> Registries {
    Registries {
        insecure: cfg.insecure_registries.clone(),
        auth_file: std::env::var_os("DOCKER_CONFIG")
            .map(|d| PathBuf::from(d).join("config.json"))
            .or_else(|| {
                std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
            }),
        timeout: None,
        mirrors: cfg.registry_mirrors.clone(),
    }
}

/// Docker's words for each state.
fn words(s: &LayerStatus) -> String {
    match s {
        LayerStatus::Waiting => "Waiting".into(),
        LayerStatus::Downloading { done, total } if *total > 0 => {
            format!("Downloading {}/{}", human_size(*done), human_size(*total))
        }
        LayerStatus::Downloading { done, .. } => format!("Downloading {}", human_size(*done)),
        LayerStatus::Verifying => "Verifying Checksum".into(),
        LayerStatus::Extracting => "Extracting".into(),
        LayerStatus::Done => "Pull complete".into(),
        LayerStatus::Exists => "Already exists".into(),
    }
}

/// Progress on a terminal: a line per layer, redrawn (indicatif).
struct Bars {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
}

impl Progress for Bars {
    fn layer(&self, layer: &str, status: LayerStatus) {
        let Ok(mut bars) = self.bars.lock() else {
            return;
        };
        let bar = bars.entry(layer.to_string()).or_insert_with(|| {
            let b = self.multi.add(ProgressBar::new(0));
            b.set_style(
                ProgressStyle::with_template("{prefix}: {msg:24} {bar:30} ")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            b.set_prefix(layer.to_string());
            b
        });
        if let LayerStatus::Downloading { done, total } = status {
            bar.set_length(total.max(done));
            bar.set_position(done);
        }
        if matches!(status, LayerStatus::Done | LayerStatus::Exists) {
            bar.set_style(
                ProgressStyle::with_template("{prefix}: {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.finish_with_message(words(&status));
        } else {
            bar.set_message(words(&status));
        }
    }
}

/// Progress elsewhere: a plain line per change of state (not per chunk).
struct Lines(Mutex<HashMap<String, std::mem::Discriminant<LayerStatus>>>);

impl Progress for Lines {
    fn layer(&self, layer: &str, status: LayerStatus) {
        let Ok(mut seen) = self.0.lock() else { return };
        let d = std::mem::discriminant(&status);
        if seen.insert(layer.to_string(), d) == Some(d) {
            return;
        }
        let text = match status {
            LayerStatus::Downloading { .. } => "Downloading".to_string(),
            s => words(&s),
        };
        println!("{layer}: {text}");
    }
}

/// A failed pull as the user reads it (docker's words for a missing image).
pub fn pull_error(image: &str, e: ImageError) -> anyhow::Error {
    match e {
        ImageError::NotFound(m) => anyhow::anyhow!("pull access denied or image not found: {m}"),
        e => anyhow::Error::new(e).context(format!("pulling {image}")),
    }
}

/// Pulls `image` with docker's output on stdout.
pub async fn pull(cfg: &Config, image: &str, quiet: bool) -> Result<ImageRecord> {
    let images = open(cfg)?;
    let before = images.resolve(image).ok();
    let progress: Arc<dyn Progress> = if quiet {
        Arc::new(pull::NoProgress)
    } else if std::io::stdout().is_terminal() {
        Arc::new(Bars {
            multi: MultiProgress::new(),
            bars: Mutex::new(HashMap::new()),
        })
    } else {
        Arc::new(Lines(Mutex::new(HashMap::new())))
    };
    let rec = pull::pull(&images, image, &registries(cfg), progress)
        .await
        .map_err(|e| pull_error(image, e))?;
    if !quiet {
        println!("Digest: {}", rec.index.as_ref().unwrap_or(&rec.manifest));
        if before.is_some_and(|b| b.manifest == rec.manifest) {
            println!("Status: Image is up to date for {}", rec.name);
        } else {
            println!("Status: Downloaded newer image for {}", rec.name);
        }
    }
    println!("{}", rec.name);
    Ok(rec)
}

/// REPOSITORY and TAG as docker shows them (docker.io's prefix dropped).
pub fn repo_tag(name: &str) -> (String, String) {
    let (repo, tag) = match name.split_once('@') {
        Some((r, _)) => (r.to_string(), "<none>".to_string()),
        None => {
            let slash = name.rfind('/').map_or(0, |i| i + 1);
            match name[slash..].rfind(':') {
                Some(i) => (
                    name[..slash + i].to_string(),
                    name[slash + i + 1..].to_string(),
                ),
                None => (name.to_string(), "latest".to_string()),
            }
        }
    };
    let repo = repo
        .strip_prefix("docker.io/library/")
        .or_else(|| repo.strip_prefix("docker.io/"))
        .map(str::to_string)
        .unwrap_or(repo);
    (repo, tag)
}

/// Sizes as docker prints them: SI units, three significant digits.
pub fn human_size(n: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < units.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n}B")
    } else if v < 10.0 {
        format!("{v:.2}{}", units[u])
    } else if v < 100.0 {
        format!("{v:.1}{}", units[u])
    } else {
        format!("{v:.0}{}", units[u])
    }
}

/// Seconds since the epoch of an RFC 3339 time (`2024-05-01T12:00:00.5Z`).
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    let mut t = days * 86400 + hh * 3600 + mm * 60 + ss;
    // A numeric offset: +hh:mm east of UTC.
    let rest = &s[19..];
    let rest = rest.trim_start_matches(|c: char| c == '.' || c.is_ascii_digit());
    if let Some(off) = rest.strip_prefix('+').or_else(|| rest.strip_prefix('-')) {
        let oh: i64 = off.get(0..2)?.parse().ok()?;
        let om: i64 = off.get(3..5)?.parse().ok()?;
        let sign = if rest.starts_with('+') { 1 } else { -1 };
        t -= sign * (oh * 3600 + om * 60);
    }
    Some(t)
}

/// "3 days ago", as docker says it.
pub fn ago(then: Option<i64>) -> String {
    let Some(then) = then else {
        return "N/A".into();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let s = (now - then).max(0);
    let (n, unit) = match s {
        0..2 => return "Less than a second ago".into(),
        2..60 => (s, "second"),
        60..3600 => (s / 60, "minute"),
        3600..86400 => (s / 3600, "hour"),
        86400..1209600 => (s / 86400, "day"),
        1209600..5184000 => (s / 604800, "week"),
        5184000..63072000 => (s / 2592000, "month"),
        _ => (s / 31536000, "year"),
    };
    format!("{n} {unit}{} ago", if n == 1 { "" } else { "s" })
}

/// Columns as wide as their widest cell, two spaces apart (docker's tabwriter).
pub fn print_table<const N: usize>(header: &[String; N], rows: &[[String; N]]) {
    let mut width = header.clone().map(|h| h.len());
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    for r in std::iter::once(header).chain(rows) {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 == N {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}  ", w = width[i]));
            }
        }
        println!("{}", line.trim_end());
    }
}

pub fn list(cfg: &Config, quiet: bool) -> Result<()> {
    let images = open(cfg)?;
    let recs = images.list()?;
    if quiet {
        for r in recs {
            println!("{}", r.config.short());
        }
        return Ok(());
    }
    let rows: Vec<[String; 5]> = recs
        .iter()
        .map(|r| {
            let (repo, tag) = repo_tag(&r.name);
            let created = ago(r.created.as_deref().and_then(parse_rfc3339));
            [
                repo,
                tag,
                r.config.short().to_string(),
                created,
                human_size(r.size),
            ]
        })
        .collect();
    let header = ["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"].map(String::from);
    print_table(&header, &rows);
    Ok(())
}

/// The image a container of the CLI stands on (`containers/<id>/image`).
pub fn used_by(images: &Images, rec: &ImageRecord) -> Vec<String> {
    let Ok(dirs) = std::fs::read_dir(images.store().containers_dir()) else {
        return Vec::new();
    };
    dirs.flatten()
        .filter(|d| {
            std::fs::read_to_string(d.path().join("image"))
                .is_ok_and(|s| s.trim() == rec.config.to_string())
        })
        .filter_map(|d| d.file_name().into_string().ok())
        .collect()
}

pub fn rmi(cfg: &Config, names: &[String], force: bool) -> Result<()> {
    let images = open(cfg)?;
    let mut failed = false;
    for n in names {
        match images.remove(n, force, |r| !used_by(&images, r).is_empty()) {
            Ok(r) => {
                let (repo, tag) = repo_tag(&r.name);
                println!("Untagged: {repo}:{tag}");
                if !images.list()?.iter().any(|o| o.config == r.config) {
                    println!("Deleted: {}", r.config);
                }
            }
            Err(e) => {
                eprintln!("husk rmi {n}: {e}");
                failed = true;
            }
        }
    }
    if failed {
        anyhow::bail!("some images were not removed");
    }
    Ok(())
}

/// `husk login`: checks the credentials against the registry, then keeps
/// them where docker keeps them (`$DOCKER_CONFIG/config.json`, else
/// `~/.docker/config.json`).
pub async fn login(
    cfg: &Config,
    registry: &str,
    user: &str,
    password: Option<String>,
    from_stdin: bool,
) -> Result<()> {
    let password = match (password, from_stdin) {
        (Some(p), _) => p,
        (None, true) => {
            let mut p = String::new();
            std::io::stdin()
                .read_line(&mut p)
                .context("reading the password")?;
            p.trim_end_matches(['\n', '\r']).to_string()
        }
        (None, false) => anyhow::bail!("give the password with --password-stdin (or -p)"),
    };
    let regs = registries(cfg);
    pull::login(registry, user, &password, &regs).await?;
    let file = regs
        .auth_file
        .context("no HOME or DOCKER_CONFIG to keep the credentials in")?;
    husk_runtime::image::pull::save_credentials(&file, registry, user, &password)?;
    println!("Login Succeeded");
    Ok(())
}

/// `husk system df`: what images and containers take on disk, and what
/// `image prune`/`rmi` and `rm` would give back (docker's columns).
pub fn df(cfg: &Config) -> Result<()> {
    use husk_runtime::image::usage::disk_usage;
    let images = open(cfg)?;
    let recs = images.list()?;
    // Layers are shared: each counts once, and is reclaimable only when
    // no image in use needs it.
    let mut layers = HashMap::new();
    let mut active = 0;
    for r in &recs {
        let used = !used_by(&images, r).is_empty();
        active += used as usize;
        for chain in &r.chain {
            *layers.entry(chain.clone()).or_insert(false) |= used;
        }
    }
    let (mut size, mut free) = (0, 0);
    for (chain, used) in &layers {
        let n = images.layer_size(chain);
        size += n;
        if !used {
            free += n;
        }
    }
    let image_row = df_row("Images", recs.len(), active, size, free);
    let (mut total, mut running, mut size, mut free) = (0, 0, 0, 0);
    for (_, d) in super::containers::all(cfg) {
        let n = disk_usage(&d.0).with_context(|| format!("measuring {}", d.0.display()))?;
        total += 1;
        size += n;
        if d.running() {
            running += 1;
        } else {
            free += n;
        }
    }
    let container_row = df_row("Containers", total, running, size, free);
    let header = ["TYPE", "TOTAL", "ACTIVE", "SIZE", "RECLAIMABLE"].map(String::from);
    print_table(&header, &[image_row, container_row]);
    Ok(())
}

fn df_row(kind: &str, total: usize, active: usize, size: u64, free: u64) -> [String; 5] {
    let pct = (free * 100).checked_div(size).unwrap_or(0);
    [
        kind.to_string(),
        total.to_string(),
        active.to_string(),
        human_size(size),
        format!("{} ({pct}%)", human_size(free)),
    ]
}

pub fn prune(cfg: &Config) -> Result<()> {
    let images = open(cfg)?;
    let freed = images.prune()?;
    println!("Total reclaimed space: {}", human_size(freed));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_show_as_docker_shows_them() {
        assert_eq!(
            repo_tag("docker.io/library/busybox:latest"),
            ("busybox".into(), "latest".into())
        );
        assert_eq!(
            repo_tag("docker.io/u/app:v1"),
            ("u/app".into(), "v1".into())
        );
        assert_eq!(
            repo_tag("localhost:5000/bb:t"),
            ("localhost:5000/bb".into(), "t".into())
        );
        assert_eq!(
            repo_tag("localhost:5000/bb@sha256:00"),
            ("localhost:5000/bb".into(), "<none>".into())
        );
    }

    #[test]
    fn sizes_and_times_read_as_dockers() {
        assert_eq!(human_size(999), "999B");
        assert_eq!(human_size(4_260_000), "4.26MB");
        assert_eq!(human_size(12_300_000), "12.3MB");
        assert_eq!(human_size(123_000_000), "123MB");
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339("2024-03-01T12:00:00.123456789Z"),
            Some(1_709_294_400)
        );
        assert_eq!(
            parse_rfc3339("2024-03-01T14:00:00+02:00"),
            Some(1_709_294_400)
        );
        assert_eq!(parse_rfc3339("yesterday"), None);
    }
}
