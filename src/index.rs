//! The inodes index (`index=on`, the kernel's `W/index`): copy-up of a
//! lower hard link keeps its names linked. The first copy-up puts the copy
//! in `W/index/<hex of the lower file handle>` and links it at the name; a
//! later copy-up of another name only links the index entry there ("link
//! up"). The link count users see is kept in `trusted.overlay.nlink`,
//! relative to the index inode's own count (`U+N` or `U-N`), since the
//! index entry and the lower names that are not yet linked up skew it.

use crate::error::{Error, Result, StartResult};
use crate::inode::Inode;
use crate::overlay::{Overlay, Ox};
use crate::sys::{self, Stat};
use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

impl Overlay {
    /// As the kernel's mount with `index=on`: the upper root records the
    /// first lower root as its origin and `W/index` records the upper root,
    /// so the index is never used with other layers. Checks come before
    /// any change.
    pub(crate) fn open_index(&self, workdir: BorrowedFd<'_>) -> StartResult<OwnedFd> {
        let lower_root = self.layers.get(1).root.clone();
        let upper_root = self.upper_root();
        let lower_fh = self
            .encode_fh(lower_root.as_fd(), false)
            .ok_or_else(|| Error::new("index=on: lower layer has no file handles"))?;
        let upper_fh = self
            .encode_fh(upper_root, true)
            .ok_or_else(|| Error::new("index=on: upper layer has no file handles"))?;
        let origin = self.xattr(Ox::Origin);
        let upper = self.xattr(Ox::Upper);
        let root_origin = sys::getxattr(upper_root, origin).ok();
        if root_origin.as_ref().is_some_and(|o| *o != lower_fh) {
            return Err(Error::new(
                "index=on: upper root origin does not match the first lower layer \
                 (the upper dir was used with other lower layers)",
            ));
        }
        let index_path = match &self.cfg.workdir {
            Some(w) => w.join("index"),
            None => "index".into(),
        };
        let open_index = || sys::openat(workdir, c"index", libc::O_PATH | libc::O_DIRECTORY, 0);
        let existing = open_index().ok();
        if let Some(fd) = &existing {
            if sys::getxattr(fd.as_fd(), upper).is_ok_and(|u| u != upper_fh) {
                return Err(Error::new(format!(
                    "index=on: {} belongs to another upper dir",
                    index_path.display()
                )));
            }
        }
        // Entries to drop, found before anything changes: an entry the
        // kernel would refuse stops the mount with the layers untouched.
        let drop = match &existing {
            Some(fd) => self.stale_index_entries(fd.as_fd(), &index_path)?,
            None => Vec::new(),
        };
        let cannot = |e| Error::at("index=on: cannot set up", &index_path, e);
        let fd = match existing {
            Some(fd) => fd,
            None => {
                match sys::mkdirat(workdir, c"index", 0) {
                    Ok(()) => {}
                    Err(e) if e.raw() == libc::EEXIST => {}
                    Err(e) => return Err(cannot(e)),
                }
                open_index().map_err(cannot)?
            }
        };
        if root_origin.is_none() {
            sys::setxattr(upper_root, origin, &lower_fh, 0).map_err(cannot)?;
        }
        if sys::getxattr(fd.as_fd(), upper).is_err() {
            sys::setxattr(fd.as_fd(), upper, &upper_fh, 0).map_err(cannot)?;
        }
        let rd = sys::reopen(fd.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY).map_err(cannot)?;
        for name in drop {
            log::info!("index: removing {:?}", name);
            if let Err(e) = sys::unlinkat(rd.as_fd(), &name, 0) {
                log::warn!("index: cannot remove {:?}: {e}", name);
            }
        }
        Ok(fd)
    }

    /// As the kernel's `ovl_indexdir_cleanup` (without nfs_export): the
    /// entries of `W/index` to remove at mount. These are leftovers of an
    /// interrupted create (`#...`), entries whose lower file is gone
    /// (stale), and entries no name uses any more (orphans: one link, and
    /// a union count of zero). A name that is not a file handle, or a file
    /// without the origin its name says, is an error.
    fn stale_index_entries(&self, dir: BorrowedFd<'_>, path: &Path) -> StartResult<Vec<CString>> {
        let cannot = |e| Error::at("index=on: cannot read", path, e);
        let bad = |name: &CString, why: &str| {
            Error::new(format!(
                "index=on: {}/{}: {why}; remove the index dir or mount with index=off",
                path.display(),
                name.to_string_lossy()
            ))
        };
        let rd = sys::reopen(dir, libc::O_RDONLY | libc::O_DIRECTORY).map_err(cannot)?;
        let origin = self.xattr(Ox::Origin);
        let mut drop = Vec::new();
        for e in sys::read_dir_all(&rd).map_err(cannot)? {
            let name = sys::cstr(&e.name).map_err(cannot)?;
            let bytes = name.as_bytes();
            if bytes.first() == Some(&b'#') {
                if e.d_type != libc::DT_DIR {
                    drop.push(name);
                }
                continue;
            }
            let Some(fh) = unhex(bytes).filter(|fh| fh.len() >= 21) else {
                return Err(bad(&name, "not a file handle"));
            };
            let st = sys::fstatat(rd.as_fd(), &name).map_err(cannot)?;
            if sys::is_whiteout(&st) || sys::is_dir(st.st_mode) {
                continue;
            }
            match sys::getxattr_at(rd.as_fd(), &name, origin) {
                Ok(o) if o == fh => {}
                Ok(_) => {
                    drop.push(name);
                    continue;
                }
                Err(_) => return Err(bad(&name, "no origin")),
            }
            if st.st_nlink == 1 {
                let fd = sys::openat(rd.as_fd(), &name, libc::O_PATH, 0).map_err(cannot)?;
                if self.decode_origin(&fh).is_none() || self.union_nlink_raw(fd.as_fd(), &st) <= 0 {
                    drop.push(name);
                }
            }
        }
        Ok(drop)
    }

    fn index_fd(&self) -> Option<BorrowedFd<'_>> {
        self.index.as_ref().map(|f| f.as_fd())
    }

    /// The index dir and entry of an indexed node that has been copied up,
    /// where its lower names find their data.
    pub(crate) fn index_dir_entry(&self, node: &Inode) -> Option<(Arc<OwnedFd>, CString)> {
        let name = node.index_name()?;
        let dir = self.index.clone()?;
        sys::fstatat(dir.as_fd(), &name).ok()?;
        Some((dir, name))
    }

    /// Whether copy-up of this lower object goes through the index: a lower
    /// hard link, with index=on.
    pub(crate) fn indexes(&self, st: &Stat) -> bool {
        self.index.is_some() && !sys::is_dir(st.st_mode) && st.st_nlink > 1
    }

    /// The index entry name of a lower object: the hex of its file handle.
    pub(crate) fn index_name(&self, lower: BorrowedFd<'_>) -> Option<CString> {
        hex_name(&self.encode_fh(lower, false)?)
    }

    /// The link count users see for an indexed object with stat `st`, from
    /// its `nlink` xattr read through `fd`; its own count if that is unusable.
    pub(crate) fn union_nlink(&self, fd: BorrowedFd<'_>, st: &Stat) -> u64 {
        u64::try_from(self.union_nlink_raw(fd, st))
            .ok()
            .filter(|&n| n > 0)
            .unwrap_or(st.st_nlink)
    }

    /// Stores the union link count relative to the upper inode's, before a
    /// link, unlink or rename changes both (the kernel's `ovl_nlink_start`).
    fn set_nlink_upper(&self, fd: BorrowedFd<'_>, union: u64) -> Result<()> {
        let st = sys::fstat(fd)?;
        let v = format!("U{:+}", union as i64 - st.st_nlink as i64);
        sys::setxattr(fd, self.xattr(Ox::Nlink), v.as_bytes(), 0)
    }

    /// Before a name of an indexed node is linked, unlinked or renamed
    /// over: link it up, then record the union count (the kernel's
    /// `ovl_nlink_start`). Returns the upper fd to finish with.
    pub(crate) fn nlink_start(&self, node: &Arc<Inode>) -> Result<Option<OwnedFd>> {
        if node.is_dir() || !node.has_index() {
            return Ok(None);
        }
        self.copy_up(node)?;
        let fd = self.path_fd(node)?;
        let st = sys::fstat(fd.as_fd())?;
        let union = self.union_nlink(fd.as_fd(), &st);
        self.set_nlink_upper(fd.as_fd(), union)?;
        Ok(Some(fd))
    }

    /// After the change: an index entry no name uses any more goes (the
    /// kernel's `ovl_cleanup_index`).
    pub(crate) fn nlink_end(&self, node: &Arc<Inode>, fd: Option<OwnedFd>) {
        let Some(fd) = fd else {
            return;
        };
        self.inval_attr(node.nodeid);
        let Ok(st) = sys::fstat(fd.as_fd()) else {
            return;
        };
        if st.st_nlink == 1 && self.union_nlink_raw(fd.as_fd(), &st) <= 0 {
            if let (Some(dir), Some(name)) = (self.index_fd(), node.index_name()) {
                let _ = sys::unlinkat(dir, &name, 0);
            }
        }
    }

    /// The union count (the kernel's `ovl_get_nlink`), which may be zero or
    /// less once no name is left.
    fn union_nlink_raw(&self, fd: BorrowedFd<'_>, st: &Stat) -> i64 {
        match sys::getxattr(fd, self.xattr(Ox::Nlink))
            .ok()
            .and_then(|v| parse_nlink(&v))
        {
            Some((b'U', diff)) => st.st_nlink as i64 + diff,
            _ => st.st_nlink as i64,
        }
    }

    /// Copy-up of a name whose lower inode is already indexed: the index
    /// entry is linked at the name (the kernel's `ovl_link_up`).
    pub(crate) fn link_up(
        &self,
        parent: &Arc<Inode>,
        upper_dir: BorrowedFd<'_>,
        name: &CStr,
        index: (BorrowedFd<'_>, CString),
    ) -> Result<Stat> {
        let pst = sys::fstat(upper_dir)?;
        self.set_impure(parent, upper_dir);
        let (idir, iname) = index;
        let ifd = sys::openat(idir, &iname, libc::O_PATH, 0)?;
        let ist = sys::fstat(ifd.as_fd())?;
        let union = self.union_nlink(ifd.as_fd(), &ist);
        sys::linkat(idir, &iname, upper_dir, name)?;
        let _ = sys::utimensat(upper_dir, c".", &sys::stat_times(&pst));
        self.set_nlink_upper(ifd.as_fd(), union)?;
        sys::fstatat(upper_dir, name)
    }

    /// After the first copy-up of an indexed file was built at `work/tmp`:
    /// record the union count, enter it in the index, then move it to its
    /// name. A crash in between leaves an index entry no name uses, which
    /// a later copy-up links up.
    pub(crate) fn install_indexed(
        &self,
        work: BorrowedFd<'_>,
        tmp: &CStr,
        lower_nlink: u64,
        index_name: &CStr,
        upper_dir: BorrowedFd<'_>,
        name: &CStr,
    ) -> Result<()> {
        let idir = self.index_fd().ok_or_else(|| sys::err(libc::EIO))?;
        let fd = sys::openat(work, tmp, libc::O_PATH, 0)?;
        // Two links (index and name) will stand for the lower count.
        let v = format!("U{:+}", lower_nlink as i64 - 2);
        sys::setxattr(fd.as_fd(), self.xattr(Ox::Nlink), v.as_bytes(), 0)?;
        sys::linkat(work, tmp, idir, index_name)?;
        if let Err(e) = sys::renameat2(work, tmp, upper_dir, name, 0) {
            let _ = sys::unlinkat(idir, index_name, 0);
            return Err(e);
        }
        Ok(())
    }

    /// The index entry name for a copied-up upper object with an origin.
    pub(crate) fn index_name_of_upper(&self, fd: BorrowedFd<'_>) -> Option<CString> {
        let dir = self.index_fd()?;
        let name = hex_name(&sys::getxattr(fd, self.xattr(Ox::Origin)).ok()?)?;
        sys::fstatat(dir, &name).ok()?;
        Some(name)
    }
}

/// An index entry name: the file handle in lower-case hex.
fn hex_name(fh: &[u8]) -> Option<CString> {
    CString::new(fh.iter().map(|b| format!("{b:02x}")).collect::<String>()).ok()
}

/// Bytes from lower-case or upper-case hex; None if it is not hex.
pub(crate) fn unhex(s: &[u8]) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.chunks(2)
        .map(|c| u8::from_str_radix(std::str::from_utf8(c).ok()?, 16).ok())
        .collect()
}

/// `U+3`, `L-1`: the base and the difference.
pub(crate) fn parse_nlink(v: &[u8]) -> Option<(u8, i64)> {
    let base = *v.first()?;
    if base != b'U' && base != b'L' {
        return None;
    }
    let rest = std::str::from_utf8(&v[1..]).ok()?;
    if !rest.starts_with(['+', '-']) {
        return None;
    }
    Some((base, rest.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::parse_nlink;

    #[test]
    fn hex_names() {
        assert_eq!(super::unhex(b"00fbA1"), Some(vec![0, 0xfb, 0xa1]));
        assert_eq!(super::unhex(b"0"), None);
        assert_eq!(super::unhex(b"zz"), None);
    }

    #[test]
    fn nlink_xattr_values() {
        assert_eq!(parse_nlink(b"U+1"), Some((b'U', 1)));
        assert_eq!(parse_nlink(b"U-2"), Some((b'U', -2)));
        assert_eq!(parse_nlink(b"L+0"), Some((b'L', 0)));
        assert_eq!(parse_nlink(b"U1"), None);
        assert_eq!(parse_nlink(b"X+1"), None);
        assert_eq!(parse_nlink(b""), None);
    }
}
