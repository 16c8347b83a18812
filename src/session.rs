//! Mounting: builds the filesystem, mounts `/dev/fuse` as `fuse.rovl`, and
//! runs the multi-threaded FUSE session.

use crate::error::{Error, StartResult};
use crate::fs::OverlayFs;
use crate::layer::Layers;
use crate::options::MountConfig;
use crate::overlay::Overlay;
use crate::sys;
use crate::workdir::WorkDir;
use fuser::SessionACL;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

/// A mounted overlay. Serve it with [`Mounted::run`]; dropped unrun, it unmounts.
pub struct Mounted {
    session: Option<fuser::Session<OverlayFs>>,
    ovl: std::sync::Arc<crate::overlay::Overlay>,
    /// Set by the session once it serves through io_uring.
    io_uring: std::sync::Arc<std::sync::atomic::AtomicBool>,
    mountpoint: PathBuf,
    /// Mounted by `fusermount3`: only it can unmount.
    helper: bool,
}

/// Unmounts from another thread (a signal handler loop, say).
#[derive(Clone, Debug)]
pub struct Unmounter {
    mountpoint: PathBuf,
    helper: bool,
}

impl Unmounter {
    /// Unmounts; the session's `run` then returns. Busy: `EBUSY`.
    pub fn unmount(&mut self) -> io::Result<()> {
        unmount(&self.mountpoint, false, self.helper)
    }

    /// Detaches now; the session serves open files until they close.
    pub fn detach(&mut self) -> io::Result<()> {
        unmount(&self.mountpoint, true, self.helper)
    }
}

impl Mounted {
    pub fn unmounter(&self) -> Unmounter {
        Unmounter {
            mountpoint: self.mountpoint.clone(),
            helper: self.helper,
        }
    }

    /// The counters and cache sizes now (`rovl stats`).
    pub fn stats(&self) -> impl Fn() -> crate::stats::Snapshot + Send + 'static {
        let ovl = self.ovl.clone();
        let io_uring = self.io_uring.clone();
        move || crate::stats::Snapshot::take(&ovl, io_uring.load(Ordering::Relaxed))
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
            let _ = unmount(&self.mountpoint, true, self.helper);
        }
    }
}

/// umount2, or `fusermount3 -u` for a mount the helper made.
fn unmount(p: &Path, lazy: bool, helper: bool) -> io::Result<()> {
    if !helper {
        let flags = if lazy { libc::MNT_DETACH } else { 0 };
        return sys::umount2(p, flags).map_err(Into::into);
    }
    helper_unmount(p, lazy)
}

/// `fusermount3 -u [-z]`: how users without CAP_SYS_ADMIN unmount. Its
/// first line of complaint becomes the error; EBUSY when busy.
pub fn helper_unmount(p: &Path, lazy: bool) -> io::Result<()> {
    let mut cmd = std::process::Command::new(FUSERMOUNT);
    cmd.arg("-u");
    if lazy {
        cmd.arg("-z");
    }
    let out = cmd.arg("--").arg(p).output()?;
    if out.status.success() {
        return Ok(());
    }
    let msg = String::from_utf8_lossy(&out.stderr);
    if msg.contains("busy") {
        return Err(io::Error::from_raw_os_error(libc::EBUSY));
    }
    let line = msg.lines().next().unwrap_or("failed").trim();
    Err(io::Error::other(line.to_string()))
}

/// The setuid mount helper of FUSE 3.
const FUSERMOUNT: &str = "fusermount3";

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

/// Mounts `cfg` at `cfg.mountpoint` over the layers and workdir
/// [`crate::prepare`] opened, and completes the FUSE handshake.
pub fn mount(cfg: &MountConfig, layers: Layers, workdir: Option<&WorkDir>) -> StartResult<Mounted> {
    // Modes of new files come from the request, never from our umask.
    sys::set_umask(0);
    let fs = OverlayFs::new(Overlay::new(cfg, layers, workdir)?);
    let cannot = |e: io::Error| Error::at("cannot mount", &cfg.mountpoint, e);
    let ovl = fs.ovl.clone();
    let read_only = ovl.read_only();
    // Written before the mount is visible, as the kernel does: nothing
    // changes in the layers once it is.
    let new_uuid = ovl.init_upper_uuid();
    let (fuse, helper) = mount_dev_fuse(cfg, read_only).inspect_err(|_| {
        if new_uuid {
            ovl.drop_upper_uuid();
        }
    })?;
    let mut mounted = Mounted {
        session: None,
        ovl: ovl.clone(),
        io_uring: Default::default(),
        mountpoint: cfg.mountpoint.clone(),
        helper,
    };
    let threads = if cfg.threads > 0 {
        cfg.threads
    } else {
        default_threads()
    };
    let mut config = fuser::Config::default();
    config.n_threads = Some(threads);
    config.clone_fd = true;
    // The handshake happens here; on failure `mounted` unmounts on drop.
    let session = fuser::Session::from_fd(fs, fuse, SessionACL::All, config).map_err(|e| {
        // fuser says "disconnected" without an errno: unmounted before INIT.
        match e.kind() {
            io::ErrorKind::NotConnected => cannot(io::Error::from_raw_os_error(libc::ENOTCONN)),
            _ => cannot(e),
        }
    })?;
    let _ = ovl.notifier.set(session.notifier());
    mounted.io_uring = session.io_uring_active();
    mounted.session = Some(session);
    raise_readahead(&cfg.mountpoint);
    Ok(mounted)
}

/// Worker threads unless `threads=` says: one per CPU, at least two.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .max(2)
}

/// Mounts `/dev/fuse` with mount(2) where we may (root, or mapped root
/// owning the mount namespace); else through `fusermount3`, as libfuse
/// does for unprivileged users. Returns the fd and whether the helper mounted.
fn mount_dev_fuse(cfg: &MountConfig, read_only: bool) -> StartResult<(OwnedFd, bool)> {
    let mp = &cfg.mountpoint;
    let cannot = |msg: String| Error::new(format!("cannot mount {}: {msg}", mp.display()));
    let src = sys::cstr(std::ffi::OsStr::new(&cfg.source))
        .map_err(|e| Error::at("cannot mount", mp, e))?;
    let target = sys::cstr(mp.as_os_str()).map_err(|e| Error::at("cannot mount", mp, e))?;
    let (uid, gid) = (sys::uid(), sys::gid());
    let context = selinux_context(cfg);
    let direct = sys::mount_fuse(
        &src,
        &target,
        c"fuse.rovl",
        mount_flags(cfg, read_only),
        // Kernel overlayfs lets every user in and checks permissions
        // itself: allow_other plus default_permissions does the same.
        |fd| {
            let data = format!(
                "fd={fd},rootmode=40000,user_id={uid},group_id={gid},default_permissions,allow_other{context}"
            );
            log::debug!("mount(2) fuse.rovl with {data}");
            data
        },
    );
    let e = match direct {
        Ok(fd) => return Ok((fd, false)),
        Err(e) => e,
    };
    match e.raw() {
        libc::EPERM | libc::EACCES => {}
        libc::ENOENT | libc::ENODEV | libc::ENXIO => {
            return Err(cannot(format!(
                "/dev/fuse is not available ({e}): load the fuse module (modprobe fuse), \
                 or give the container --device /dev/fuse"
            )))
        }
        _ => return Err(Error::at("cannot mount", mp, e)),
    }
    // Not permitted to mount: the setuid helper mounts for us.
    log::info!("mount(2) not permitted ({e}): mounting through {FUSERMOUNT}");
    let mut opts = vec![
        format!("fsname={}", escape_opt(&cfg.source)),
        "subtype=rovl".to_string(),
        "default_permissions".to_string(),
    ];
    if allow_other_permitted() {
        opts.push("allow_other".into());
    } else {
        log::info!("/etc/fuse.conf lacks user_allow_other: the mount is its owner's alone");
    }
    if read_only {
        opts.push("ro".into());
    }
    opts.extend(cfg.vfs_flags.iter().cloned());
    opts.extend(context.strip_prefix(',').map(str::to_string));
    match sys::fusermount(FUSERMOUNT, &opts.join(","), mp) {
        Ok(fd) => Ok((fd, true)),
        Err(h) if h.kind() == io::ErrorKind::NotFound => Err(cannot(format!(
            "{e}: mounting needs root, or {FUSERMOUNT} for unprivileged users \
             (apt-get install fuse3)"
        ))),
        Err(h) if e.raw() == libc::EACCES => Err(cannot(format!(
            "cannot open /dev/fuse ({e}) and {FUSERMOUNT} failed ({h}): \
             distributions ship /dev/fuse with mode 0666 (chmod 0666 /dev/fuse), or run as root"
        ))),
        Err(h) => Err(cannot(format!("{FUSERMOUNT}: {h}"))),
    }
}

/// `,context=...` for the mount data where SELinux is on; elsewhere the
/// kernel would refuse the option, so it is dropped with a log line.
fn selinux_context(cfg: &MountConfig) -> String {
    match &cfg.context {
        Some(c) if Path::new("/sys/fs/selinux/enforce").exists() => format!(",context={c}"),
        Some(c) => {
            log::info!("SELinux is not enabled: context={c} has no effect");
            String::new()
        }
        None => String::new(),
    }
}

/// Whether `fusermount3` lets this user pass `allow_other`.
fn allow_other_permitted() -> bool {
    if sys::uid() == 0 {
        return true;
    }
    std::fs::read_to_string("/etc/fuse.conf")
        .map(|c| c.lines().any(|l| l.trim() == "user_allow_other"))
        .unwrap_or(false)
}

/// Escapes `,` and `\` for the helper's option parser.
fn escape_opt(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, ',' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
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
