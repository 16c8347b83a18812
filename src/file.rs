//! File operations (the kernel's `file.c`): open handles and data I/O.
//! Opening for write copies up first; a read-only handle opened before a
//! copy-up switches to the upper file, as the kernel's does.

use crate::error::{Errno, Result};
use crate::inode::{Inode, ROOT};
use crate::layer::UPPER;
use crate::options::PassthroughMode;
use crate::overlay::Overlay;
use crate::sys;
use dashmap::DashMap;
use parking_lot::{Mutex, RwLock};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

pub struct Handle {
    pub node: Arc<Inode>,
    fd: RwLock<Arc<OwnedFd>>,
    flags: i32,
    pub writable: bool,
    in_upper: AtomicBool,
    /// Keeps the kernel passthrough backing file registered while open.
    backing: Mutex<Option<Arc<fuser::BackingId>>>,
    /// Counted in its node's cached opens.
    cached: AtomicBool,
}

impl Drop for Handle {
    fn drop(&mut self) {
        let cached = self.cached.load(Ordering::Relaxed);
        // Our share of the backing goes first: with the last one, the
        // node's record of it (and the box holding that) can go too.
        let backed = self.backing.get_mut().take().is_some();
        if cached || backed {
            self.node.with_io(|io| {
                if cached {
                    io.cached = io.cached.saturating_sub(1);
                }
            });
        }
    }
}

impl Handle {
    /// Whether the handle's fd is the upper file.
    pub fn is_upper(&self) -> bool {
        self.in_upper.load(Ordering::Acquire)
    }

    pub fn set_backing(&self, b: Arc<fuser::BackingId>) {
        *self.backing.lock() = Some(b);
    }

    /// Marks the handle as a cached open of its node (inside `Inode::with_io`).
    pub fn set_cached(&self, io: &mut crate::inode::IoMode) {
        self.cached.store(true, Ordering::Relaxed);
        io.cached += 1;
    }

    pub fn fd(&self) -> Arc<OwnedFd> {
        self.fd.read().clone()
    }
}

/// Open files, by FUSE file handle.
#[derive(Default)]
pub struct Handles {
    map: DashMap<u64, Arc<Handle>>,
    next: AtomicU64,
}

impl Handles {
    /// The handle `fh` of node `ino`: a handle number the kernel sends
    /// with another node is refused, as fuse-backend-rs' `HandleMap` does.
    pub fn get(&self, fh: u64, ino: u64) -> Option<Arc<Handle>> {
        self.map
            .get(&fh)
            .filter(|h| h.node.nodeid == ino)
            .map(|h| h.clone())
    }

    /// A handle just made here (no request names it yet).
    pub fn get_own(&self, fh: u64) -> Option<Arc<Handle>> {
        self.map.get(&fh).map(|h| h.clone())
    }

    fn insert(&self, h: Handle) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.map.insert(fh, Arc::new(h));
        fh
    }

    /// Any open handle of a node: an unlinked file is reached only through these.
    pub fn any_of(&self, nodeid: u64) -> Option<Arc<Handle>> {
        self.map
            .iter()
            .find(|h| h.node.nodeid == nodeid)
            .map(|h| h.clone())
    }

    pub fn remove(&self, fh: u64) -> Option<Arc<Handle>> {
        self.map.remove(&fh).map(|(_, h)| h)
    }
}

/// Flags never passed to the real open: the kernel handles them above us.
const STRIP: i32 = libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_APPEND | libc::O_DIRECT;

fn wants_write(flags: i32) -> bool {
    flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0
}

/// How an open file's data flows.
pub enum Passthrough {
    /// Straight to this backing file, in the kernel.
    Backing(Arc<fuser::BackingId>),
    /// Through us and the page cache.
    Cached,
    /// A writable open of an inode whose backing is a lower file: the
    /// handle is dropped and the kernel must look the name up again.
    Stale(Errno),
}

impl Overlay {
    /// Picks the data path of a new handle. All opens of an inode share
    /// one backing file, as the kernel requires. Upper files go through the
    /// kernel's passthrough, and so do read-only opens of lower files with
    /// `passthrough=all` (the default); a write then gets a new inode
    /// instead of sharing their backing (which would write the lower file).
    /// `passthrough=upper` keeps lower files cached, so that an open
    /// read-only file follows a later copy-up as in the kernel overlay. An
    /// inode with cached opens keeps new ones cached, as the kernel does
    /// not mix the two.
    pub(crate) fn passthrough(
        &self,
        files: &Handles,
        fh: u64,
        open_backing: impl FnOnce(&OwnedFd) -> Result<fuser::BackingId>,
    ) -> Passthrough {
        let Some(h) = files.get_own(fh) else {
            return Passthrough::Cached;
        };
        let wanted = match self.cfg.passthrough {
            PassthroughMode::Off => false,
            PassthroughMode::Upper => h.is_upper(),
            PassthroughMode::All => h.is_upper() || !h.writable,
        };
        let chosen = h.node.with_io(|io| {
            // A copied-up file no open file reads from below: its kept
            // lower backing goes, and its upper file is the backing now.
            if io.lower && h.is_upper() && io.backing_users() == 0 {
                io.drop_kept();
            }
            if let Some(b) = io.backing.as_ref().and_then(|w| w.upgrade()) {
                if io.lower && h.writable {
                    return None;
                }
                // Read-only opens share it: the data changes only through a
                // writable open, which never shares a lower backing.
                h.set_backing(b.clone());
                return Some(Passthrough::Backing(b));
            }
            if !self.passthrough.load(Ordering::Relaxed) || !wanted || io.cached > 0 {
                h.set_cached(io);
                return Some(Passthrough::Cached);
            }
            Some(match open_backing(&h.fd()) {
                Ok(b) => {
                    let b = Arc::new(b);
                    io.backing = Some(Arc::downgrade(&b));
                    io.lower = !h.is_upper();
                    if io.lower {
                        io.kept = Some(b.clone());
                    }
                    h.set_backing(b.clone());
                    Passthrough::Backing(b)
                }
                Err(e) => {
                    log::debug!("passthrough refused: {e}");
                    h.set_cached(io);
                    Passthrough::Cached
                }
            })
        });
        chosen.unwrap_or_else(|| {
            // A write may not share a lower backing: this open goes, and
            // the node with it.
            files.remove(fh);
            Passthrough::Stale(self.leave_lower_backing(&h.node))
        })
    }

    /// Opens `nodeid`; `kill_suid_gid`: an `O_TRUNC` open by a caller
    /// without `CAP_FSETID`, which drops set-user-ID and set-group-ID.
    pub(crate) fn open(
        &self,
        nodeid: u64,
        flags: i32,
        kill_suid_gid: bool,
        handles: &Handles,
    ) -> Result<u64> {
        let fh = self.open_handle(nodeid, flags, handles)?;
        if kill_suid_gid {
            if let Err(e) = self.kill_suid_gid(nodeid, fh, handles) {
                handles.remove(fh);
                return Err(e);
            }
        }
        Ok(fh)
    }

    fn open_handle(&self, nodeid: u64, flags: i32, handles: &Handles) -> Result<u64> {
        let node = self.node(nodeid)?;
        if node.is_dir() {
            return Err(sys::err(libc::EISDIR));
        }
        let write = wants_write(flags);
        if write {
            self.check_writable()?;
            self.copy_up_data(&node)?;
        }
        // A metadata-only copy is read from its lower file.
        self.refresh_lowerdata(&node);
        let lowerdata = node.lowerdata();
        if let Some(lower) = lowerdata {
            let fd = sys::reopen(lower.as_fd(), flags & !STRIP & !libc::O_NOFOLLOW)?;
            return Ok(self.new_handle(&node, fd, flags, handles));
        }
        let (top, key) = node.top_and_key();
        let top = top.ok_or_else(|| sys::err(libc::ENOENT))?;
        let (pfd, name) = match self.entry_in(&node, top) {
            Ok(e) => e,
            Err(e) => {
                let held = node.held().ok_or(e)?;
                let fd = sys::reopen(held.as_fd(), flags & !STRIP & !libc::O_NOFOLLOW)?;
                return Ok(self.new_handle(&node, fd, flags, handles));
            }
        };
        let fd = match sys::openat(pfd.as_fd(), &name, flags & !STRIP, 0) {
            Ok(fd) => fd,
            Err(e) => {
                // Another object held the name: a whiteout opens as ENXIO,
                // which a regular file never gives (the name may hold a
                // new file with the old number by the time we look again).
                if e.raw() == libc::ENXIO && node.kind == libc::S_IFREG {
                    return Err(sys::err(libc::ESTALE));
                }
                if let Ok(st) = sys::fstatat(pfd.as_fd(), &name) {
                    self.check_same(&node, &key, &st)?;
                }
                return Err(e);
            }
        };
        // Lower layers never change: only an upper name can have been
        // taken by another object since it was resolved.
        if self.layers.is_upper(top) {
            self.check_same(&node, &key, &sys::fstat(fd.as_fd())?)?;
        }
        Ok(self.new_handle(&node, fd, flags, handles))
    }

    /// For a request on `node` whose name failed it with `e`: when the
    /// name no longer leads to the node's object (unlinked, or renamed over,
    /// while open), one of its open files, as fd operations reach it in the
    /// kernel; else `e`.
    pub(crate) fn open_file_fd(
        &self,
        node: &Arc<Inode>,
        handles: &Handles,
        e: Errno,
    ) -> Result<Arc<OwnedFd>> {
        if !matches!(e.raw(), libc::ENOENT | libc::ESTALE) {
            return Err(e);
        }
        handles.any_of(node.nodeid).map(|h| h.fd()).ok_or(e)
    }

    /// An `O_PATH` fd of the node's real object, or of an open file of it
    /// when its name is gone (`open_file_fd`); says which.
    pub(crate) fn object_fd(
        &self,
        node: &Arc<Inode>,
        handles: &Handles,
    ) -> Result<(OwnedFd, bool)> {
        match self.path_fd(node) {
            // A held object (see `Inode::held`) has no name to use either.
            Ok(fd) => Ok((fd, node.nodeid != ROOT && node.alias().is_none())),
            Err(e) => {
                let fd = self.open_file_fd(node, handles, e)?;
                Ok((sys::reopen(fd.as_fd(), libc::O_PATH)?, true))
            }
        }
    }

    /// With `passthrough=all`, read-only opens of a lower file read it in
    /// the kernel, and the kernel gives an inode one backing file. A change
    /// of the data then needs a new inode: this node leaves its names, and
    /// ESTALE makes the kernel look the name up again (open, truncate and
    /// the other path calls retry once with `LOOKUP_REVAL`), which finds a
    /// new node. Open files of the old one keep reading the lower file.
    pub(crate) fn leave_lower_backing(&self, node: &Arc<Inode>) -> Errno {
        log::debug!("node {} leaves its lower passthrough file", node.nodeid);
        self.table.unkey(node);
        node.clear_aliases();
        sys::err(libc::ESTALE)
    }

    pub(crate) fn new_handle(
        &self,
        node: &Arc<Inode>,
        fd: OwnedFd,
        flags: i32,
        handles: &Handles,
    ) -> u64 {
        let in_upper = node.top() == Some(UPPER) && self.layers.has_upper && !node.has_lowerdata();
        handles.insert(Handle {
            node: node.clone(),
            fd: RwLock::new(Arc::new(fd)),
            flags,
            writable: flags & libc::O_ACCMODE != libc::O_RDONLY,
            in_upper: AtomicBool::new(in_upper),
            backing: Mutex::new(None),
            cached: AtomicBool::new(false),
        })
    }

    /// The fd to read through: the upper file once the node was copied up.
    fn read_fd(&self, h: &Handle) -> Result<Arc<OwnedFd>> {
        if !h.in_upper.load(Ordering::Acquire)
            && self.layers.has_upper
            && h.node.top() == Some(UPPER)
            && !h.node.has_lowerdata()
        {
            let (pfd, name) = self.entry_in(&h.node, UPPER)?;
            let fd = Arc::new(sys::openat(
                pfd.as_fd(),
                &name,
                h.flags & !STRIP & !libc::O_TRUNC,
                0,
            )?);
            *h.fd.write() = fd.clone();
            h.in_upper.store(true, Ordering::Release);
            return Ok(fd);
        }
        Ok(h.fd())
    }

    /// Reads up to `size` bytes at `off` and hands them to `reply`. The
    /// buffer is the thread's own and is reused: a fresh megabyte per read
    /// costs more (page faults and zeroing) than the read itself.
    pub(crate) fn read<R>(
        &self,
        h: &Handle,
        off: u64,
        size: u32,
        reply: impl FnOnce(&[u8]) -> R,
    ) -> Result<R> {
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let fd = self.read_fd(h)?;
        BUF.with(|b| {
            let mut buf = b.borrow_mut();
            let size = size as usize;
            if buf.len() < size {
                buf.resize(size, 0);
            }
            let mut done = 0;
            while done < size {
                let n = sys::pread(fd.as_fd(), &mut buf[done..size], off + done as u64)?;
                if n == 0 {
                    break;
                }
                done += n;
            }
            Ok(reply(&buf[..done]))
        })
    }

    pub(crate) fn write(&self, h: &Handle, off: u64, data: &[u8]) -> Result<usize> {
        let fd = h.fd();
        let mut done = 0;
        while done < data.len() {
            done += sys::pwrite(fd.as_fd(), &data[done..], off + done as u64)?;
        }
        Ok(done)
    }

    pub(crate) fn fsync(&self, h: &Handle, datasync: bool) -> Result<()> {
        // As the kernel's `volatile`: syncs are skipped.
        if !self.cfg.syncs() {
            return Ok(());
        }
        sys::fsync(self.read_fd(h)?.as_fd(), datasync)
    }

    pub(crate) fn fallocate(&self, h: &Handle, mode: i32, off: u64, len: u64) -> Result<()> {
        sys::fallocate(h.fd().as_fd(), mode, off, len)
    }

    pub(crate) fn lseek(&self, h: &Handle, off: i64, whence: i32) -> Result<i64> {
        sys::lseek(self.read_fd(h)?.as_fd(), off, whence)
    }

    pub(crate) fn copy_file_range(
        &self,
        hin: &Handle,
        off_in: u64,
        hout: &Handle,
        off_out: u64,
        len: u64,
    ) -> Result<usize> {
        let fin = self.read_fd(hin)?;
        let fout = hout.fd();
        let (mut oi, mut oo) = (off_in as i64, off_out as i64);
        sys::copy_file_range(fin.as_fd(), &mut oi, fout.as_fd(), &mut oo, len as usize)
    }
}
