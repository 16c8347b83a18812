//! Inode operations (the kernel's `inode.c`): attributes, setattr with
//! copy-up, readlink, statfs.

use crate::error::Result;
use crate::file::Handles;
use crate::inode::Inode;
use crate::overlay::Overlay;
use crate::sys::{self, Stat};
use std::ffi::OsString;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

/// The attribute changes of one setattr request.
#[derive(Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<fuser::TimeOrNow>,
    pub mtime: Option<fuser::TimeOrNow>,
    pub fh: Option<u64>,
}

impl Overlay {
    pub(crate) fn getattr(
        &self,
        nodeid: u64,
        fh: Option<u64>,
        handles: &Handles,
    ) -> Result<(Arc<Inode>, Stat)> {
        let node = self.node(nodeid)?;
        if let Some(h) = fh.and_then(|fh| handles.get(fh, nodeid)) {
            let st = sys::fstat(h.fd().as_fd())?;
            return Ok((node, st));
        }
        match self.real_stat(&node) {
            Ok(st) => Ok((node, st)),
            // Unlinked or renamed over while open: the open file answers.
            Err(e) => {
                let st = sys::fstat(self.open_file_fd(&node, handles, e)?.as_fd())?;
                Ok((node, st))
            }
        }
    }

    pub(crate) fn setattr(
        &self,
        nodeid: u64,
        a: &SetAttr,
        handles: &Handles,
    ) -> Result<(Arc<Inode>, Stat)> {
        self.check_writable()?;
        let node = self.node(nodeid)?;
        let writable_fh =
            a.fh.and_then(|fh| handles.get(fh, nodeid))
                .filter(|h| h.writable);
        if a.size.is_some() && writable_fh.is_none() && node.lower_backed() {
            return Err(self.leave_lower_backing(&node));
        }
        // A size change needs the data; other changes, only the metadata.
        if a.size.is_some() {
            self.copy_up_data(&node)?;
        } else {
            self.copy_up(&node)?;
        }
        // An open file whose names are gone is reached through its handle.
        let (fd, gone) = self.object_fd(&node, handles)?;
        let uid = a.uid.map(|u| self.cfg.ids.uid.disk(u));
        let gid = a.gid.map(|g| self.cfg.ids.gid.disk(g));
        if self.override_name().is_some() {
            // Kept in the override xattr; the file keeps its own.
            if uid.is_some() || gid.is_some() || a.mode.is_some() {
                self.set_override(fd.as_fd(), uid, gid, a.mode)?;
            }
        } else {
            if uid.is_some() || gid.is_some() {
                let (uid, gid) = (uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX));
                if gone {
                    sys::fchown_any(fd.as_fd(), uid, gid)?;
                } else {
                    let (pfd, name) = self.upper_entry(&node)?;
                    sys::fchownat(pfd.as_fd(), &name, uid, gid)?;
                }
            }
            if let Some(mode) = a.mode {
                sys::fchmod_any(fd.as_fd(), mode & 0o7777)?;
            }
        }
        if let Some(size) = a.size {
            if node.is_dir() {
                return Err(sys::err(libc::EISDIR));
            }
            match &writable_fh {
                Some(h) => sys::ftruncate(h.fd().as_fd(), size)?,
                None => {
                    let w = sys::reopen(fd.as_fd(), libc::O_WRONLY)?;
                    sys::ftruncate(w.as_fd(), size)?;
                }
            }
        }
        if a.atime.is_some() || a.mtime.is_some() {
            let times = [to_timespec(a.atime), to_timespec(a.mtime)];
            if node.nodeid == crate::inode::ROOT || gone {
                sys::futimens_any(fd.as_fd(), &times)?;
            } else {
                let (pfd, name) = self.upper_entry(&node)?;
                sys::utimensat(pfd.as_fd(), &name, &times)?;
            }
        }
        let st = sys::fstat(fd.as_fd())?;
        Ok((node, st))
    }

    /// The upper parent fd and name of a copied-up node (root: ".").
    fn upper_entry(
        &self,
        node: &Arc<Inode>,
    ) -> Result<(Arc<std::os::fd::OwnedFd>, std::ffi::CString)> {
        if node.nodeid == crate::inode::ROOT {
            return Ok((
                self.layers.get(crate::layer::UPPER).root.clone(),
                c".".into(),
            ));
        }
        self.entry_in(node, crate::layer::UPPER)
    }

    pub(crate) fn readlink(&self, nodeid: u64) -> Result<OsString> {
        let node = self.node(nodeid)?;
        let top = node.top().ok_or_else(|| sys::err(libc::ENOENT))?;
        let (pfd, name) = self.entry_in(&node, top)?;
        sys::readlinkat(pfd.as_fd(), &name)
    }

    /// Statistics of the upper layer (the top lower on a read-only mount), as the kernel.
    pub(crate) fn statfs(&self) -> Result<libc::statfs> {
        sys::fstatfs(self.layers.get(0).root.as_fd())
    }
}

fn to_timespec(t: Option<fuser::TimeOrNow>) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(fuser::TimeOrNow::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(fuser::TimeOrNow::SpecificTime(t)) => {
            let (sec, nsec) = match t.duration_since(UNIX_EPOCH) {
                Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i64),
                Err(e) => {
                    let d = e.duration();
                    let mut s = -(d.as_secs() as i64);
                    let mut n = d.subsec_nanos() as i64;
                    if n > 0 {
                        s -= 1;
                        n = 1_000_000_000 - n;
                    }
                    (s, n)
                }
            };
            libc::timespec {
                tv_sec: sec,
                tv_nsec: nsec,
            }
        }
    }
}
