//! What is mounted: FUSE mount tables show no layers, so each daemon
//! leaves a small record of its mount (layers, options, pid, start time)
//! in a runtime dir for `rovl list`, and removes it when it ends.
//!
//! Records live in `/run/rovl` (root) or `$XDG_RUNTIME_DIR/rovl` (else
//! `/tmp/rovl-UID`), named by the mount's device (`major:minor`), which is
//! unique while the mount exists.

use crate::options::MountConfig;
use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    pub mountpoint: String,
    /// `major:minor` of the FUSE mount (as in mountinfo).
    pub device: String,
    pub source: String,
    /// Top first, as in `lowerdir=`.
    pub lowerdir: Vec<String>,
    pub upperdir: Option<String>,
    pub workdir: Option<String>,
    /// The options as given, without the layer paths.
    pub options: String,
    pub pid: u32,
    /// Seconds since the epoch when the mount became ready.
    pub started: u64,
}

/// The runtime dirs where records may be, the writable one first.
pub fn dirs() -> Vec<PathBuf> {
    let uid = crate::sys::uid();
    let own = if uid == 0 {
        PathBuf::from("/run/rovl")
    } else {
        match std::env::var_os("XDG_RUNTIME_DIR") {
            Some(d) if !d.is_empty() => PathBuf::from(d).join("rovl"),
            _ => PathBuf::from(format!("/tmp/rovl-{uid}")),
        }
    };
    let mut out = vec![own];
    if uid != 0 {
        out.push(PathBuf::from("/run/rovl"));
    }
    out
}

fn file_name(device: &str) -> String {
    format!("{}.json", device.replace(':', "_"))
}

/// Where a daemon writes its counters when asked (SIGUSR1).
pub fn stats_path(device: &str) -> PathBuf {
    dirs()
        .remove(0)
        .join(format!("{}.stats", device.replace(':', "_")))
}

/// Writes `snapshot` for `rovl stats` (atomically).
pub fn save_stats(device: &str, snapshot: &crate::stats::Snapshot) -> io::Result<()> {
    let path = stats_path(device);
    let tmp = path.with_extension(format!("stats.{}", std::process::id()));
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(snapshot).map_err(io::Error::other)?,
    )?;
    std::fs::rename(&tmp, &path)
}

fn lossy(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

impl Record {
    /// The record of a mount just made, with the options given on the
    /// command line (`opts`, layer paths left out).
    pub fn new(cfg: &MountConfig, device: String, opts: &[String]) -> Record {
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let layer_opt = |o: &&String| {
            [
                "lowerdir=",
                "lowerdir+=",
                "datadir+=",
                "upperdir=",
                "workdir=",
            ]
            .iter()
            .any(|p| o.starts_with(p))
        };
        Record {
            mountpoint: lossy(&cfg.mountpoint),
            device,
            source: cfg.source.clone(),
            lowerdir: cfg.lowerdirs.iter().map(|p| lossy(p)).collect(),
            upperdir: cfg.upperdir.as_deref().map(lossy),
            workdir: cfg.workdir.as_deref().map(lossy),
            options: opts
                .iter()
                .filter(|o| !layer_opt(o))
                .cloned()
                .collect::<Vec<_>>()
                .join(","),
            pid: std::process::id(),
            started,
        }
    }

    /// Writes the record (atomically: a temp file renamed into place);
    /// returns its path, to remove at exit. Records of mounts that no
    /// longer exist (daemons killed) go.
    pub fn save(&self) -> io::Result<PathBuf> {
        let dir = dirs().remove(0);
        let path = dir.join(file_name(&self.device));
        let tmp = dir.join(format!(".{}.{}", file_name(&self.device), self.pid));
        let text = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        let mut tries = 0;
        loop {
            std::fs::create_dir_all(&dir)?;
            prune(&dir);
            match std::fs::write(&tmp, &text).and_then(|_| std::fs::rename(&tmp, &path)) {
                // Another daemon's `remove` took the empty dir away.
                Err(e) if e.kind() == io::ErrorKind::NotFound && tries < 3 => tries += 1,
                r => return r.map(|_| path),
            }
        }
    }

    /// Removes this daemon's saved record, and the runtime dir once it is
    /// empty, so nothing outlives the last mount. A record there of
    /// another daemon stays: the device number is free once the mount is
    /// gone, and a new mount may have taken it, and the file, before this
    /// daemon got here.
    pub fn remove(path: &Path) {
        if read(path).is_some_and(|r| r.pid == std::process::id()) {
            let _ = std::fs::remove_file(path);
            let _ = std::fs::remove_file(path.with_extension("stats"));
        }
        if let Some(dir) = path.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }

    /// The record of the mount with this device, if one is kept.
    pub fn find(device: &str) -> Option<Record> {
        dirs()
            .into_iter()
            .find_map(|d| read(&d.join(file_name(device))).filter(|r| r.device == device))
    }
}

/// The record in a file, if it holds one.
fn read(path: &Path) -> Option<Record> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Removes the records in `dir` whose mount and daemon are both gone. A
/// daemon that is alive keeps its record even when its mount is missing
/// from the mount table read here: that read may predate the mount of a
/// daemon starting at the same time, which saves its record just after.
fn prune(dir: &Path) {
    let Ok(mounts) = crate::mountinfo::read() else {
        return;
    };
    let live: Vec<String> = mounts
        .into_iter()
        .filter(|m| m.fstype == "fuse.rovl")
        .map(|m| file_name(&m.dev))
        .collect();
    let daemon_alive = |record: &Path| read(record).is_some_and(|r| alive(r.pid));
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let record = name.replace(".stats", ".json");
        let ours = name.ends_with(".json") || name.ends_with(".stats");
        if ours
            && !name.starts_with('.')
            && !live.contains(&record)
            && !daemon_alive(&dir.join(&record))
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Whether a process with this pid runs (a killed daemon may linger as a
/// zombie until its new parent reaps it).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        // The state follows the parenthesised command name.
        s.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|st| st != "Z" && st != "X")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a record of mount `dev` by daemon `pid`, and its stats, in `dir`.
    fn write_record(dir: &Path, dev: &str, pid: u32) -> PathBuf {
        let r = Record {
            mountpoint: "/m".into(),
            device: dev.into(),
            source: "rovl".into(),
            lowerdir: vec!["/a".into()],
            upperdir: None,
            workdir: None,
            options: String::new(),
            pid,
            started: 0,
        };
        let path = dir.join(file_name(dev));
        std::fs::write(&path, serde_json::to_vec(&r).unwrap()).unwrap();
        std::fs::write(path.with_extension("stats"), b"{}").unwrap();
        path
    }

    #[test]
    fn liveness() {
        assert!(alive(std::process::id()));
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        // Exited, not reaped yet: a zombie.
        let zombie = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            })
        };
        let start = std::time::Instant::now();
        while !zombie() && start.elapsed() < std::time::Duration::from_secs(30) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(zombie() && !alive(pid));
        let _ = c.wait();
        assert!(!alive(pid));
    }

    /// A record whose device is in no mount table read yet stays while its
    /// daemon lives (a mount racing another daemon's prune); with its
    /// daemon gone, it and its stats go.
    #[test]
    fn prune_keeps_records_of_live_daemons() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let dead = c.id();
        c.wait().unwrap();
        write_record(dir.path(), "999:1", std::process::id());
        write_record(dir.path(), "999:2", dead);
        prune(dir.path());
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["999_1.json", "999_1.stats"]);
    }

    /// A daemon ending after its device was reused leaves the new
    /// mount's record (and stats) alone, and removes its own.
    #[test]
    fn remove_leaves_a_record_of_another_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_record(dir.path(), "999:3", std::process::id() + 1);
        Record::remove(&path);
        assert!(path.exists() && path.with_extension("stats").exists());
        write_record(dir.path(), "999:3", std::process::id());
        Record::remove(&path);
        assert!(!path.exists() && !path.with_extension("stats").exists());
    }

    #[test]
    fn file_names_have_no_colon() {
        assert_eq!(file_name("0:52"), "0_52.json");
    }

    #[test]
    fn records_round_trip() {
        let r = Record {
            mountpoint: "/m".into(),
            device: "0:99".into(),
            source: "rovl".into(),
            lowerdir: vec!["/a".into(), "/b".into()],
            upperdir: Some("/u".into()),
            workdir: Some("/w".into()),
            options: "redirect_dir=on".into(),
            pid: 1,
            started: 2,
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Record>(&text).unwrap(), r);
    }
}
