//! `rovl stats MERGED`: asks the mount's daemon for its counters (SIGUSR1;
//! it writes them next to its record) and prints them.

use super::CmdResult;
use rovl::registry::{self, Record};
use rovl::stats::Snapshot;
use std::path::Path;
use std::time::{Duration, Instant};

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} bytes"),
    }
}

fn show(mountpoint: &Path, s: &Snapshot) {
    let total: u64 = s.requests.values().sum();
    let errors: u64 = s.errors.values().sum();
    println!("{} (pid {})", mountpoint.display(), s.pid);
    if !s.transport.is_empty() {
        println!("transport: {}", s.transport);
    }
    println!("requests: {total} ({errors} failed)");
    let mut by_count: Vec<_> = s.requests.iter().collect();
    by_count.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    for (op, n) in by_count {
        match s.errors.get(op) {
            Some(e) => println!("  {op:<16} {n:>10}  ({e} failed)"),
            None => println!("  {op:<16} {n:>10}"),
        }
    }
    println!(
        "copy-ups: {} ({} of data)",
        s.copy_ups,
        human(s.copy_up_bytes)
    );
    println!(
        "caches: {} nodes, {} dir fds, {} listed names (cache_entries={})",
        s.nodes, s.dir_fds, s.listings, s.cache_entries
    );
}

pub fn stats_cmd(mountpoint: &Path, json: bool) -> CmdResult {
    let say = |what: &str| format!("rovl: {}: {what}", mountpoint.display());
    let target = std::path::absolute(mountpoint).map_err(|e| say(&e.to_string()))?;
    let m = rovl::mountinfo::top_at(&target)
        .map_err(|e| say(&format!("cannot read mountinfo: {e}")))?
        .ok_or_else(|| say("not mounted"))?;
    if m.fstype != "fuse.rovl" {
        return Err(say(&format!("not a rovl mount ({})", m.fstype)));
    }
    let rec = Record::find(&m.dev)
        .ok_or_else(|| say("no record of this mount (mounted by another rovl?)"))?;
    if !registry::alive(rec.pid) {
        return Err(say(&format!(
            "its daemon {} is gone: rovl umount {}",
            rec.pid,
            mountpoint.display()
        )));
    }
    let path = registry::stats_path(&m.dev);
    let _ = std::fs::remove_file(&path);
    if let Err(e) = rovl::sys::kill(rec.pid, libc::SIGUSR1) {
        return Err(say(&format!("cannot ask daemon {}: {e}", rec.pid)));
    }
    let start = Instant::now();
    let text = loop {
        if let Ok(t) = std::fs::read(&path) {
            break t;
        }
        if start.elapsed() > Duration::from_secs(10) {
            return Err(say(&format!("daemon {} did not answer", rec.pid)));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    if json {
        println!("{}", String::from_utf8_lossy(&text));
        return Ok(());
    }
    let snap: Snapshot =
        serde_json::from_slice(&text).map_err(|e| say(&format!("bad stats: {e}")))?;
    show(mountpoint, &snap);
    Ok(())
}
