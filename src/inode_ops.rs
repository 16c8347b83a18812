//! Inode operations (the kernel's `inode.c`): attributes, setattr with
//! copy-up, readlink, statfs.

use crate::error::Result;
use crate::file::Handles;
use crate::inode::Inode;
use crate::overlay::Overlay;
use crate::request;
use crate::sys::{self, Stat};
use std::ffi::{CStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;
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
    /// Drop set-user-ID, and set-group-ID where group execute is set, as a
    /// write, truncate or chown does (`FUSE_HANDLE_KILLPRIV_V2` leaves that
    /// to us).
    pub kill_suid_gid: bool,
}

impl SetAttr {
    pub(crate) fn changes_nothing(&self) -> bool {
        self.mode.is_none()
            && self.uid.is_none()
            && self.gid.is_none()
            && self.size.is_none()
            && self.atime.is_none()
            && self.mtime.is_none()
    }
}

/// The mode left when privileges are killed, if it differs (the kernel's
/// `should_remove_suid` for a caller without `CAP_FSETID`).
fn killed_mode(mode: u32) -> Option<u32> {
    let mode = mode & 0o7777;
    let kill = if mode & libc::S_IXGRP != 0 {
        libc::S_ISUID | libc::S_ISGID
    } else {
        libc::S_ISUID
    };
    (mode & kill != 0).then_some(mode & !kill)
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

    /// Whether a setattr of nothing asks to drop set-user-ID. With
    /// KILLPRIV_V2 the kernel sends one, its kill bits stripped, for a
    /// passthrough write, fallocate or copy_file_range by a caller without
    /// `CAP_FSETID` and for `chown(-1, -1)`, which do; and right after it
    /// removed file capabilities for a write by any caller, where one with
    /// `CAP_FSETID` keeps the bit.
    pub(crate) fn empty_setattr_kills(&self, nodeid: u64) -> bool {
        let caps_went = self
            .caps_removed
            .compare_exchange(nodeid, 0, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok();
        !caps_went || !request::caller_has_fsetid()
    }

    /// Drops set-user-ID and set-group-ID after a write or an `O_TRUNC` open
    /// by a caller without `CAP_FSETID`, as the kernel asks.
    pub(crate) fn kill_suid_gid(&self, nodeid: u64, fh: u64, handles: &Handles) -> Result<()> {
        let a = SetAttr {
            fh: Some(fh),
            kill_suid_gid: true,
            ..SetAttr::default()
        };
        self.setattr(nodeid, &a, handles).map(drop)
    }

    pub(crate) fn setattr(
        &self,
        nodeid: u64,
        a: &SetAttr,
        handles: &Handles,
    ) -> Result<(Arc<Inode>, Stat)> {
        self.check_writable()?;
        let node = self.node(nodeid)?;
        // A real chown drops them itself (where ownership is real).
        let chown_kills = (a.uid.is_some() || a.gid.is_some()) && self.override_name().is_none();
        let killed;
        let a = if a.kill_suid_gid && a.mode.is_none() && !node.is_dir() && !chown_kills {
            let (_, st) = self.getattr(nodeid, a.fh, handles)?;
            match killed_mode(self.visible_mode(&node, &st)) {
                Some(mode) => {
                    killed = SetAttr {
                        mode: Some(mode),
                        ..*a
                    };
                    &killed
                }
                // Nothing to drop and nothing else to do: no copy-up either.
                None if a.changes_nothing() => return Ok((node, st)),
                None => a,
            }
        } else {
            a
        };
        let writable_fh =
            a.fh.and_then(|fh| handles.get(fh, nodeid))
                .filter(|h| h.writable);
        if a.size.is_some() && node.is_dir() {
            return Err(sys::err(libc::EISDIR));
        }
        if a.size.is_some() && writable_fh.is_none() && node.lower_backed() {
            return Err(self.leave_lower_backing(&node));
        }
        // A size change needs the data; other changes, only the metadata.
        if a.size.is_some() {
            self.copy_up_data(&node)?;
        } else {
            self.copy_up(&node)?;
        }
        let fh = writable_fh.as_ref().map(|h| h.fd());
        // By its upper name, which costs no open; through an fd when no name
        // is left (or the first one went stale: see `next_alias`).
        if let Ok((pfd, name)) = self.upper_entry(&node) {
            match self.set_attrs(Obj::At(pfd.as_fd(), &name), a, fh.as_ref()) {
                Err(e) if e.raw() == libc::ENOENT => {}
                r => return r.map(|st| (node, st)),
            }
        }
        // An open file whose names are gone is reached through its handle.
        let (fd, _) = self.object_fd(&node, handles)?;
        let st = self.set_attrs(Obj::Fd(fd.as_fd()), a, fh.as_ref())?;
        Ok((node, st))
    }

    /// The changes of `a` on one upper object, in the kernel's order; its
    /// stat after them. `fh`: the writable file a truncate may use.
    fn set_attrs(&self, obj: Obj<'_>, a: &SetAttr, fh: Option<&Arc<OwnedFd>>) -> Result<Stat> {
        let uid = a.uid.map(|u| self.cfg.ids.uid.disk(u));
        let gid = a.gid.map(|g| self.cfg.ids.gid.disk(g));
        if self.override_name().is_some() {
            // Kept in the override xattr; the file keeps its own.
            if uid.is_some() || gid.is_some() || a.mode.is_some() {
                let fd = obj.open(libc::O_PATH)?;
                self.set_override(fd.as_fd(), uid, gid, a.mode)?;
            }
        } else {
            if uid.is_some() || gid.is_some() {
                obj.chown(uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX))?;
            }
            if let Some(mode) = a.mode {
                obj.chmod(mode & 0o7777)?;
            }
        }
        if let Some(size) = a.size {
            match fh {
                Some(fd) => sys::ftruncate(fd.as_fd(), size)?,
                None => sys::ftruncate(obj.open(libc::O_WRONLY)?.as_fd(), size)?,
            }
        }
        if a.atime.is_some() || a.mtime.is_some() {
            obj.utimens(&[to_timespec(a.atime), to_timespec(a.mtime)])?;
        }
        obj.stat()
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

/// An upper object setattr changes: its parent dir and name, or an fd
/// (O_PATH will do) when it has no name.
#[derive(Clone, Copy)]
enum Obj<'a> {
    At(BorrowedFd<'a>, &'a CStr),
    Fd(BorrowedFd<'a>),
}

impl Obj<'_> {
    fn chown(self, uid: u32, gid: u32) -> Result<()> {
        match self {
            Obj::At(d, n) => sys::fchownat(d, n, uid, gid),
            Obj::Fd(fd) => sys::fchown_any(fd, uid, gid),
        }
    }

    fn chmod(self, mode: u32) -> Result<()> {
        match self {
            Obj::At(d, n) => sys::fchmodat(d, n, mode),
            Obj::Fd(fd) => sys::fchmod_any(fd, mode),
        }
    }

    fn utimens(self, times: &[libc::timespec; 2]) -> Result<()> {
        match self {
            Obj::At(d, n) => sys::utimensat(d, n, times),
            Obj::Fd(fd) => sys::futimens_any(fd, times),
        }
    }

    fn stat(self) -> Result<Stat> {
        match self {
            Obj::At(d, n) => sys::fstatat(d, n),
            Obj::Fd(fd) => sys::fstat(fd),
        }
    }

    /// A new fd of the object itself, never of a symlink's target.
    fn open(self, flags: i32) -> Result<OwnedFd> {
        match self {
            Obj::At(d, n) => sys::openat(d, n, flags, 0),
            Obj::Fd(fd) => sys::reopen(fd, flags),
        }
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
