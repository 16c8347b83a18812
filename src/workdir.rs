//! Workdir preparation, as the kernel does it at mount (`W/work`).
//!
//! The kernel marks upper and work dirs "in use" so two overlays cannot share
//! them; rovl takes `flock`s instead, held for the life of [`WorkDir`].
//! Leftovers in `W/work` come from interrupted copy-ups and are removed
//! without following symlinks.

use crate::error::{Errno, Error, Result, StartResult};
use crate::sys;
use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

/// Name of the scratch dir inside the workdir (the kernel's `OVL_WORKDIR_NAME`).
pub const WORK_NAME: &str = "work";

/// A prepared workdir: `W/work` is fresh and empty, and both W and the upper
/// dir are locked against other rovl mounts until this is dropped.
#[derive(Debug)]
pub struct WorkDir {
    work: OwnedFd,
    /// W itself; holds the workdir lock.
    base: OwnedFd,
    /// The upper dir's root; holds the upperdir lock.
    upper: OwnedFd,
    /// `W/work` did not exist before: a failed mount removes it again.
    created: bool,
}

impl WorkDir {
    /// `W/work`, where copy-ups are built before being renamed into place.
    pub fn work_fd(&self) -> BorrowedFd<'_> {
        self.work.as_fd()
    }

    /// The workdir W itself (the kernel also keeps `W/index` here).
    pub fn base_fd(&self) -> BorrowedFd<'_> {
        self.base.as_fd()
    }

    /// The upper layer's root, opened (and locked) with the workdir.
    pub fn upper_fd(&self) -> BorrowedFd<'_> {
        self.upper.as_fd()
    }

    /// Undoes what preparing made, for a mount that failed: a `W/work`
    /// that was not there before goes again.
    pub fn abandon(self) {
        if self.created {
            let _ = remove_entry(self.base.as_fd(), c"work");
        }
    }

    /// Creates `W/work/incompat/volatile` as the kernel does for `volatile`
    /// mounts; it makes later mounts of this workdir fail until removed.
    pub fn mark_volatile(&self) -> StartResult<()> {
        let incompat = c"incompat";
        mkdir_if_missing(self.work.as_fd(), incompat)
            .and_then(|()| open_dir_force(self.work.as_fd(), incompat))
            .and_then(|dir| mkdir_if_missing(dir.as_fd(), c"volatile"))
            .map_err(|e| Error::because("cannot mark workdir volatile", e))
    }
}

/// Opens a layer root by path (following symlinks, like the kernel's
/// lookup); readable, since `flock` needs more than `O_PATH`.
fn open_root(what: &str, p: &Path) -> StartResult<OwnedFd> {
    sys::open_path(p, libc::O_RDONLY | libc::O_DIRECTORY).map_err(|e| Error::at(what, p, e))
}

fn lock(fd: BorrowedFd<'_>, what: &str, p: &Path) -> StartResult<()> {
    // A daemon whose mount was just unmounted may take a moment to exit and
    // drop its lock: give it up to two seconds before calling the dir busy.
    let mut tries = 40;
    let e = loop {
        let e = match sys::flock(fd, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        tries -= 1;
        if e.raw() != libc::EWOULDBLOCK || tries == 0 {
            break e;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    if e.raw() == libc::EWOULDBLOCK {
        Err(Error::busy(format!(
            "{what} is busy: {} is in use by another mount",
            p.display()
        )))
    } else {
        Err(Error::at(what, p, e))
    }
}

/// Opens a directory entry of `dir` for reading, without following a symlink.
fn open_dir(dir: BorrowedFd<'_>, name: &CStr) -> Result<OwnedFd> {
    sys::openat(dir, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)
}

/// `lstat` relative to `dir`; `None` if the entry does not exist.
pub(crate) fn lstat_at(dir: BorrowedFd<'_>, name: &CStr) -> Result<Option<libc::stat>> {
    match sys::fstatat(dir, name) {
        Ok(st) => Ok(Some(st)),
        Err(e) if e.raw() == libc::ENOENT => Ok(None),
        Err(e) => Err(e),
    }
}

fn mkdir_if_missing(dir: BorrowedFd<'_>, name: &CStr) -> Result<()> {
    // Mode 0, like the kernel's work dirs (`d---------`).
    match sys::mkdirat(dir, name, 0) {
        Err(e) if e.raw() == libc::EEXIST => Ok(()),
        r => r,
    }
}

/// Lets us (not root) enter a mode-0 dir we left behind; root never needs it.
fn make_accessible(parent: BorrowedFd<'_>, name: &CStr) -> Result<()> {
    // An O_PATH|O_NOFOLLOW fd pins the entry, so a swapped-in symlink is never chmod'ed through.
    let fd = sys::openat(parent, name, libc::O_PATH | libc::O_DIRECTORY, 0)?;
    sys::fchmod_any(fd.as_fd(), 0o700)
}

/// [`open_dir`], making a mode-0 dir accessible first if we lack the capability.
fn open_dir_force(parent: BorrowedFd<'_>, name: &CStr) -> Result<OwnedFd> {
    match open_dir(parent, name) {
        Err(e) if e.raw() == libc::EACCES => {
            make_accessible(parent, name)?;
            open_dir(parent, name)
        }
        r => r,
    }
}

/// Names in a freshly opened `dir`, except `.` and `..`.
fn list_dir(dir: &OwnedFd) -> Result<Vec<CString>> {
    sys::read_dir_all(dir)?
        .into_iter()
        .map(|e| sys::cstr(&e.name))
        .collect()
}

/// Removes everything below a freshly opened `dir`, never following symlinks.
pub(crate) fn empty_dir(dir: &OwnedFd) -> Result<()> {
    for name in list_dir(dir)? {
        remove_entry(dir.as_fd(), &name)?;
    }
    Ok(())
}

/// Removes `name` in `parent` (recursively if a directory); missing is fine.
pub(crate) fn remove_entry(parent: BorrowedFd<'_>, name: &CStr) -> Result<()> {
    let Some(st) = lstat_at(parent, name)? else {
        return Ok(());
    };
    if sys::is_dir(st.st_mode) {
        let sub = open_dir_force(parent, name)?;
        if let Err(e) = empty_dir(&sub) {
            if e.raw() != libc::EACCES {
                return Err(e);
            }
            // Opened without read/write permission (mode 0, not root).
            drop(sub);
            make_accessible(parent, name)?;
            empty_dir(&open_dir(parent, name)?)?;
        }
        sys::unlinkat(parent, name, libc::AT_REMOVEDIR)
    } else {
        sys::unlinkat(parent, name, 0)
    }
}

/// The kernel refuses a workdir whose `work/incompat/` has entries
/// (e.g. `volatile` from an unclean volatile mount); checked before removing anything.
fn check_incompat(base: BorrowedFd<'_>, workdir: &Path) -> StartResult<()> {
    let cannot = |e: Errno| Error::at("cannot read", &workdir.join(WORK_NAME), e);
    let Some(st) = lstat_at(base, c"work").map_err(cannot)? else {
        return Ok(());
    };
    if !sys::is_dir(st.st_mode) {
        return Ok(());
    }
    let work = open_dir_force(base, c"work").map_err(cannot)?;
    let Some(st) = lstat_at(work.as_fd(), c"incompat").map_err(cannot)? else {
        return Ok(());
    };
    if !sys::is_dir(st.st_mode) {
        return Ok(());
    }
    let incompat = open_dir_force(work.as_fd(), c"incompat").map_err(cannot)?;
    if let Some(feature) = list_dir(&incompat).map_err(cannot)?.first() {
        return Err(Error::new(format!(
                "workdir {}: overlay with incompat feature '{}' cannot be mounted (remove {}/work to reuse it)",
                workdir.display(),
                feature.to_string_lossy(),
                workdir.display()
        )));
    }
    Ok(())
}

/// Locks `workdir` and `upperdir` (failing with `ResourceBusy` if another mount
/// holds them), then recreates `W/work` empty with mode 0000 as the kernel does.
/// Call only after [`crate::options::validate`] passed.
pub fn prepare(workdir: &Path, upperdir: &Path) -> StartResult<WorkDir> {
    let base = open_root("workdir", workdir)?;
    lock(base.as_fd(), "workdir", workdir)?;
    let upper = open_root("upperdir", upperdir)?;
    lock(upper.as_fd(), "upperdir", upperdir)?;

    check_incompat(base.as_fd(), workdir)?;
    let created = lstat_at(base.as_fd(), c"work")
        .map_err(|e| Error::at("cannot stat", &workdir.join(WORK_NAME), e))?
        .is_none();
    remove_entry(base.as_fd(), c"work")
        .map_err(|e| Error::at("cannot clean up workdir", &workdir.join(WORK_NAME), e))?;
    mkdir_if_missing(base.as_fd(), c"work")
        .map_err(|e| Error::at("cannot create", &workdir.join(WORK_NAME), e))?;
    // Without CAP_DAC_OVERRIDE a mode-0 dir would be unusable: then it gets 0700.
    let work = open_dir_force(base.as_fd(), c"work")
        .map_err(|e| Error::at("cannot open", &workdir.join(WORK_NAME), e))?;
    Ok(WorkDir {
        work,
        base,
        upper,
        created,
    })
}

/// Whether `trusted.*` xattrs can be used, as the kernel tests at mount
/// (`ovl_make_workdir`): set and removed on `W/work`. Without an upper
/// layer, whether this process is outside any user namespace.
pub fn trusted_xattrs_usable(work: Option<&WorkDir>) -> bool {
    let Some(w) = work else {
        return std::fs::read_to_string("/proc/self/uid_map")
            .map(|m| m.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"])
            .unwrap_or(true);
    };
    let name = c"trusted.overlay.rovl-probe";
    match sys::setxattr(w.work.as_fd(), name, b"1", 0) {
        Ok(()) => {
            let _ = sys::removexattr(w.work.as_fd(), name);
            true
        }
        // An upper fs without xattrs at all fails either way.
        Err(e) => !matches!(e.raw(), libc::EPERM | libc::EACCES),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn dirs() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let u = t.path().join("u");
        let w = t.path().join("w");
        fs::create_dir(&u).unwrap();
        fs::create_dir(&w).unwrap();
        (t, u, w)
    }

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn creates_work_mode_0() {
        let (_t, u, w) = dirs();
        let wd = prepare(&w, &u).unwrap();
        let work = w.join(WORK_NAME);
        assert!(work.is_dir());
        if sys::euid() == 0 {
            assert_eq!(mode(&work), 0);
        }
        // The fd really is W/work.
        let st_fd = sys::fstat(wd.work_fd()).unwrap().st_ino;
        use std::os::unix::fs::MetadataExt;
        assert_eq!(st_fd, fs::metadata(&work).unwrap().ino());
        assert_eq!(fs::read_dir(&u).unwrap().count(), 0);
    }

    #[test]
    fn removes_leftovers_without_following_symlinks() {
        let (t, u, w) = dirs();
        let outside = t.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("keep"), b"x").unwrap();
        let work = w.join(WORK_NAME);
        fs::create_dir_all(work.join("#1/deep/er")).unwrap();
        fs::write(work.join("#1/deep/er/f"), b"x").unwrap();
        fs::write(work.join("#2"), b"x").unwrap();
        symlink(&outside, work.join("#1/link")).unwrap();
        symlink(&outside, work.join("#3")).unwrap();
        // A locked-down leftover dir, as the kernel would leave it.
        fs::create_dir(work.join("#4")).unwrap();
        fs::write(work.join("#4/g"), b"x").unwrap();
        fs::set_permissions(work.join("#4"), fs::Permissions::from_mode(0o000)).unwrap();
        fs::set_permissions(&work, fs::Permissions::from_mode(0o000)).unwrap();

        let _wd = prepare(&w, &u).unwrap();
        assert_eq!(fs::read_dir(&work).unwrap().count(), 0);
        assert!(outside.join("keep").exists());
        assert!(outside.is_dir());
    }

    #[test]
    fn work_as_symlink_is_replaced_not_followed() {
        let (t, u, w) = dirs();
        let outside = t.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("keep"), b"x").unwrap();
        symlink(&outside, w.join(WORK_NAME)).unwrap();
        let _wd = prepare(&w, &u).unwrap();
        assert!(fs::symlink_metadata(w.join(WORK_NAME)).unwrap().is_dir());
        assert!(outside.join("keep").exists());
    }

    #[test]
    fn busy_detection() {
        let (t, u, w) = dirs();
        let wd = prepare(&w, &u).unwrap();

        // Same workdir, another upper.
        let u2 = t.path().join("u2");
        fs::create_dir(&u2).unwrap();
        let e = prepare(&w, &u2).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EBUSY));
        assert!(e.to_string().contains("workdir is busy"), "{e}");

        // Same upper, another workdir.
        let w2 = t.path().join("w2");
        fs::create_dir(&w2).unwrap();
        let e = prepare(&w2, &u).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EBUSY));
        assert!(e.to_string().contains("upperdir is busy"), "{e}");
        // The failed attempt changed nothing and released the workdir lock.
        assert!(!w2.join(WORK_NAME).exists());
        assert!(w.join(WORK_NAME).is_dir());

        drop(wd);
        prepare(&w2, &u).unwrap();
    }

    #[test]
    fn busy_leaves_leftovers_alone() {
        let (_t, u, w) = dirs();
        let wd = prepare(&w, &u).unwrap();
        let marker = w.join(WORK_NAME).join("in-flight");
        if fs::write(&marker, b"x").is_ok() {
            assert!(prepare(&w, &u).is_err());
            assert!(marker.exists());
        }
        drop(wd);
    }

    #[test]
    fn incompat_volatile_refused() {
        let (_t, u, w) = dirs();
        let wd = prepare(&w, &u).unwrap();
        wd.mark_volatile().unwrap();
        drop(wd);
        let e = prepare(&w, &u).unwrap_err();
        assert!(e.to_string().contains("incompat feature 'volatile'"), "{e}");
        // Nothing was removed.
        assert!(fs::symlink_metadata(w.join("work/incompat/volatile")).is_ok());
    }

    #[test]
    fn missing_dirs_are_errors() {
        let (t, u, _w) = dirs();
        let e = prepare(&t.path().join("nope"), &u).unwrap_err();
        assert!(e.to_string().contains("workdir"), "{e}");
    }
}
