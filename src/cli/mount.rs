//! `rovl mount` and its two other forms: parse and check the options,
//! fork the daemon, mount, serve until unmounted.

use super::args::Common;
use super::daemon::{self, Reporter};
use super::{init_logger, open_log_file, CmdResult};
use rovl::options::{self, MountConfig};
use rovl::sys::{umount2, SigSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

pub fn mount_cmd(mut common: Common, opts: &[String], mut args: Vec<OsString>) -> CmdResult {
    if opts.is_empty() {
        return Err(format!(
            "rovl: no mount options (-o) given\n{}",
            super::args::short_usage()
        ));
    }
    let opts = options::split_options(&opts.join(","));
    // fuse-overlayfs' `-o debug` is `-d`, and needs the logger first.
    common.debug |= opts.iter().any(|o| o == "debug");
    init_logger(&common);
    let daemon = !(common.foreground || common.debug);
    if let Some(path) = &common.log_file {
        if daemon {
            // Checked now, so `rovl mount` itself reports a bad path; the
            // daemon opens it after the fork (which closes inherited fds).
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("rovl: --log-file {}: {e}", path.display()))?;
        } else {
            open_log_file(path)?;
        }
    }
    let mountpoint = PathBuf::from(args.pop().expect("clap requires MERGED"));
    let source = args.pop().map(|s| s.to_string_lossy().into_owned());
    let cwd =
        std::env::current_dir().map_err(|e| format!("rovl: cannot get current directory: {e}"))?;
    let cfg =
        options::parse(&opts, &mountpoint, source.as_deref(), &cwd).map_err(|e| e.to_string())?;
    clear_dead_mount(&cfg.mountpoint)?;
    options::validate(&cfg).map_err(|e| e.to_string())?;
    // allow_other and default_permissions are always on (see session).
    log::debug!("mount config: {cfg:?}");

    // Fork before any thread exists.
    let reporter = if !daemon {
        Reporter::foreground()
    } else {
        let r = daemon::daemonize().map_err(|e| format!("rovl: cannot fork: {e}"))?;
        if let Some(path) = &common.log_file {
            if let Err(msg) = open_log_file(path) {
                r.failed(&msg);
                return Err(String::new());
            }
        }
        r
    };
    match serve(&cfg, &opts, reporter) {
        Ok(()) => Ok(()),
        Err(Reported) => Err(String::new()),
    }
}

/// The failure was already sent to the reporter.
struct Reported;

fn signal_set() -> SigSet {
    SigSet::new(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGUSR1])
}

/// Mounts and serves until unmounted. Runs in the daemon (or the foreground process).
fn serve(cfg: &MountConfig, opts: &[String], reporter: Reporter) -> Result<(), Reported> {
    // Requests carry the caller's final modes; our own umask must not alter them.
    rovl::sys::set_umask(0);

    // Blocked before any thread starts, so every thread inherits the mask and
    // only the signal thread (sigwait) receives them.
    let set = signal_set();
    if let Err(e) = set.block() {
        reporter.failed(&format!("rovl: cannot block signals: {e}"));
        return Err(Reported);
    }

    // Every dir the options name, opened once. The workdir is held until
    // exit: it keeps other mounts off this upper/workdir.
    let rovl::prepare::Prepared { layers, workdir } = match rovl::prepare::prepare(cfg) {
        Ok(p) => p,
        Err(e) => {
            reporter.failed(&e.to_string());
            return Err(Reported);
        }
    };
    if let (Some(w), true) = (&workdir, cfg.volatile) {
        if let Err(e) = w.mark_volatile() {
            reporter.failed(&e.to_string());
            return Err(Reported);
        }
    }
    let mut cfg = cfg.clone();
    // Inside a user namespace trusted.* cannot be written: the kernel's
    // userxattr layout then, as rootless engines need it.
    let switched = !cfg.userxattr && !rovl::workdir::trusted_xattrs_usable(workdir.as_ref());
    if switched {
        options::use_userxattr(&mut cfg);
    }
    let cfg = &cfg;

    let session = match rovl::session::mount(cfg, layers, workdir.as_ref()) {
        Ok(s) => s,
        // Unmounted (by umount or a signal) between mount(2) and the
        // kernel's INIT: the mount's life ended as any unmount ends it.
        Err(e) if e.errno() == Some(libc::ENOTCONN) => {
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
            reporter.failed(&e.to_string());
            return Err(Reported);
        }
    };
    let unmounter = session.unmounter();
    let stats = session.stats();
    let mountpoint = cfg.mountpoint.clone();
    let spawned = std::thread::Builder::new()
        .name("rovl-signals".into())
        .spawn(move || signal_loop(set, unmounter, &mountpoint, stats));
    if let Err(e) = spawned {
        // Dropping the session unmounts.
        drop(session);
        reporter.failed(&format!("rovl: cannot start signal thread: {e}"));
        return Err(Reported);
    }

    if switched {
        // Said once the mount is up: a failure stays one line.
        log::warn!(
            "trusted.* xattrs are not permitted here (user namespace or unprivileged): \
             using user.overlay.* (the kernel's userxattr option)"
        );
    }
    log::info!("mounted {} at {}", cfg.source, cfg.mountpoint.display());
    let record = save_record(cfg, opts);
    reporter.ready();
    let result = session.run();
    if let Some(p) = record {
        rovl::registry::Record::remove(&p);
    }
    drop(workdir);
    match result {
        // The kernel may end the connection with ECONNABORTED rather than
        // ENODEV as the mount goes (fuser only treats ENODEV as the end).
        Ok(()) => {
            log::info!("unmounted {}", cfg.mountpoint.display());
            Ok(())
        }
        Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => {
            log::info!("unmounted {} (connection ended)", cfg.mountpoint.display());
            Ok(())
        }
        Err(e) => {
            log::error!("session ended with an error: {e}");
            Err(Reported)
        }
    }
}

/// Waits for SIGTERM/SIGINT/SIGHUP and unmounts (`session.run()` then
/// returns); SIGUSR1 writes the counters for `rovl stats`.
fn signal_loop(
    set: SigSet,
    mut unmounter: rovl::session::Unmounter,
    mountpoint: &Path,
    stats: impl Fn() -> rovl::stats::Snapshot,
) {
    let mut signalled = false;
    loop {
        let Ok(sig) = set.wait() else {
            continue;
        };
        if sig == libc::SIGUSR1 {
            write_stats(mountpoint, &stats());
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

/// The counters, to the log and to the runtime dir for `rovl stats`.
fn write_stats(mountpoint: &Path, snap: &rovl::stats::Snapshot) {
    let total: u64 = snap.requests.values().sum();
    log::info!(
        "stats: {total} requests, {} copy-ups ({} bytes), {} nodes",
        snap.copy_ups,
        snap.copy_up_bytes,
        snap.nodes
    );
    let dev = rovl::mountinfo::top_at(mountpoint)
        .ok()
        .flatten()
        .map(|m| m.dev);
    if let Some(dev) = dev {
        if let Err(e) = rovl::registry::save_stats(&dev, snap) {
            log::warn!("cannot write the stats for rovl stats: {e}");
        }
    }
}

/// Leaves a record of this mount for `rovl list` (see `rovl::registry`);
/// its path, to remove at exit. A failure only costs `rovl list` detail.
fn save_record(cfg: &MountConfig, opts: &[String]) -> Option<PathBuf> {
    let dev = rovl::mountinfo::top_at(&cfg.mountpoint).ok().flatten()?.dev;
    match rovl::registry::Record::new(cfg, dev, opts).save() {
        Ok(p) => Some(p),
        Err(e) => {
            log::warn!("cannot record the mount for rovl list: {e}");
            None
        }
    }
}

/// A mount whose daemon died answers ENOTCONN to everything, so mounting
/// over it fails. A dead rovl mount there is detached first; another
/// filesystem's is left to its owner, with what to do.
fn clear_dead_mount(mountpoint: &Path) -> CmdResult {
    let dead =
        matches!(std::fs::metadata(mountpoint), Err(e) if e.raw_os_error() == Some(libc::ENOTCONN));
    if !dead {
        return Ok(());
    }
    let fstype = rovl::mountinfo::top_at(mountpoint)
        .ok()
        .flatten()
        .map(|m| m.fstype)
        .unwrap_or_default();
    if fstype != "fuse.rovl" {
        return Err(format!(
            "rovl: {0}: a dead FUSE mount ({fstype}) is there (Transport endpoint is not \
             connected): unmount it first (fusermount3 -u {0}, or umount -l {0})",
            mountpoint.display()
        ));
    }
    let r = match umount2(mountpoint, libc::MNT_DETACH) {
        Err(e) if e.raw() == libc::EPERM => rovl::session::helper_unmount(mountpoint, true),
        r => r.map_err(Into::into),
    };
    r.map_err(|e| {
        format!(
            "rovl: {0}: a dead rovl mount is there and cannot be detached ({e}): \
             rovl umount -l {0}",
            mountpoint.display()
        )
    })?;
    log::warn!(
        "{}: detached a dead rovl mount (its daemon had exited)",
        mountpoint.display()
    );
    Ok(())
}
