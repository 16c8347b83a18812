//! Name lookup across layers (the kernel's `namei.c`): the top layer wins for
//! non-directories, directories merge down to the first opaque one, and
//! whiteouts hide what lies below.

use crate::inode::{Inode, Key};
use crate::layer::LayerIdx;
use crate::overlay::Overlay;
use crate::sys::{self, Stat};
use std::ffi::{CStr, OsStr};
use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;

/// What a name resolves to in a merged directory.
pub struct Found {
    /// Real stat of the top layer's object.
    pub st: Stat,
    /// Layers holding it, top-down (several only for a merged directory).
    pub layers: Vec<LayerIdx>,
}

impl Overlay {
    /// Resolves `name` in `parent` without touching the inode table.
    pub fn find(&self, parent: &Arc<Inode>, name: &CStr) -> io::Result<Option<Found>> {
        let player = parent.layers();
        let mut found: Option<Found> = None;
        for (i, &l) in player.iter().enumerate() {
            let pfd = match self.dir_fd(parent, l) {
                Ok(fd) => fd,
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {
                    continue
                }
                Err(e) => return Err(e),
            };
            let st = match sys::fstatat(pfd.as_fd(), name) {
                Ok(st) => st,
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {
                    continue
                }
                Err(e) => return Err(e),
            };
            if sys::is_whiteout(&st) {
                break;
            }
            let is_dir = sys::is_dir(st.st_mode);
            let last = i + 1 == player.len();
            match &mut found {
                None => {
                    found = Some(Found {
                        st,
                        layers: vec![l],
                    });
                    if !is_dir || last || self.is_opaque_at(pfd.as_fd(), name) {
                        break;
                    }
                }
                Some(f) => {
                    // A non-directory below a directory ends the merge.
                    if !is_dir {
                        break;
                    }
                    f.layers.push(l);
                    if last || self.is_opaque_at(pfd.as_fd(), name) {
                        break;
                    }
                }
            }
        }
        Ok(found)
    }

    /// Whether a directory entry carries the opaque xattr.
    pub fn is_opaque_at(&self, dir: std::os::fd::BorrowedFd<'_>, name: &CStr) -> bool {
        match sys::openat(dir, name, libc::O_PATH | libc::O_DIRECTORY, 0) {
            Ok(fd) => self.is_opaque_fd(fd.as_fd()),
            Err(_) => false,
        }
    }

    pub fn is_opaque_fd(&self, fd: std::os::fd::BorrowedFd<'_>) -> bool {
        matches!(sys::getxattr(fd, &self.xattr_name("opaque")), Ok(v) if v == b"y")
    }

    /// Whether `name` is visible in a lower layer of `parent`: removing it
    /// from the upper layer then needs a whiteout.
    pub fn lower_positive(&self, parent: &Arc<Inode>, name: &CStr) -> io::Result<bool> {
        for l in parent.layers() {
            if self.layers.is_upper(l) {
                continue;
            }
            let pfd = match self.dir_fd(parent, l) {
                Ok(fd) => fd,
                Err(_) => continue,
            };
            match sys::fstatat(pfd.as_fd(), name) {
                Ok(st) => return Ok(!sys::is_whiteout(&st)),
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }

    /// The key and reported inode number for a found object.
    pub fn key_of(&self, parent: &Arc<Inode>, name: &OsStr, f: &Found) -> (Key, u64) {
        let top = f.layers[0];
        let dev = self.layers.get(top).dev;
        let real = f.st.st_ino;
        if self.layers.is_upper(top) {
            let ino = self.copied_inos.get(&real).map(|v| *v).unwrap_or(real);
            return (Key::Real(dev, real), ino);
        }
        let is_dir = sys::is_dir(f.st.st_mode);
        if !is_dir && f.st.st_nlink > 1 && self.layers.has_upper {
            // Copy-up splits lower hard links: one node per name.
            return (Key::Name(parent.nodeid, name.to_os_string()), real);
        }
        (Key::Real(dev, real), real)
    }

    /// The FUSE lookup: resolves and counts a kernel reference.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> io::Result<(Arc<Inode>, Stat)> {
        let parent = self.node(parent)?;
        if !parent.is_dir() {
            return Err(sys::err(libc::ENOTDIR));
        }
        let c = Self::check_name(name)?;
        let f = self
            .find(&parent, &c)?
            .ok_or_else(|| sys::err(libc::ENOENT))?;
        if f.layers.len() > 1 && self.layers.is_upper(f.layers[0]) && !self.read_only() {
            self.fix_origin(&parent, &c, f.layers[1]);
        }
        Ok(self.instantiate(&parent, name, f))
    }

    /// As the kernel's `ovl_fix_origin`: a merged dir whose upper lacks an
    /// origin gets that of its first lower dir, and its parent turns impure.
    fn fix_origin(&self, parent: &Arc<Inode>, name: &CStr, lower: LayerIdx) {
        let Ok(ufd) = self.dir_fd(parent, crate::layer::UPPER) else {
            return;
        };
        let Ok(upper) = sys::openat(ufd.as_fd(), name, libc::O_PATH | libc::O_DIRECTORY, 0) else {
            return;
        };
        let origin = self.xattr_name("origin");
        if sys::getxattr(upper.as_fd(), &origin).is_ok() {
            return;
        }
        let Ok(lfd) = self.dir_fd(parent, lower) else {
            return;
        };
        let Ok(ldir) = sys::openat(lfd.as_fd(), name, libc::O_PATH | libc::O_DIRECTORY, 0) else {
            return;
        };
        if let Some(fh) = self.encode_fh(ldir.as_fd(), false) {
            if sys::setxattr(upper.as_fd(), &origin, &fh, 0).is_ok() {
                self.set_impure(parent, ufd.as_fd());
            }
        }
    }

    /// Enters a found object into the inode table.
    pub fn instantiate(&self, parent: &Arc<Inode>, name: &OsStr, f: Found) -> (Arc<Inode>, Stat) {
        let (key, ino) = self.key_of(parent, name, &f);
        let node = self.table.lookup(
            key,
            sys::mode_type(f.st.st_mode),
            f.layers,
            ino,
            parent,
            &name.to_os_string(),
        );
        (node, f.st)
    }
}
