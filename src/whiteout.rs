//! Whiteouts and opaque directories in every format found in layers (the
//! kernel's `ovl_path_is_whiteout` and `ovl_is_opaquedir`):
//! - the kernel's 0/0 character devices, and its xattr whiteouts (a
//!   zero-size file with `overlay.whiteout`, its dir marked `opaque=x`);
//! - the AUFS/OCI format containers/storage stores layers in when a mount
//!   program is set: `.wh.NAME` hides NAME, `.wh..wh..opq` makes its dir opaque;
//! - fuse-overlayfs' `user.fuseoverlayfs.opaque`.
//!
//! Names starting with `.wh.` are markers: never listed, looked up or created.

use crate::error::Result;
use crate::inode::Redirect;
use crate::layer::LayerIdx;
use crate::ondisk::has_name;
use crate::overlay::Overlay;
use crate::sys::{self, Stat};
use parking_lot::{Mutex, RwLock};
use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The AUFS whiteout prefix.
pub const WH_PREFIX: &[u8] = b".wh.";
/// Markers that make the directory holding them opaque.
const WH_OPAQUE: [&CStr; 2] = [c".wh..wh..opq", c".wh..opq"];
/// Opaque xattrs written by other tools, read in every layer.
pub const FOREIGN_OPAQUE: &CStr = c"user.fuseoverlayfs.opaque";

/// Whether `name` is reserved for the `.wh.` format.
pub fn is_wh_name(name: &[u8]) -> bool {
    name.starts_with(WH_PREFIX)
}

/// The name a `.wh.` marker hides (None for opaque markers and other names).
pub fn hidden_by(marker: &[u8]) -> Option<&[u8]> {
    let rest = marker.strip_prefix(WH_PREFIX)?;
    (!rest.is_empty() && !rest.starts_with(WH_PREFIX) && rest != b".opq").then_some(rest)
}

/// `.wh.NAME`, or None when it would not fit in a name.
pub fn marker_for(name: &CStr) -> Option<CString> {
    let n = name.to_bytes();
    if n.len() + WH_PREFIX.len() > crate::overlay::NAME_MAX {
        return None;
    }
    let mut v = WH_PREFIX.to_vec();
    v.extend_from_slice(n);
    CString::new(v).ok()
}

/// Whether `dir` holds the `.wh.NAME` marker of `name`: one probe.
pub fn has_marker(dir: BorrowedFd<'_>, name: &CStr) -> bool {
    marker_for(name).is_some_and(|m| sys::fstatat(dir, &m).is_ok())
}

/// Whether directory `dir/name` holds an AUFS opaque marker.
pub fn has_opaque_marker(dir: BorrowedFd<'_>, name: &CStr) -> bool {
    let Ok(d) = sys::openat(dir, name, libc::O_PATH | libc::O_DIRECTORY, 0) else {
        return false;
    };
    WH_OPAQUE.iter().any(|m| sys::fstatat(d.as_fd(), m).is_ok())
}

/// Whether the (zero-size, regular) file `dir/name` carries one of the
/// whiteout xattrs `names`: the kernel's xattr whiteout.
pub fn is_xattr_whiteout(dir: BorrowedFd<'_>, name: &CStr, names: &[CString]) -> bool {
    xattr_whiteout(dir, name, names).is_none()
}

/// [`is_xattr_whiteout`]: `None` for a whiteout, else whether the file is
/// known to carry no xattr at all. Several names cost one list instead of
/// a `getxattr` each (most such files list none).
fn xattr_whiteout(dir: BorrowedFd<'_>, name: &CStr, names: &[CString]) -> Option<bool> {
    match names {
        [one] => match sys::getxattr_at(dir, name, one) {
            Ok(_) => None,
            Err(_) => Some(false),
        },
        _ => match sys::listxattr_at(dir, name) {
            Ok(list) if names.iter().any(|x| has_name(&list, x.to_bytes())) => None,
            Ok(list) => Some(list.is_empty()),
            Err(_) => Some(false),
        },
    }
}

/// Makes a whiteout at `dir/name`: a 0/0 device as the kernel makes it,
/// or, where mknod is refused (some user namespaces and filesystems),
/// the kernel's xattr whiteout (`whiteout` set); its dir must then be
/// marked with [`mark_xwhiteouts`]. Returns whether it is an xattr whiteout.
pub fn make_whiteout(dir: BorrowedFd<'_>, name: &CStr, whiteout: &CStr) -> Result<bool> {
    match sys::mknodat(dir, name, libc::S_IFCHR, 0) {
        Err(e) if matches!(e.raw(), libc::EPERM | libc::EOPNOTSUPP) => {
            log::debug!("mknod of a whiteout refused ({e}): writing an xattr whiteout");
        }
        r => return r.map(|()| false),
    }
    let fd = sys::openat(
        dir,
        name,
        libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
        0o000,
    )?;
    let r = sys::setxattr(fd.as_fd(), whiteout, b"y", 0);
    drop(fd);
    if let Err(e) = r {
        let _ = sys::unlinkat(dir, name, 0);
        return Err(e);
    }
    Ok(true)
}

/// Marks dir `dir` as holding xattr whiteouts (`opaque` set to `x`),
/// unless it is opaque.
pub fn mark_xwhiteouts(dir: BorrowedFd<'_>, opaque: &CStr) -> Result<()> {
    match sys::getxattr(dir, opaque) {
        Ok(v) if v == b"y" || v == b"x" => Ok(()),
        _ => sys::setxattr(dir, opaque, b"x", 0),
    }
}

/// The kernel's shared whiteout (`ovl_whiteout`): one 0/0 device in
/// `W/work`, made at the first whiteout, that every later whiteout is a
/// hard link of, so that a whiteout costs a link instead of a new inode.
/// It stays in `W/work` until the next mount empties that.
#[derive(Default)]
pub(crate) struct SharedWhiteout {
    name: Mutex<Option<Arc<CStr>>>,
    /// Links or mknod refused: each whiteout is made on its own.
    off: AtomicBool,
    /// The inode numbers of the shared whiteouts made so far, each held by
    /// an `O_PATH` fd until unmount so that no other file of the upper fs
    /// can take the number: a device entry of the upper fs with one of
    /// them is a whiteout without a stat (the kernel knows its whiteouts
    /// from its listing, too).
    pinned: RwLock<Vec<(u64, OwnedFd)>>,
}

/// An error that says the filesystem or our privileges refuse the call,
/// now and later.
fn refused(e: &crate::error::Errno) -> bool {
    matches!(
        e.raw(),
        libc::EPERM | libc::EACCES | libc::EXDEV | libc::EOPNOTSUPP
    )
}

/// What one layer's directory holds under a name.
pub enum Entry {
    Missing,
    /// A whiteout of any format: the name and everything below it is gone.
    Whiteout,
    /// Nothing, but a `.wh.NAME` marker hides the name below.
    Marked,
    /// An object; `bare`: it carries no xattr (known when its list was
    /// read for the whiteout check).
    Present {
        st: Stat,
        bare: bool,
    },
}

/// What a directory entry's xattrs and markers say of the layers below it.
#[derive(Default)]
pub struct DirMarks {
    pub opaque: bool,
    pub redirect: Option<Redirect>,
}

impl Overlay {
    /// What layer dir `dir` holds under `name`, whiteouts of every format
    /// recognised. A missing name is hidden if `marked` says its `.wh.NAME`
    /// marker is there: [`has_marker`] probes for it, `marked_in` may know.
    pub(crate) fn probe(
        &self,
        dir: BorrowedFd<'_>,
        name: &CStr,
        l: LayerIdx,
        marked: impl FnOnce() -> bool,
    ) -> Result<Entry> {
        match sys::fstatat(dir, name) {
            Ok(st) => Ok(match self.whiteout_or_bare(dir, name, &st, l) {
                None => Entry::Whiteout,
                Some(bare) => Entry::Present { st, bare },
            }),
            Err(e) if e.raw() == libc::ENOENT => Ok(if marked() {
                Entry::Marked
            } else {
                Entry::Missing
            }),
            Err(e) if e.is_missing() => Ok(Entry::Missing),
            Err(e) => Err(e),
        }
    }

    /// A 0/0 character device, or a zero-size file with the whiteout xattr
    /// (as the kernel's lookup, whether or not its dir is marked).
    pub(crate) fn is_whiteout_at(
        &self,
        dir: BorrowedFd<'_>,
        name: &CStr,
        st: &Stat,
        l: LayerIdx,
    ) -> bool {
        self.whiteout_or_bare(dir, name, st, l).is_none()
    }

    /// [`Self::is_whiteout_at`]: `None` for a whiteout, else whether the
    /// object is known to carry no xattr.
    fn whiteout_or_bare(
        &self,
        dir: BorrowedFd<'_>,
        name: &CStr,
        st: &Stat,
        l: LayerIdx,
    ) -> Option<bool> {
        if sys::is_whiteout(st) {
            return None;
        }
        if sys::mode_type(st.st_mode) != libc::S_IFREG || st.st_size != 0 {
            return Some(false);
        }
        xattr_whiteout(dir, name, self.layout_names(&self.xattrs.whiteout, l))
    }

    /// Format markers read in layer `l`: in a lower layer, those of every
    /// layout; in the upper one, only this mount's own, since users can
    /// set the others through the mount (the kernel ignores them too).
    fn layout_names<'a>(&self, names: &'a [CString; 2], l: LayerIdx) -> &'a [CString] {
        if self.layers.is_upper(l) {
            &names[..1]
        } else {
            names
        }
    }

    /// The opaque flag and redirect of a directory entry: one `listxattr`,
    /// then values only of the names present, then the opaque markers.
    pub(crate) fn dir_marks(&self, dir: BorrowedFd<'_>, name: &CStr, l: LayerIdx) -> DirMarks {
        let mut marks = DirMarks::default();
        let list = sys::listxattr_at(dir, name).unwrap_or_default();
        let has = |x: &CStr| has_name(&list, x.to_bytes());
        let value_is_y =
            |x: &CStr| has(x) && matches!(sys::getxattr_at(dir, name, x), Ok(v) if v == b"y");
        let foreign = !self.layers.is_upper(l) && value_is_y(FOREIGN_OPAQUE);
        if foreign
            || self
                .layout_names(&self.xattrs.opaque, l)
                .iter()
                .any(|x| value_is_y(x))
        {
            marks.opaque = true;
            return marks;
        }
        let redirect = &self.xattrs.redirect;
        if has(redirect) {
            marks.redirect = sys::getxattr_at(dir, name, redirect)
                .ok()
                .and_then(|v| Redirect::parse(&v));
        }
        if marks.redirect.is_none() {
            marks.opaque = has_opaque_marker(dir, name);
        }
        marks
    }

    /// Whether a layer's directory is marked as holding xattr whiteouts
    /// (`opaque=x`): readdir then checks its empty files.
    pub(crate) fn has_xwhiteouts(&self, dir: BorrowedFd<'_>, l: LayerIdx) -> bool {
        self.layout_names(&self.xattrs.opaque, l)
            .iter()
            .any(|x| matches!(sys::getxattr(dir, x), Ok(v) if v == b"x"))
    }

    /// [`make_whiteout`] with this mount's xattr name; a device whiteout
    /// is a link of the shared one where it can be.
    pub(crate) fn make_whiteout(&self, dir: BorrowedFd<'_>, name: &CStr) -> Result<bool> {
        if self.link_whiteout(dir, name) {
            return Ok(false);
        }
        make_whiteout(dir, name, &self.xattrs.whiteout[0])
    }

    /// Whether whiteouts are links of a shared one (until mknod or links
    /// are refused).
    pub(crate) fn shares_whiteouts(&self) -> bool {
        !self.shared_whiteout.off.load(Ordering::Relaxed)
    }

    /// Whether directory entry `e` of a dir on the upper fs is a link of a
    /// shared whiteout, known by its type and number alone.
    pub(crate) fn is_shared_whiteout(&self, e: &sys::RawDirent) -> bool {
        e.d_type == libc::DT_CHR
            && self
                .shared_whiteout
                .pinned
                .read()
                .iter()
                .any(|(ino, _)| *ino == e.ino)
    }

    /// Whether dir `dir` is on the upper fs (not on a mount over a dir of
    /// it), where [`Self::is_shared_whiteout`] can tell.
    pub(crate) fn on_upper_fs(&self, dir: BorrowedFd<'_>) -> bool {
        self.layers.has_upper
            && sys::fstat(dir).is_ok_and(|st| st.st_dev == self.layers.get(crate::layer::UPPER).dev)
    }

    /// Links the shared whiteout at `dir/name`; false when there is none
    /// to link (mknod refused, links refused, or the name is taken).
    pub(crate) fn link_whiteout(&self, dir: BorrowedFd<'_>, name: &CStr) -> bool {
        let (sw, Ok(work)) = (&self.shared_whiteout, self.work_fd()) else {
            return false;
        };
        // A second try after the first one was full (EMLINK) or gone.
        for _ in 0..2 {
            if sw.off.load(Ordering::Relaxed) {
                return false;
            }
            let src = {
                let mut cur = sw.name.lock();
                match &*cur {
                    Some(n) => n.clone(),
                    None => {
                        let n: Arc<CStr> = self.tmp_name().into();
                        if let Err(e) = sys::mknodat(work, &n, libc::S_IFCHR, 0) {
                            log::debug!("no shared whiteout ({e})");
                            sw.off.store(refused(&e), Ordering::Relaxed);
                            return false;
                        }
                        if let Ok(fd) = sys::openat(work, &n, libc::O_PATH, 0) {
                            if let Ok(st) = sys::fstat(fd.as_fd()) {
                                sw.pinned.write().push((st.st_ino, fd));
                            }
                        }
                        cur.insert(n).clone()
                    }
                }
            };
            match sys::linkat(work, &src, dir, name) {
                Ok(()) => return true,
                Err(e) if matches!(e.raw(), libc::EMLINK | libc::ENOENT) => {
                    let mut cur = sw.name.lock();
                    if cur.as_ref() == Some(&src) {
                        let _ = sys::unlinkat(work, &src, 0);
                        *cur = None;
                    }
                }
                Err(e) => {
                    // As the kernel's `no_shared_whiteout` where links are
                    // refused; other failures (a taken name, no space) are
                    // the caller's to meet.
                    if refused(&e) {
                        log::debug!("whiteouts are not shared: link refused ({e})");
                        sw.off.store(true, Ordering::Relaxed);
                    }
                    return false;
                }
            }
        }
        false
    }

    /// Marks an upper dir as holding xattr whiteouts, unless it is opaque.
    pub(crate) fn mark_xwhiteouts(&self, dir: BorrowedFd<'_>) -> Result<()> {
        mark_xwhiteouts(dir, &self.xattrs.opaque[0])
    }

    /// Removes the whiteouts of every format inside upper dir `dir/name`,
    /// which holds nothing else (else ENOTEMPTY).
    pub(crate) fn clear_whiteouts(&self, dir: BorrowedFd<'_>, name: &CStr) -> Result<()> {
        let l = crate::layer::UPPER;
        let d = sys::openat(dir, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        let entries = sys::read_dir_all(&d)?;
        let upper_fs =
            entries.iter().any(|e| e.d_type == libc::DT_CHR) && self.on_upper_fs(d.as_fd());
        for e in entries {
            let c = sys::cstr(&e.name)?;
            if !(upper_fs && self.is_shared_whiteout(&e)) {
                let st = sys::fstatat(d.as_fd(), &c)?;
                let marker = is_wh_name(c.to_bytes()) && !sys::is_dir(st.st_mode);
                if !marker && !self.is_whiteout_at(d.as_fd(), &c, &st, l) {
                    return Err(sys::err(libc::ENOTEMPTY));
                }
            }
            sys::unlinkat(d.as_fd(), &c, 0)?;
        }
        Ok(())
    }

    /// Refuses new names in the `.wh.` format, as fuse-overlayfs does: they
    /// would be hidden, and other tools read them as whiteouts.
    pub(crate) fn check_new_name(name: &CStr) -> Result<()> {
        if is_wh_name(name.to_bytes()) {
            return Err(sys::err(libc::EINVAL));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_names() {
        assert_eq!(hidden_by(b".wh.foo"), Some(&b"foo"[..]));
        assert_eq!(hidden_by(b".wh..wh..opq"), None);
        assert_eq!(hidden_by(b".wh..opq"), None);
        assert_eq!(hidden_by(b".wh."), None);
        assert_eq!(hidden_by(b"foo"), None);
        assert!(is_wh_name(b".wh.x") && !is_wh_name(b"wh.x") && !is_wh_name(b".whx"));
        assert_eq!(
            marker_for(c"a").as_deref(),
            Some(c".wh.a"),
            "the marker of a name"
        );
        let long = CString::new(vec![b'a'; 252]).unwrap();
        assert!(marker_for(&long).is_none());
    }
}
