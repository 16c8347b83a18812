//! Daemonizing and readiness reporting for `rovl mount`.
//!
//! The parent waits on a pipe until the serving child reports that the mount is
//! ready (or why it failed), so `rovl mount` exits only once the overlay is usable.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;

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
        rovl::sys::dup_onto_std(null.as_fd(), fd)?;
    }
    Ok(())
}

/// Forks. Must run before any thread exists. In the parent this never returns:
/// it waits for the child's report and exits 0 (ready) or 1 (failed). The child
/// gets a new session and a [`Reporter`].
pub fn daemonize() -> io::Result<Reporter> {
    let (read_end, write_end) = rovl::sys::pipe()?;
    // Flush so buffered output is not written twice.
    let _ = io::stdout().flush();
    if let Some(pid) = rovl::sys::fork_single_threaded()? {
        drop(write_end);
        wait_for_child(File::from(read_end), pid);
    }
    drop(read_end);
    // Inherited descriptors (a caller's pipes, say) would stay open for the
    // daemon's whole life and could keep the caller waiting for EOF.
    rovl::sys::close_inherited_except(write_end.as_fd());
    let _ = rovl::sys::setsid();
    // Do not keep the caller's cwd busy; all paths are absolute by now.
    let _ = std::env::set_current_dir("/");
    Ok(Reporter {
        pipe: Some(File::from(write_end)),
    })
}

fn wait_for_child(mut pipe: File, pid: u32) -> ! {
    let mut buf = Vec::new();
    let _ = pipe.read_to_end(&mut buf);
    match buf.split_first() {
        Some((&READY, _)) => std::process::exit(0),
        Some((_, msg)) => {
            eprintln!("{}", String::from_utf8_lossy(msg));
        }
        None => {
            let status = rovl::sys::waitpid(pid);
            if let Some(status) = status.ok().filter(|&s| libc::WIFSIGNALED(s)) {
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
