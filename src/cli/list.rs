//! `rovl list`: the fuse.rovl mounts of this mount namespace, with what
//! their daemons recorded (see `rovl::registry`).

use super::CmdResult;
use rovl::registry::{self, Record};
use serde::Serialize;

#[derive(Serialize)]
struct Entry {
    mountpoint: String,
    device: String,
    /// running, dead (daemon gone: `rovl umount` it), or unknown (no record).
    state: &'static str,
    uptime_secs: Option<u64>,
    record: Option<Record>,
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn entries() -> Result<Vec<Entry>, String> {
    let mounts =
        rovl::mountinfo::read().map_err(|e| format!("rovl: cannot read mountinfo: {e}"))?;
    Ok(mounts
        .into_iter()
        .filter(|m| m.fstype == "fuse.rovl")
        .map(|m| {
            let record = Record::find(&m.dev);
            let state = match &record {
                Some(r) if registry::alive(r.pid) => "running",
                Some(_) => "dead",
                None => "unknown",
            };
            Entry {
                mountpoint: m.mount_point.to_string_lossy().into_owned(),
                device: m.dev,
                state,
                uptime_secs: record.as_ref().map(|r| now().saturating_sub(r.started)),
                record,
            }
        })
        .collect())
}

fn duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

pub fn list_cmd(json: bool) -> CmdResult {
    let entries = entries()?;
    if json {
        let text = serde_json::to_string_pretty(&entries).map_err(|e| format!("rovl: {e}"))?;
        println!("{text}");
        return Ok(());
    }
    for e in &entries {
        println!("{}", e.mountpoint);
        let Some(r) = &e.record else {
            println!("  (no record: mounted by another rovl or in another namespace)");
            continue;
        };
        let up = duration(e.uptime_secs.unwrap_or(0));
        match e.state {
            "running" => println!("  pid {}, up {up}", r.pid),
            _ => println!("  daemon {} is gone: rovl umount {}", r.pid, e.mountpoint),
        }
        println!("  lowerdir {}", r.lowerdir.join(":"));
        if let (Some(u), Some(w)) = (&r.upperdir, &r.workdir) {
            println!("  upperdir {u}");
            println!("  workdir  {w}");
        }
        if !r.options.is_empty() {
            println!("  options  {}", r.options);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(duration(5), "5s");
        assert_eq!(duration(65), "1m05s");
        assert_eq!(duration(3 * 3600 + 120), "3h02m");
        assert_eq!(duration(2 * 86400 + 3600), "2d01h");
    }
}
