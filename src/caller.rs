//! The process a request runs for, and whether it is being killed.
//!
//! fuser 0.18 answers FUSE_INTERRUPT with ENOSYS, so the kernel stops
//! sending it and a caller that gets a fatal signal waits for our reply.
//! Long work (a data copy-up) therefore polls the caller itself, as the
//! kernel's copy-up stops for signals, by reading the caller's pending,
//! blocked and ignored signals in `/proc/TID/status`.

use std::cell::Cell;

thread_local! {
    static CALLER: Cell<u32> = const { Cell::new(0) };
}

/// Marks this worker thread as serving `tid` until dropped.
pub struct Scope(());

impl Scope {
    pub fn enter(tid: u32) -> Scope {
        CALLER.with(|c| c.set(tid));
        Scope(())
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        CALLER.with(|c| c.set(0));
    }
}

/// Whether the current request's caller was interrupted: SIGKILL, or
/// another signal neither blocked nor ignored is pending (a caught one
/// too, as Ctrl-C in a shell that traps SIGINT), other than the routine
/// notifications (SIGCHLD, SIGWINCH, SIGURG, SIGCONT) and stop signals.
/// The caller then gets EINTR, as from the kernel overlay's copy-up.
pub fn signal_pending() -> bool {
    let tid = CALLER.with(|c| c.get());
    if tid == 0 {
        return false;
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{tid}/status")) else {
        // Gone already.
        return true;
    };
    let mask = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_caller_means_no_signal() {
        assert!(!signal_pending());
    }

    #[test]
    fn a_live_caller_without_signals() {
        let _s = Scope::enter(std::process::id());
        assert!(!signal_pending());
    }

    #[test]
    fn a_caller_that_is_gone_counts_as_killed() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let _ = child.wait();
        let _s = Scope::enter(child.id());
        assert!(signal_pending());
    }
}
