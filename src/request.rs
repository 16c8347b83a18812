//! The request a worker thread serves: its type, caller and outcome, for
//! the counters and the debug log; and whether its caller was interrupted.
//!
//! fuser 0.18 answers FUSE_INTERRUPT with ENOSYS, so the kernel stops
//! sending it and a caller that gets a fatal signal waits for our reply.
//! Long work (a data copy-up) therefore polls the caller itself, as the
//! kernel's copy-up stops for signals, by reading the caller's pending,
//! blocked and ignored signals in `/proc/TID/status`.

use crate::stats::{Op, COUNTERS};
use std::cell::Cell;
use std::time::Instant;

#[derive(Clone, Copy)]
struct Current {
    op: Option<Op>,
    pid: u32,
    ino: u64,
    errno: i32,
    /// Set only when debug logging is on.
    start: Option<Instant>,
}

const IDLE: Current = Current {
    op: None,
    pid: 0,
    ino: 0,
    errno: 0,
    start: None,
};

thread_local! {
    static CURRENT: Cell<Current> = const { Cell::new(IDLE) };
}

/// One request on this worker thread: counted, and logged with its
/// outcome, caller and duration at debug level when it ends.
pub struct Scope(());

impl Scope {
    pub fn enter(op: Op, pid: u32, ino: u64) -> Scope {
        COUNTERS.request(op);
        let start =
            log::log_enabled!(target: "rovl::request", log::Level::Debug).then(Instant::now);
        CURRENT.with(|c| {
            c.set(Current {
                op: Some(op),
                pid,
                ino,
                errno: 0,
                start,
            })
        });
        Scope(())
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        let cur = CURRENT.with(|c| c.replace(IDLE));
        let Some(op) = cur.op else { return };
        if cur.errno != 0 {
            COUNTERS.error(op);
        }
        if let Some(start) = cur.start {
            let outcome = if cur.errno == 0 {
                "ok".to_string()
            } else {
                std::io::Error::from_raw_os_error(cur.errno).to_string()
            };
            log::debug!(
                target: "rovl::request",
                "{op} ino {} pid {}: {outcome} ({} us)",
                cur.ino,
                cur.pid,
                start.elapsed().as_micros()
            );
        }
    }
}

/// The current request is answered with `errno`.
pub fn failed(errno: i32) {
    CURRENT.with(|c| {
        let mut cur = c.get();
        cur.errno = errno;
        c.set(cur);
    });
}

/// Whether the current request's caller was interrupted: SIGKILL, or
/// another signal neither blocked nor ignored is pending (a caught one
/// too, as Ctrl-C in a shell that traps SIGINT), other than the routine
/// notifications (SIGCHLD, SIGWINCH, SIGURG, SIGCONT) and stop signals.
/// The caller then gets EINTR, as from the kernel overlay's copy-up.
pub fn signal_pending() -> bool {
    let tid = CURRENT.with(|c| c.get().pid);
    if tid == 0 {
        return false;
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{tid}/status")) else {
        // Gone already.
        return true;
    };
    let mask = |key| hex_field(&status, key);
    let bit = |sig: i32| 1u64 << (sig - 1);
    let pending = mask("SigPnd:") | mask("ShdPnd:");
    if pending & bit(libc::SIGKILL) != 0 {
        return true;
    }
    let routine = [
        libc::SIGCHLD,
        libc::SIGCONT,
        libc::SIGURG,
        libc::SIGWINCH,
        libc::SIGSTOP,
        libc::SIGTSTP,
        libc::SIGTTIN,
        libc::SIGTTOU,
    ]
    .iter()
    .fold(0, |m, &s| m | bit(s));
    let ignored = mask("SigBlk:") | mask("SigIgn:");
    pending & !ignored & !routine != 0
}

/// Whether the current request's caller holds `CAP_FSETID` in the initial
/// user namespace, as the kernel's `capable()` asks. With KILLPRIV_V2 a
/// setattr of nothing comes for a write that drops set-user-ID, and also
/// for one that only drops file capabilities, which a caller with
/// `CAP_FSETID` makes: the bits stay then. Unknown means no.
pub fn caller_has_fsetid() -> bool {
    let tid = CURRENT.with(|c| c.get().pid);
    if tid == 0 {
        return false;
    }
    // The initial namespace maps every id to itself.
    let initial = std::fs::read_to_string(format!("/proc/{tid}/uid_map"))
        .is_ok_and(|m| m.split_whitespace().eq(["0", "0", "4294967295"]));
    initial
        && std::fs::read_to_string(format!("/proc/{tid}/status"))
            .is_ok_and(|s| hex_field(&s, "CapEff:") & (1 << CAP_FSETID) != 0)
}

/// `linux/capability.h`; libc does not name it.
const CAP_FSETID: u32 = 4;

/// A hexadecimal mask of `/proc/TID/status`; 0 when absent.
fn hex_field(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_caller_means_no_signal() {
        assert!(!signal_pending());
    }

    #[test]
    fn a_live_caller_without_signals() {
        let _s = Scope::enter(Op::Open, std::process::id(), 1);
        assert!(!signal_pending());
    }

    #[test]
    fn a_caller_that_is_gone_counts_as_killed() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let _ = child.wait();
        let _s = Scope::enter(Op::Open, child.id(), 1);
        assert!(signal_pending());
    }
}
