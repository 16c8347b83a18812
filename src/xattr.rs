//! Extended attributes (the kernel's `xattrs.c`). The overlay's own xattrs
//! are hidden; a name in the overlay namespace set through the mount is
//! stored escaped (`trusted.overlay.overlay.X`), as kernels since 6.7 do.

use crate::error::Result;
use crate::file::Handles;
use crate::inode::{Inode, Key, Xattrs};
use crate::layer::LayerIdx;
use crate::overlay::Overlay;
use crate::sys;
use std::ffi::{CString, OsStr};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

impl Overlay {
    /// The real xattr name behind a name seen through the mount.
    fn real_xattr_name(&self, name: &OsStr) -> Result<CString> {
        let b = name.as_bytes();
        let p = self.xattr_prefix.as_bytes();
        if b.starts_with(p) {
            let mut v = p.to_vec();
            v.extend_from_slice(b"overlay.");
            v.extend_from_slice(&b[p.len()..]);
            return CString::new(v).map_err(|_| sys::err(libc::EINVAL));
        }
        sys::cstr(name)
    }

    /// fuse-overlayfs' `noxattrs=1`.
    fn check_xattrs(&self) -> Result<()> {
        if self.cfg.noxattrs {
            return Err(sys::err(libc::EOPNOTSUPP));
        }
        Ok(())
    }

    pub(crate) fn getxattr(&self, nodeid: u64, name: &OsStr, handles: &Handles) -> Result<Vec<u8>> {
        self.check_xattrs()?;
        let r = self.getxattr_real(nodeid, name, handles);
        // The kernel asks this only when SELinux is not active (the LSM
        // answers otherwise). ENOTSUP makes `ls -l` stop asking for the rest
        // of the listing: one round trip per file saved.
        match r {
            Err(e)
                if self.cfg.selinux_enotsup
                    && e.raw() == libc::ENODATA
                    && name.as_bytes() == b"security.selinux" =>
            {
                Err(sys::err(libc::EOPNOTSUPP))
            }
            r => r,
        }
    }

    fn getxattr_real(&self, nodeid: u64, name: &OsStr, handles: &Handles) -> Result<Vec<u8>> {
        let node = self.node(nodeid)?;
        // What the node knows answers before any name is built.
        let known = node.state.read().xattrs;
        match known {
            Xattrs::None => return Err(sys::err(libc::ENODATA)),
            Xattrs::NoCaps if name.as_bytes() == b"security.capability" => {
                return Err(sys::err(libc::ENODATA))
            }
            _ => {}
        }
        let real = self.real_xattr_name(name)?;
        let top = node.top().ok_or_else(|| sys::err(libc::ENOENT))?;
        if node.nodeid == crate::inode::ROOT {
            return sys::getxattr(self.layers.get(top).root.as_fd(), &real);
        }
        let at = self.entry_in(&node, top);
        // A lower object is asked for its list once instead (as cheap as
        // one getxattr): most list none, and are never asked again.
        if known == Xattrs::Unknown && self.lower_xattrs_fixed(&node, top) {
            if let Ok((pfd, cname)) = &at {
                if sys::listxattr_at(pfd.as_fd(), cname).is_ok_and(|l| l.is_empty()) {
                    self.note_no_xattrs(&node, top);
                    return Err(sys::err(libc::ENODATA));
                }
            }
        }
        // `ls -l` asks this of every file: one system call, no open.
        let r = at.and_then(|(pfd, cname)| sys::getxattr_at(pfd.as_fd(), &cname, &real));
        r.or_else(|e| sys::getxattr(self.open_file_fd(&node, handles, e)?.as_fd(), &real))
    }

    /// Whether the node's xattrs are those of a lower object, which never
    /// change: not a hard link (whose copy-up through another name, with
    /// index=on, gives this one the copy's xattrs).
    fn lower_xattrs_fixed(&self, node: &Arc<Inode>, top: LayerIdx) -> bool {
        !self.layers.is_upper(top)
            && !node.has_index()
            && matches!(node.state.read().key, Key::Real(..))
    }

    /// Records that node's lower object (top layer `top`) lists no xattr,
    /// so that later requests need no system call; unless it was copied
    /// up since (a copy-up resets what is known).
    pub(crate) fn note_no_xattrs(&self, node: &Arc<Inode>, top: LayerIdx) {
        if !self.lower_xattrs_fixed(node, top) {
            return;
        }
        let mut s = node.state.write();
        let still_lower = s.layers.as_slice().first() == Some(&top);
        if still_lower && s.xattrs == Xattrs::Unknown {
            s.xattrs = Xattrs::None;
        }
    }

    pub(crate) fn listxattr(&self, nodeid: u64, handles: &Handles) -> Result<Vec<u8>> {
        self.check_xattrs()?;
        let node = self.node(nodeid)?;
        if node.state.read().xattrs == Xattrs::None {
            return Ok(Vec::new());
        }
        let top = node.top().ok_or_else(|| sys::err(libc::ENOENT))?;
        let raw = if node.nodeid == crate::inode::ROOT {
            sys::listxattr(self.layers.get(top).root.as_fd())?
        } else {
            let r = self
                .entry_in(&node, top)
                .and_then(|(pfd, cname)| sys::listxattr_at(pfd.as_fd(), &cname));
            r.or_else(|e| sys::listxattr(self.open_file_fd(&node, handles, e)?.as_fd()))?
        };
        if raw.is_empty() {
            self.note_no_xattrs(&node, top);
        }
        let p = self.xattr_prefix.as_bytes();
        let mut esc = p.to_vec();
        esc.extend_from_slice(b"overlay.");
        let mut out = Vec::with_capacity(raw.len());
        for n in raw.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            if n.starts_with(&esc) {
                out.extend_from_slice(p);
                out.extend_from_slice(&n[esc.len()..]);
            } else if n.starts_with(p) {
                continue;
            } else {
                out.extend_from_slice(n);
            }
            out.push(0);
        }
        Ok(out)
    }

    pub(crate) fn setxattr(
        &self,
        nodeid: u64,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        handles: &Handles,
    ) -> Result<()> {
        self.check_xattrs()?;
        self.check_writable()?;
        let node = self.node(nodeid)?;
        let real = self.real_xattr_name(name)?;
        self.copy_up(&node)?;
        let (fd, _) = self.object_fd(&node, handles)?;
        node.state.write().xattrs = Xattrs::Unknown;
        let r = sys::setxattr(fd.as_fd(), &real, value, flags);
        node.state.write().default_acl = None;
        r
    }

    pub(crate) fn removexattr(&self, nodeid: u64, name: &OsStr, handles: &Handles) -> Result<()> {
        self.check_xattrs()?;
        self.check_writable()?;
        let node = self.node(nodeid)?;
        let real = self.real_xattr_name(name)?;
        // Like the kernel: no copy-up just to learn the xattr is absent.
        let (fd, _) = self.object_fd(&node, handles)?;
        sys::getxattr(fd.as_fd(), &real)?;
        self.copy_up(&node)?;
        let (fd, _) = self.object_fd(&node, handles)?;
        let r = sys::removexattr(fd.as_fd(), &real);
        node.state.write().default_acl = None;
        r?;
        if name.as_bytes() == b"security.capability" {
            self.caps_removed
                .store(nodeid, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }
}
