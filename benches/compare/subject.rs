//! The filesystems compared, and their mounts. A mount counts only once
//! /proc/self/mountinfo shows it at the mountpoint with the right type, so a
//! subject that fails to mount is never timed against the bare directory.

use crate::child::Mounted;
use rovl::mountinfo::MountInfo;
use std::fs::{self, File};
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long a FUSE daemon may take to mount, or to exit once unmounted.
const DAEMON_WAIT: Duration = Duration::from_secs(10);

pub enum Kind {
    /// `mount -t overlay`.
    Kernel,
    /// `fuse-overlayfs -f`, run as our child: 1.10 (C, libfuse) or 2.0 (Rust, fuser).
    FuseOverlayfs(PathBuf),
    /// `rovl mount -f`, run as our child, with these options added.
    Rovl(PathBuf, String),
    /// The merged view copied into a plain tmpfs directory, bind-mounted: the floor.
    Tmpfs,
    /// The same copy served from memory through rovl's FUSE session by this
    /// bench binary (`floor.rs`): the floor of any FUSE overlay.
    FuseFloor(PathBuf),
}

pub struct Subject {
    pub name: String,
    pub kind: Kind,
    /// This subject's own data copies, on the bench tmpfs.
    pub data: PathBuf,
    /// Where it is mounted (outside the tmpfs).
    pub mnt: PathBuf,
}

/// What to mount.
pub enum Source<'a> {
    /// Lower layers (top first) with a fresh upper and work dir under `run`.
    Overlay {
        lowers: &'a [PathBuf],
        run: &'a Path,
    },
    /// A directory to bind-mount or serve, with a fresh dir for logs under `run`.
    Flat { dir: &'a Path, run: &'a Path },
}

impl Subject {
    /// What mountinfo must show for this subject's mount.
    pub fn fstype(&self) -> &'static str {
        match self.kind {
            Kind::Kernel => "overlay",
            Kind::FuseOverlayfs(_) => "fuse.fuse-overlayfs (or fuse, source fuse-overlayfs)",
            Kind::Rovl(..) => "fuse.rovl",
            Kind::Tmpfs => "tmpfs",
            Kind::FuseFloor(_) => "fuse (source rovl-floor)",
        }
    }

    fn accepts(&self, e: &MountInfo) -> bool {
        match self.kind {
            Kind::Kernel => e.fstype == "overlay",
            // 1.10 names its type; 2.0 (fuser) mounts plain `fuse` with source `fuse-overlayfs`.
            Kind::FuseOverlayfs(_) => {
                e.fstype == "fuse.fuse-overlayfs"
                    || (e.fstype == "fuse" && e.source == "fuse-overlayfs")
            }
            Kind::Rovl(..) => e.fstype == "fuse.rovl",
            Kind::Tmpfs => e.fstype == "tmpfs",
            Kind::FuseFloor(_) => e.fstype.starts_with("fuse") && e.source == crate::floor::FSNAME,
        }
    }

    pub fn is_overlay(&self) -> bool {
        !matches!(self.kind, Kind::Tmpfs | Kind::FuseFloor(_))
    }

    pub fn has_daemon(&self) -> bool {
        matches!(self.kind, Kind::FuseOverlayfs(_) | Kind::Rovl(..))
    }

    /// Mounts `src` at this subject's mountpoint.
    pub fn mount(&self, src: Source) -> Result<Mount, String> {
        if mounted_type(&self.mnt).is_some() {
            return Err(format!("{} is already a mountpoint", self.mnt.display()));
        }
        let mut m = Mount {
            mnt: self.mnt.clone(),
            daemon: None,
        };
        match (&self.kind, src) {
            (Kind::FuseFloor(bin), Source::Flat { dir, run }) => {
                let mut c = Command::new(bin);
                c.arg(crate::floor::ARG).arg(dir);
                m.daemon = Some(spawn_daemon(&mut c, &self.mnt, run)?);
            }
            (Kind::Tmpfs, Source::Flat { dir, .. }) => {
                crate::data::run_quiet(Command::new("mount").arg("--bind").arg(dir).arg(&self.mnt))?
            }
            (Kind::Kernel, Source::Overlay { lowers, run }) => crate::data::run_quiet(
                Command::new("mount")
                    .args(["-t", "overlay", "overlay", "-o"])
                    .arg(overlay_opts(lowers, run)?)
                    .arg(&self.mnt),
            )?,
            (Kind::FuseOverlayfs(bin), Source::Overlay { lowers, run }) => {
                let mut c = Command::new(bin);
                c.arg("-f").arg("-o").arg(overlay_opts(lowers, run)?);
                m.daemon = Some(spawn_daemon(&mut c, &self.mnt, run)?);
            }
            (Kind::Rovl(bin, extra), Source::Overlay { lowers, run }) => {
                let mut opts = overlay_opts(lowers, run)?;
                if !extra.is_empty() {
                    opts = format!("{opts},{extra}");
                }
                let mut c = Command::new(bin);
                c.args(["mount", "-f", "-o"]).arg(opts);
                m.daemon = Some(spawn_daemon(&mut c, &self.mnt, run)?);
            }
            _ => return Err("internal: source does not fit the subject".into()),
        }
        let log = run_log(&m);
        m.wait_mounted(|e| self.accepts(e), self.fstype(), log)?;
        Ok(m)
    }
}

fn run_log(m: &Mount) -> Option<PathBuf> {
    m.daemon.as_ref().map(|d| d.log.clone())
}

/// `lowerdir=..,upperdir=..,workdir=..` with fresh upper and work dirs.
fn overlay_opts(lowers: &[PathBuf], run: &Path) -> Result<String, String> {
    let (upper, work) = (run.join("upper"), run.join("work"));
    for d in [&upper, &work] {
        fs::create_dir_all(d).map_err(|e| format!("creating {}: {e}", d.display()))?;
    }
    let lower: Vec<String> = lowers.iter().map(|l| l.display().to_string()).collect();
    Ok(format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        upper.display(),
        work.display()
    ))
}

/// A daemon we started; only it is ever signalled.
struct Daemon {
    child: Child,
    log: PathBuf,
}

fn spawn_daemon(c: &mut Command, mnt: &Path, run: &Path) -> Result<Daemon, String> {
    let log = run.join("daemon.log");
    let f = File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
    let f2 = f.try_clone().map_err(|e| e.to_string())?;
    let child = c
        .arg(mnt)
        .stdin(Stdio::null())
        .stdout(f)
        .stderr(f2)
        // Its own process group: a Ctrl-C reaches us, and we unmount it in order.
        .process_group(0)
        .spawn()
        .map_err(|e| format!("spawning {c:?}: {e}"))?;
    Ok(Daemon { child, log })
}

/// A live mount; dropping it unmounts (and stops its daemon).
pub struct Mount {
    pub mnt: PathBuf,
    daemon: Option<Daemon>,
}

impl Mount {
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(|d| d.child.id())
    }

    fn wait_mounted(
        &mut self,
        accepts: impl Fn(&MountInfo) -> bool,
        fstype: &str,
        log: Option<PathBuf>,
    ) -> Result<(), String> {
        let Some(d) = &mut self.daemon else {
            return match mounted(&self.mnt) {
                Some(e) if accepts(&e) => Ok(()),
                Some(e) => Err(wrong_type(&e, fstype)),
                None => Err("mount command succeeded but nothing is mounted".into()),
            };
        };
        match crate::child::wait_mounted(&mut d.child, &self.mnt, DAEMON_WAIT, |_| true) {
            Mounted::Up(e) if accepts(&e) => Ok(()),
            Mounted::Up(e) => Err(wrong_type(&e, fstype)),
            Mounted::Exited(st) => {
                let out = log.map(|l| fs::read_to_string(l).unwrap_or_default());
                Err(format!(
                    "daemon exited ({st}) before mounting: {}",
                    out.unwrap_or_default().trim()
                ))
            }
            Mounted::TimedOut => Err(format!("not mounted after {DAEMON_WAIT:?}")),
        }
    }

    /// Unmounts, waits for the daemon, and checks nothing is left.
    pub fn unmount(mut self) -> Result<(), String> {
        self.release()
    }

    fn release(&mut self) -> Result<(), String> {
        let Some(mut d) = self.daemon.take() else {
            if mounted_type(&self.mnt).is_some() {
                return umount_retry(&self.mnt)
                    .map_err(|e| format!("umount {}: {e}", self.mnt.display()));
            }
            return Ok(());
        };
        match crate::child::stop(&mut d.child, &self.mnt, DAEMON_WAIT) {
            (Err(e), ..) => Err(format!("umount {}: {e}", self.mnt.display())),
            (Ok(()), _, false) => Err("daemon did not exit after unmount; killed".into()),
            (Ok(()), st, true) if !st.success() => Err(format!("daemon exited with {st}")),
            (Ok(()), ..) => Ok(()),
        }
    }
}

fn wrong_type(e: &MountInfo, fstype: &str) -> String {
    format!(
        "mounted as {} (source {}), expected {fstype}",
        e.fstype, e.source
    )
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            eprintln!("compare: {e}");
        }
    }
}

/// `umount2`, retried while busy, lazily as a last resort.
pub fn umount_retry(p: &Path) -> io::Result<()> {
    rovl::mountinfo::unmount_retry(p)
}

/// The topmost mount at `p` (canonical), if any.
pub fn mounted(p: &Path) -> Option<MountInfo> {
    rovl::mountinfo::top_at(p).ok().flatten()
}

/// The type of the topmost mount at `p` (canonical), if any.
pub fn mounted_type(p: &Path) -> Option<String> {
    mounted(p).map(|e| e.fstype)
}
