//! A FUSE daemon run as our child in the foreground: wait until its mount
//! shows, and end it in order. One copy for the tests (`common`), the
//! comparison bench (`benches/compare`) and the examples (`support`).
//!
//! Each user takes a subset.
#![allow(dead_code)]

use rovl::mountinfo::MountInfo;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

const POLL: Duration = Duration::from_millis(5);

/// How waiting for a mount ended.
pub enum Mounted {
    Up(MountInfo),
    /// The daemon exited first.
    Exited(ExitStatus),
    TimedOut,
}

/// Polls the mount table until `up` accepts the top mount at `mnt`, the
/// child exits, or `limit` passes.
pub fn wait_mounted(
    child: &mut Child,
    mnt: &Path,
    limit: Duration,
    up: impl Fn(&MountInfo) -> bool,
) -> Mounted {
    let start = Instant::now();
    loop {
        if let Some(m) = rovl::mountinfo::top_at(mnt).ok().flatten().filter(&up) {
            return Mounted::Up(m);
        }
        if let Ok(Some(st)) = child.try_wait() {
            return Mounted::Exited(st);
        }
        if start.elapsed() > limit {
            return Mounted::TimedOut;
        }
        std::thread::sleep(POLL);
    }
}

/// Waits up to `limit` for `child`; kills it (ours, by PID) if still
/// running. The status, and whether it exited on its own.
pub fn wait_bounded(child: &mut Child, limit: Duration) -> (ExitStatus, bool) {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return (st, true),
            Ok(None) if start.elapsed() < limit => std::thread::sleep(POLL),
            _ => break,
        }
    }
    let _ = child.kill();
    // Never panics (it runs in Drop): a failed wait reports "killed".
    let st = child
        .wait()
        .unwrap_or_else(|_| ExitStatus::from_raw(libc::SIGKILL));
    (st, false)
}

/// Unmounts `mnt` if anything is mounted there, then reaps the child
/// within `limit`; a daemon that had to be killed may leave its mount
/// behind, which is detached. The unmount's result, the daemon's status,
/// and whether it exited on its own.
pub fn stop(
    child: &mut Child,
    mnt: &Path,
    limit: Duration,
) -> (std::io::Result<()>, ExitStatus, bool) {
    let mounted = |p: &Path| rovl::mountinfo::top_at(p).ok().flatten().is_some();
    let unmounted = if mounted(mnt) {
        rovl::mountinfo::unmount_retry(mnt)
    } else {
        Ok(())
    };
    let (st, exited) = wait_bounded(child, limit);
    if !exited && mounted(mnt) {
        let _ = rovl::sys::umount2(mnt, libc::MNT_DETACH);
    }
    (unmounted, st, exited)
}
