//! Daemonizing and readiness reporting for `rovl mount`.
//!
//! The parent waits on a pipe until the serving child reports that the mount is
//! ready (or why it failed), so `rovl mount` exits only once the overlay is usable.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const READY: u8 = 0;
const FAILED: u8 = 1;

/// Where the serving process reports readiness: the parent's pipe, or
/// nothing in the foreground (errors then go straight to stderr).
pub struct Reporter {
    pipe: Option<File>,
}

impl Reporter {
    pub fn foreground() -> Self {
        Reporter { pipe: None }
    }

    /// The mount is up: release the parent and, as a daemon, detach from the terminal.
    pub fn ready(self) {
        let Some(mut pipe) = self.pipe else {
            return;
        };
        // Before reporting, so the caller's stdio is released when `rovl mount` returns.
        if let Err(e) = redirect_stdio_to_null() {
            log::warn!("cannot redirect stdio to /dev/null: {e}");
        }
        if let Err(e) = pipe.write_all(&[READY]) {
            log::warn!("cannot report readiness: {e}");
        }
    }

    /// Reports `msg` (one line, already prefixed with `rovl: `).
    pub fn failed(self, msg: &str) {
        match self.pipe {
            Some(mut pipe) => {
                let mut buf = vec![FAILED];
                buf.extend_from_slice(msg.as_bytes());
                if pipe.write_all(&buf).is_err() {
                    eprintln!("{msg}");
                }
            }
            None => eprintln!("{msg}"),
        }
    }
}

fn redirect_stdio_to_null() -> io::Result<()> {
    let null = File::options().read(true).write(true).open("/dev/null")?;
    for fd in 0..3 {
        // SAFETY: dup2 onto the standard descriptors; `null` stays valid.
        if unsafe { libc::dup2(null.as_raw_fd(), fd) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Forks. Must run before any thread exists. In the parent this never returns:
/// it waits for the child's report and exits 0 (ready) or 1 (failed). The child
/// gets a new session and a [`Reporter`].
pub fn daemonize() -> io::Result<Reporter> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills `fds` with two new descriptors on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and owned from here on.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };

    // Flush so buffered output is not written twice.
    let _ = io::stdout().flush();
    // SAFETY: single-threaded here (checked by the caller's contract); the child
    // only continues with ordinary Rust code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid > 0 {
        drop(write_end);
        wait_for_child(File::from(read_end), pid);
    }
    drop(read_end);
    // Inherited descriptors (a caller's pipes, say) would stay open for the
    // daemon's whole life and could keep the caller waiting for EOF.
    let keep = write_end.as_raw_fd() as libc::c_uint;
    // SAFETY: we own no descriptors >= 3 other than `keep`; errors (old kernels) are harmless.
    unsafe {
        if keep > 3 {
            libc::syscall(
                libc::SYS_close_range,
                3 as libc::c_uint,
                keep - 1,
                0 as libc::c_uint,
            );
        }
        libc::syscall(
            libc::SYS_close_range,
            keep + 1,
            libc::c_uint::MAX,
            0 as libc::c_uint,
        );
        libc::setsid();
    }
    // Do not keep the caller's cwd busy; all paths are absolute by now.
    let _ = std::env::set_current_dir("/");
    Ok(Reporter {
        pipe: Some(File::from(write_end)),
    })
}

fn wait_for_child(mut pipe: File, pid: libc::pid_t) -> ! {
    let mut buf = Vec::new();
    let _ = pipe.read_to_end(&mut buf);
    match buf.split_first() {
        Some((&READY, _)) => std::process::exit(0),
        Some((_, msg)) => {
            eprintln!("{}", String::from_utf8_lossy(msg));
        }
        None => {
            let mut status = 0;
            // SAFETY: reaps our own child; `status` is written on success.
            let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
            if rc == pid && libc::WIFSIGNALED(status) {
                eprintln!(
                    "rovl: daemon killed by signal {} before the mount was ready",
                    libc::WTERMSIG(status)
                );
            } else {
                eprintln!("rovl: daemon exited before the mount was ready");
            }
        }
    }
    std::process::exit(1)
}
