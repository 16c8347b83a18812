//! The `rovl` command: mount and unmount overlays.
//!
//! Forms: `rovl mount [-f] -o OPTS [SOURCE] MERGED`, `rovl umount MERGED`,
//! `rovl SOURCE MERGED -o OPTS` (mount.fuse3) and `rovl -o OPTS MERGED` (fuse-overlayfs).

mod daemon;

use clap::{Args, Parser, Subcommand};
use daemon::Reporter;
use rovl::options::{self, MountConfig};
use std::ffi::{CString, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Args, Debug, Clone, Copy)]
struct Common {
    /// Stay in the foreground instead of forking a daemon.
    #[arg(short = 'f', long)]
    foreground: bool,
    /// Debug logging (RUST_LOG=debug unless set); implies --foreground.
    #[arg(short = 'd', long)]
    debug: bool,
}

#[derive(Parser, Debug)]
#[command(
    name = "rovl",
    version,
    about = "Userspace overlay filesystem (kernel overlayfs compatible) over FUSE",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    common: Common,
    /// Mount options, comma separated (may be repeated).
    #[arg(short = 'o', value_name = "OPTS")]
    options: Vec<String>,
    /// `[SOURCE] MERGED`: optional source name and the mountpoint.
    #[arg(value_name = "[SOURCE] MERGED", num_args = 1..=2, required = true)]
    args: Vec<OsString>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Mount an overlay at MERGED.
    Mount(MountArgs),
    /// Unmount the overlay at MERGED.
    Umount(UmountArgs),
}

#[derive(Args, Debug)]
struct MountArgs {
    #[command(flatten)]
    common: Common,
    /// Mount options, comma separated (may be repeated):
    /// lowerdir=L1[:L2...],upperdir=U,workdir=W,...
    #[arg(short = 'o', value_name = "OPTS", required = true)]
    options: Vec<String>,
    /// `[SOURCE] MERGED`: optional source name and the mountpoint.
    #[arg(value_name = "[SOURCE] MERGED", num_args = 1..=2, required = true)]
    args: Vec<OsString>,
}

#[derive(Args, Debug)]
struct UmountArgs {
    #[command(flatten)]
    common: Common,
    /// Detach now, and finish unmounting once the mount is no longer busy.
    #[arg(short = 'l', long)]
    lazy: bool,
    mountpoint: PathBuf,
}

fn init_logger(debug: bool) {
    let env = env_logger::Env::default().default_filter_or(if debug { "debug" } else { "warn" });
    env_logger::Builder::from_env(env).init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Some(Cmd::Mount(m)) => mount_cmd(m.common, &m.options, m.args),
        Some(Cmd::Umount(u)) => {
            init_logger(u.common.debug);
            umount_cmd(&u.mountpoint, u.lazy)
        }
        None => mount_cmd(cli.common, &cli.options, cli.args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            if !msg.is_empty() {
                eprintln!("{msg}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Errors are one line for stderr; empty means already reported.
type CmdResult = Result<(), String>;

fn mount_cmd(mut common: Common, opts: &[String], mut args: Vec<OsString>) -> CmdResult {
    let opts = options::split_options(&opts.join(","));
    // fuse-overlayfs' `-o debug` is `-d`, and needs the logger first.
    common.debug |= opts.iter().any(|o| o == "debug");
    init_logger(common.debug);
    let mountpoint = PathBuf::from(args.pop().expect("clap requires MERGED"));
    let source = args.pop().map(|s| s.to_string_lossy().into_owned());
    let cwd =
        std::env::current_dir().map_err(|e| format!("rovl: cannot get current directory: {e}"))?;
    let cfg =
        options::parse(&opts, &mountpoint, source.as_deref(), &cwd).map_err(|e| e.to_string())?;
    options::validate(&cfg).map_err(|e| e.to_string())?;
    log::debug!("mount config: {cfg:?}");

    // Fork before any thread exists.
    let reporter = if common.foreground || common.debug {
        Reporter::foreground()
    } else {
        daemon::daemonize().map_err(|e| format!("rovl: cannot fork: {e}"))?
    };
    match serve(&cfg, reporter) {
        Ok(()) => Ok(()),
        Err(Reported) => Err(String::new()),
    }
}

/// The failure was already sent to the reporter.
struct Reported;

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initializes the set; sigaddset only edits it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

/// Mounts and serves until unmounted. Runs in the daemon (or the foreground process).
fn serve(cfg: &MountConfig, reporter: Reporter) -> Result<(), Reported> {
    // Requests carry the caller's final modes; our own umask must not alter them.
    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(0) };

    // Blocked before any thread starts, so every thread inherits the mask and
    // only the signal thread (sigwait) receives them.
    let set = signal_set();
    // SAFETY: `set` is initialized; the old mask is not needed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        let e = io::Error::from_raw_os_error(rc);
        reporter.failed(&format!("rovl: cannot block signals: {e}"));
        return Err(Reported);
    }

    // Held until exit: keeps other mounts off this upper/workdir.
    let workdir = match (&cfg.upperdir, &cfg.workdir) {
        (Some(upper), Some(work)) => match rovl::workdir::prepare(work, upper) {
            Ok(w) => Some(w),
            Err(e) => {
                reporter.failed(&format!("rovl: {e}"));
                return Err(Reported);
            }
        },
        _ => None,
    };
    if let (Some(w), true) = (&workdir, cfg.volatile) {
        if let Err(e) = w.mark_volatile() {
            reporter.failed(&format!("rovl: cannot mark workdir volatile: {e}"));
            return Err(Reported);
        }
    }
    let mut cfg = cfg.clone();
    // Inside a user namespace trusted.* cannot be written: the kernel's
    // userxattr layout then, as rootless engines need it.
    if !cfg.userxattr && !rovl::workdir::trusted_xattrs_usable(workdir.as_ref()) {
        log::warn!(
            "trusted.* xattrs are not permitted here (user namespace or unprivileged): \
             using user.overlay.* (the kernel's userxattr option)"
        );
        options::use_userxattr(&mut cfg);
    }
    let cfg = &cfg;

    let session = match rovl::session::mount(cfg) {
        Ok(s) => s,
        // Unmounted (by umount or a signal) between mount(2) and the
        // kernel's INIT: the mount's life ended as any unmount ends it.
        Err(e) if e.kind() == io::ErrorKind::NotConnected => {
            log::info!(
                "{} was unmounted before it was ready",
                cfg.mountpoint.display()
            );
            reporter.ready();
            return Ok(());
        }
        Err(e) => {
            if let Some(w) = workdir {
                w.abandon();
            }
            reporter.failed(&format!(
                "rovl: cannot mount {}: {e}",
                cfg.mountpoint.display()
            ));
            return Err(Reported);
        }
    };
    let unmounter = session.unmounter();
    let mountpoint = cfg.mountpoint.clone();
    let spawned = std::thread::Builder::new()
        .name("rovl-signals".into())
        .spawn(move || signal_loop(set, unmounter, &mountpoint));
    if let Err(e) = spawned {
        // Dropping the session unmounts.
        drop(session);
        reporter.failed(&format!("rovl: cannot start signal thread: {e}"));
        return Err(Reported);
    }

    log::info!("mounted {} at {}", cfg.source, cfg.mountpoint.display());
    reporter.ready();
    let result = session.run();
    drop(workdir);
    match result {
        Ok(()) => {
            log::info!("unmounted {}", cfg.mountpoint.display());
            Ok(())
        }
        Err(e) => {
            log::error!("session ended with an error: {e}");
            Err(Reported)
        }
    }
}

/// Waits for SIGTERM/SIGINT/SIGHUP and unmounts; `session.run()` then returns.
fn signal_loop(set: libc::sigset_t, mut unmounter: rovl::session::Unmounter, mountpoint: &Path) {
    let mut signalled = false;
    loop {
        let mut sig = 0;
        // SAFETY: `set` is initialized and `sig` is written on success.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            continue;
        }
        if signalled {
            // Second signal while a lazy unmount waits for users: give up now;
            // closing /dev/fuse aborts the connection.
            log::warn!("signal {sig} again: exiting without waiting for open files");
            std::process::exit(1);
        }
        signalled = true;
        log::info!("signal {sig}: unmounting {}", mountpoint.display());
        if let Err(e) = unmounter.unmount() {
            // Busy: detach now, serve remaining users until they close.
            log::warn!("unmount {}: {e}; detaching lazily", mountpoint.display());
            if let Err(e) = unmounter.detach() {
                log::error!("lazy unmount {}: {e}", mountpoint.display());
            }
        }
    }
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn umount2(p: &Path, flags: libc::c_int) -> io::Result<()> {
    let c = cpath(p)?;
    // SAFETY: valid C string.
    if unsafe { libc::umount2(c.as_ptr(), flags) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn umount_cmd(mountpoint: &Path, lazy: bool) -> CmdResult {
    let cwd =
        std::env::current_dir().map_err(|e| format!("rovl: cannot get current directory: {e}"))?;
    let mut abs = cwd.join(mountpoint);
    // A symlink to the mountpoint names the mount, as util-linux takes it.
    if std::fs::symlink_metadata(&abs).is_ok_and(|m| m.file_type().is_symlink()) {
        abs = std::fs::canonicalize(&abs)
            .map_err(|e| format!("rovl: {}: {e}", mountpoint.display()))?;
    }
    // Resolve all but the last component: stat on a dead FUSE mount fails.
    let target = match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => std::fs::canonicalize(parent)
            .map(|p| p.join(name))
            .map_err(|e| format!("rovl: {}: {e}", mountpoint.display()))?,
        _ => std::fs::canonicalize(&abs)
            .map_err(|e| format!("rovl: {}: {e}", mountpoint.display()))?,
    };
    match rovl::mountinfo::top_at(&target).map(|m| m.map(|m| m.fstype)) {
        Ok(None) => return Err(format!("rovl: {}: not mounted", mountpoint.display())),
        Ok(Some(t)) if t != "fuse.rovl" => {
            return Err(format!(
                "rovl: {}: not a rovl mount (filesystem type {t}); use umount or fusermount3 -u",
                mountpoint.display()
            ))
        }
        Ok(Some(_)) => {}
        Err(e) => log::warn!("cannot read /proc/self/mountinfo: {e}"),
    }
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    match umount2(&target, flags) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => fusermount_unmount(&target, lazy),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(format!(
            "rovl: cannot unmount {}: busy (files open or a process's cwd inside; \
             see fuser -vm {0}, or detach now with rovl umount -l)",
            mountpoint.display()
        )),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            Err(format!("rovl: {}: not mounted", mountpoint.display()))
        }
        Err(e) => Err(format!(
            "rovl: cannot unmount {}: {e}",
            mountpoint.display()
        )),
    }
}

/// Unprivileged users unmount through the setuid helper.
fn fusermount_unmount(target: &Path, lazy: bool) -> CmdResult {
    rovl::session::helper_unmount(target, lazy).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => format!(
            "rovl: cannot unmount {}: permission denied (fusermount3: {e})",
            target.display()
        ),
        _ => format!("rovl: cannot unmount {}: {e}", target.display()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    fn forms(argv: &[&str]) -> (Option<&'static str>, Vec<String>, Vec<String>, bool, bool) {
        let cli = Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        let s = |v: Vec<OsString>| {
            v.into_iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        };
        match cli.cmd {
            Some(Cmd::Mount(m)) => (
                Some("mount"),
                m.options,
                s(m.args),
                m.common.foreground,
                m.common.debug,
            ),
            Some(Cmd::Umount(u)) => (
                Some("umount"),
                vec![],
                vec![u.mountpoint.display().to_string()],
                u.common.foreground,
                u.common.debug,
            ),
            None => (
                None,
                cli.options,
                s(cli.args),
                cli.common.foreground,
                cli.common.debug,
            ),
        }
    }

    #[test]
    fn invocation_forms() {
        assert_eq!(
            forms(&[
                "rovl",
                "mount",
                "-f",
                "-o",
                "lowerdir=a:b",
                "-o",
                "ro",
                "/m"
            ]),
            (
                Some("mount"),
                vec!["lowerdir=a:b".into(), "ro".into()],
                vec!["/m".into()],
                true,
                false
            )
        );
        assert_eq!(
            forms(&["rovl", "umount", "/m"]),
            (Some("umount"), vec![], vec!["/m".into()], false, false)
        );
        assert_eq!(
            forms(&["rovl", "src", "/m", "-o", "lowerdir=a:b", "-d"]),
            (
                None,
                vec!["lowerdir=a:b".into()],
                vec!["src".into(), "/m".into()],
                false,
                true
            )
        );
        assert_eq!(
            forms(&["rovl", "-o", "lowerdir=a:b", "/m", "-f"]),
            (
                None,
                vec!["lowerdir=a:b".into()],
                vec!["/m".into()],
                true,
                false
            )
        );
        assert_eq!(
            forms(&["rovl", "-olowerdir=a:b", "--foreground", "/m"]),
            (
                None,
                vec!["lowerdir=a:b".into()],
                vec!["/m".into()],
                true,
                false
            )
        );
        assert!(Cli::try_parse_from(["rovl", "mount", "/m"]).is_err());
        assert!(Cli::try_parse_from(["rovl", "-o", "x"]).is_err());
        assert!(Cli::try_parse_from(["rovl", "a", "b", "c"]).is_err());
        assert!(Cli::try_parse_from(["rovl", "umount"]).is_err());
    }

    #[test]
    fn umount_not_mounted() {
        let t = tempfile::tempdir().unwrap();
        let e = umount_cmd(t.path(), false).unwrap_err();
        assert!(e.contains("not mounted"), "{e}");
        let e = umount_cmd(&t.path().join("missing/dir"), false).unwrap_err();
        assert!(e.starts_with("rovl: "), "{e}");
    }
}
