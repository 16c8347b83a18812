//! Mounting: builds the filesystem and the FUSE session for a config.

use crate::fs::OverlayFs;
use crate::options::MountConfig;
use fuser::{MountOption, SessionACL};
use std::io;

/// FUSE mount options for a config.
fn fuse_config(cfg: &MountConfig, read_only: bool) -> fuser::Config {
    let mut opts = vec![
        MountOption::FSName(cfg.source.clone()),
        MountOption::Subtype("rovl".into()),
        // Permission checks happen in the kernel against the attributes we report.
        MountOption::DefaultPermissions,
    ];
    if read_only {
        opts.push(MountOption::RO);
    }
    for f in &cfg.vfs_flags {
        let o = match f.as_str() {
            "dev" => MountOption::Dev,
            "nodev" => MountOption::NoDev,
            "suid" => MountOption::Suid,
            "nosuid" => MountOption::NoSuid,
            "exec" => MountOption::Exec,
            "noexec" => MountOption::NoExec,
            "atime" => MountOption::Atime,
            "noatime" => MountOption::NoAtime,
            "sync" => MountOption::Sync,
            "async" => MountOption::Async,
            "dirsync" => MountOption::DirSync,
            _ => continue,
        };
        if !opts.contains(&o) {
            opts.push(o);
        }
    }
    let threads = if cfg.threads > 0 {
        cfg.threads
    } else {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .max(2)
    };
    let mut c = fuser::Config::default();
    c.mount_options = opts;
    c.acl = if cfg.allow_other {
        SessionACL::All
    } else {
        SessionACL::RootAndOwner
    };
    c.n_threads = Some(threads);
    c.clone_fd = true;
    c
}

/// Mounts `cfg` at `cfg.mountpoint` and completes the FUSE handshake.
/// The caller runs the returned session (`Session::run`) to serve requests.
/// `workdir` must already be prepared (see [`crate::workdir`]).
pub fn mount(cfg: &MountConfig) -> io::Result<fuser::Session<OverlayFs>> {
    // Modes of new files come from the request, never from our umask.
    unsafe { libc::umask(0) };
    let fs = OverlayFs::new(cfg)?;
    let ovl = fs.ovl.clone();
    let read_only = ovl.read_only();
    let session = fuser::Session::new(fs, &cfg.mountpoint, &fuse_config(cfg, read_only))?;
    let _ = ovl.notifier.set(session.notifier());
    Ok(session)
}
