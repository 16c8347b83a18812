//! Mounting: builds the filesystem, mounts `/dev/fuse` as `fuse.rovl`, and
//! runs the multi-threaded FUSE session.

use crate::fs::OverlayFs;
use crate::options::MountConfig;
use crate::sys;
use fuser::SessionACL;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// A mounted overlay. Serve it with [`Mounted::run`]; dropped unrun, it unmounts.
pub struct Mounted {
    session: Option<fuser::Session<OverlayFs>>,
    mountpoint: PathBuf,
}

/// Unmounts from another thread (a signal handler loop, say).
#[derive(Clone, Debug)]
pub struct Unmounter {
    mountpoint: PathBuf,
}

impl Unmounter {
    /// `umount2(mountpoint, 0)`; the session's `run` then returns.
    pub fn unmount(&mut self) -> io::Result<()> {
        umount(&self.mountpoint, 0)
    }
}

impl Mounted {
    pub fn unmounter(&self) -> Unmounter {
        Unmounter {
            mountpoint: self.mountpoint.clone(),
        }
    }

    /// Serves requests until the filesystem is unmounted.
    pub fn run(mut self) -> io::Result<()> {
        match self.session.take() {
            Some(s) => s.run(),
            None => Ok(()),
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.session.is_some() {
            let _ = umount(&self.mountpoint, libc::MNT_DETACH);
        }
    }
}

fn umount(p: &Path, flags: i32) -> io::Result<()> {
    let c = sys::cstr(p.as_os_str())?;
    if unsafe { libc::umount2(c.as_ptr(), flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// mount(2) flags for the generic options.
fn mount_flags(cfg: &MountConfig, read_only: bool) -> libc::c_ulong {
    let mut flags: libc::c_ulong = 0;
    if read_only {
        flags |= libc::MS_RDONLY;
    }
    for f in &cfg.vfs_flags {
        flags |= match f.as_str() {
            "nodev" => libc::MS_NODEV,
            "nosuid" => libc::MS_NOSUID,
            "noexec" => libc::MS_NOEXEC,
            "noatime" => libc::MS_NOATIME,
            "strictatime" => libc::MS_STRICTATIME,
            "lazytime" => libc::MS_LAZYTIME,
            "sync" => libc::MS_SYNCHRONOUS,
            "dirsync" => libc::MS_DIRSYNC,
            "ro" => libc::MS_RDONLY,
            _ => 0,
        };
    }
    flags
}

/// Mounts `cfg` at `cfg.mountpoint` and completes the FUSE handshake.
/// `workdir` must already be prepared (see [`crate::workdir`]).
pub fn mount(cfg: &MountConfig) -> io::Result<Mounted> {
    // Modes of new files come from the request, never from our umask.
    unsafe { libc::umask(0) };
    let fs = OverlayFs::new(cfg)?;
    let ovl = fs.ovl.clone();
    let read_only = ovl.read_only();

    let dev = CString::new("/dev/fuse").expect("no NUL");
    let raw = unsafe { libc::open(dev.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    let fuse = unsafe { OwnedFd::from_raw_fd(raw) };
    // Kernel overlayfs lets every user in and checks permissions itself:
    // allow_other plus default_permissions does the same over FUSE.
    let data = format!(
        "fd={},rootmode=40000,user_id={},group_id={},default_permissions,allow_other",
        fuse.as_raw_fd(),
        unsafe { libc::getuid() },
        unsafe { libc::getgid() },
    );
    let src = sys::cstr(std::ffi::OsStr::new(&cfg.source))?;
    let target = sys::cstr(cfg.mountpoint.as_os_str())?;
    let fstype = CString::new("fuse.rovl").expect("no NUL");
    let cdata = CString::new(data).expect("no NUL");
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            mount_flags(cfg, read_only),
            cdata.as_ptr().cast(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    ovl.init_upper_uuid();
    let mut mounted = Mounted {
        session: None,
        mountpoint: cfg.mountpoint.clone(),
    };
    let threads = if cfg.threads > 0 {
        cfg.threads
    } else {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .max(2)
    };
    let mut config = fuser::Config::default();
    config.n_threads = Some(threads);
    config.clone_fd = true;
    // The handshake happens here; on failure `mounted` unmounts on drop.
    let session = fuser::Session::from_fd(fs, fuse, SessionACL::All, config)?;
    let _ = ovl.notifier.set(session.notifier());
    mounted.session = Some(session);
    raise_readahead(&cfg.mountpoint);
    Ok(mounted)
}

/// FUSE mounts start with 128 KiB of readahead, and every read of a lower
/// file is a round trip through the daemon: 1 MiB (one request at most)
/// reads large files in a quarter of the requests. Best effort. The device
/// comes from mountinfo: a stat of the mount would wait for this daemon.
fn raise_readahead(mountpoint: &std::path::Path) {
    let Ok(Some(m)) = crate::mountinfo::top_at(mountpoint) else {
        return;
    };
    let path = format!("/sys/class/bdi/{}/read_ahead_kb", m.dev);
    if let Err(e) = std::fs::write(&path, "1024") {
        log::debug!("readahead not raised ({path}): {e}");
    }
}
