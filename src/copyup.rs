//! Copy-up (the kernel's `copy_up.c`): a lower object is rebuilt in the
//! workdir with its data and metadata, then renamed into the upper layer, so a
//! crash never leaves a half-copied file visible. With metacopy=on a regular
//! file that is not opened for write gets its metadata only, marked
//! `trusted.overlay.metacopy`; its data follows at the first write.

use crate::error::Result;
use crate::inode::{Inode, Key, ROOT};
use crate::layer::{LayerIdx, UPPER};
use crate::overlay::{Overlay, Ox};
use crate::sys::{self, Stat};
use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

/// One copy-up in progress (the kernel's `struct ovl_copy_up_ctx`).
struct CopyUpCtx {
    node: Arc<Inode>,
    /// The node's parent, already in the upper layer, and its upper dir.
    parent: Arc<Inode>,
    upper_dir: Arc<OwnedFd>,
    name: CString,
    /// The layer the node comes from, and its parent dir there.
    lower: LayerIdx,
    lower_dir: Arc<OwnedFd>,
    /// index=on: the index name of a non-dir (its lower file's handle).
    index: Option<CString>,
    /// A write follows: the data too, not only metadata.
    data: bool,
}

/// Whether `node` is in the upper layer (with its data, for `data`).
fn copied_up(node: &Inode, data: bool) -> bool {
    node.top() == Some(UPPER) && (!data || !node.has_lowerdata())
}

impl Overlay {
    /// Makes sure `node` exists in the upper layer, copying up its parents
    /// first; with metacopy=on a regular file may get its metadata only.
    pub fn copy_up(&self, node: &Arc<Inode>) -> Result<()> {
        self.copy_up_with(node, false)
    }

    /// Copy-up for a write: the upper file gets the data too.
    pub(crate) fn copy_up_data(&self, node: &Arc<Inode>) -> Result<()> {
        self.copy_up_with(node, true)
    }

    /// As the kernel's `ovl_copy_up_flags`: the topmost ancestor not yet
    /// in the upper layer first, then the next, down to `node` (a loop, so
    /// a deep tree needs no deep stack).
    fn copy_up_with(&self, node: &Arc<Inode>, data: bool) -> Result<()> {
        self.check_writable()?;
        while !copied_up(node, data) {
            let mut next = node.clone();
            while let Some((parent, _)) = next.alias() {
                if copied_up(&parent, false) {
                    break;
                }
                next = parent;
            }
            if next.nodeid == ROOT {
                // Its upper layer is its own root: nothing to copy.
                return Ok(());
            }
            self.copy_up_one(&next, data && Arc::ptr_eq(&next, node))?;
        }
        Ok(())
    }

    /// Copies up one node whose parent is in the upper layer.
    fn copy_up_one(&self, node: &Arc<Inode>, data: bool) -> Result<()> {
        let _guard = node.copyup_lock.lock();
        // Another thread may have finished it while we waited.
        if copied_up(node, data) {
            return Ok(());
        }
        if node.top() == Some(UPPER) {
            return self.copy_up_meta_data(node);
        }
        let c = self.copy_up_ctx(node, data)?;
        if let Some(entry) = self.index_dir_entry(node).filter(|_| c.index.is_some()) {
            // Another name of this lower hard link was copied up: link it.
            return self.link_to_index(&c, entry);
        }
        let mut st = sys::fstatat(c.lower_dir.as_fd(), &c.name)?;
        // The upper copy stores layer ids, whatever mount the lower is on.
        let idmapped = self.layers.get(c.lower).idmapped;
        st.st_uid = self.cfg.ids.uid.copied(st.st_uid, idmapped);
        st.st_gid = self.cfg.ids.gid.copied(st.st_gid, idmapped);
        let indexed = c.index.is_some() && self.indexes(&st);
        let meta = !data && self.cfg.metacopy && sys::mode_type(st.st_mode) == libc::S_IFREG;
        let upper_dir = c.upper_dir.as_fd();
        // The parent's times are restored afterwards, as the kernel does.
        let pst = sys::fstat(upper_dir)?;
        // As the kernel: the parent may now hold non-pure upper entries.
        self.set_impure(&c.parent, upper_dir);
        let work = self.work_fd()?;
        let tmp = self.tmp_name();
        let built = self.build_copy(c.lower_dir.as_fd(), &c.name, &st, work, &tmp, indexed, meta);
        let installed = built.and_then(|()| match (&c.index, indexed) {
            (Some(iname), true) => {
                self.install_indexed(work, &tmp, st.st_nlink, iname, upper_dir, &c.name)
            }
            _ => sys::renameat2(work, &tmp, upper_dir, &c.name, 0),
        });
        if let Err(e) = installed {
            self.remove_tmp(work, &tmp, &st);
            // Another name of the same lower file was indexed meanwhile.
            return match self.index_dir_entry(node).filter(|_| indexed) {
                Some(entry) => self.link_to_index(&c, entry),
                None => Err(e),
            };
        }
        let _ = sys::utimensat(upper_dir, c".", &sys::stat_times(&pst));

        let ust = sys::fstatat(upper_dir, &c.name)?;
        // As the kernel: a copied-up lower hard link is a new file with the
        // upper inode's number; anything else keeps its number.
        let mut ino = node.ino();
        if !node.is_dir() && st.st_nlink > 1 && !indexed {
            ino = self.xino(ust.st_ino, ust.st_dev);
            node.set_ino(ino);
            self.inval_attr(node.nodeid);
        }
        if ino != ust.st_ino {
            self.copied_inos.insert(ust.st_ino, ino);
        }
        if meta {
            let data = sys::openat(c.lower_dir.as_fd(), &c.name, libc::O_PATH, 0)?;
            node.set_lowerdata(Some(Arc::new(data)));
        }
        self.node_now_upper(node, &ust);
        if node.is_dir() {
            // A merged dir reports one link and hides whiteouts that a
            // one-layer dir lists: the kernel's cached attrs and listing are stale.
            self.inval_dir(node.nodeid);
        }
        crate::stats::COUNTERS.copy_up();
        log::debug!("copied up {:?} (node {})", c.name, node.nodeid);
        Ok(())
    }

    /// What a copy-up of `node` works on (the kernel's `ovl_copy_up_ctx`).
    fn copy_up_ctx(&self, node: &Arc<Inode>, data: bool) -> Result<CopyUpCtx> {
        let (parent, name) = node.alias().ok_or_else(|| sys::err(libc::ENOENT))?;
        let lower = node.top().ok_or_else(|| sys::err(libc::ENOENT))?;
        let (lower_dir, _) = self.entry_in(node, lower)?;
        let upper_dir = self.dir_fd(&parent, UPPER)?;
        Ok(CopyUpCtx {
            node: node.clone(),
            name: sys::cstr(&name)?,
            parent,
            lower,
            lower_dir,
            upper_dir,
            index: node.index_name().filter(|_| !node.is_dir()),
            data,
        })
    }

    /// Links the node's name to its lower hard link's index entry, which
    /// another name copied up; a write then needs the data too.
    fn link_to_index(&self, c: &CopyUpCtx, entry: (Arc<OwnedFd>, CString)) -> Result<()> {
        let upper_dir = c.upper_dir.as_fd();
        let ust = self.link_up(&c.parent, upper_dir, &c.name, (entry.0.as_fd(), entry.1))?;
        self.linked_up(&c.node, &c.parent, c.lower, &c.name, &ust);
        if c.data && c.node.has_lowerdata() {
            return self.copy_up_meta_data(&c.node);
        }
        Ok(())
    }

    /// The data of a metadata-only copy, copied into it in place (the
    /// kernel's `ovl_copy_up_meta_inode_data`); then the mark goes.
    fn copy_up_meta_data(&self, node: &Arc<Inode>) -> Result<()> {
        let Some(lower) = node.lowerdata() else {
            // The lower data was never found: nothing to read it from.
            return Err(sys::err(libc::EIO));
        };
        let (pfd, name) = self.entry_in(node, UPPER)?;
        // Names of one hard link are separate nodes sharing the copy: one
        // copies the data, under this lock, and the others see it done
        // (copying again would undo writes made since).
        let _one = self.metacopy_lock.lock();
        let out = sys::openat(pfd.as_fd(), &name, libc::O_WRONLY, 0)?;
        if sys::getxattr(out.as_fd(), self.xattr(Ox::Metacopy)).is_err() {
            node.set_lowerdata(None);
            return Ok(());
        }
        let input = sys::reopen(lower.as_fd(), libc::O_RDONLY)?;
        let size = sys::fstat(input.as_fd())?.st_size as u64;
        copy_data(input.as_fd(), out.as_fd(), size)?;
        if self.cfg.syncs() {
            sys::fsync(out.as_fd(), false)?;
        }
        sys::removexattr(out.as_fd(), self.xattr(Ox::Metacopy))?;
        node.set_lowerdata(None);
        Ok(())
    }

    /// A name linked to its index entry; if that is a metadata-only copy,
    /// the data stays in the name's lower file.
    fn linked_up(
        &self,
        node: &Arc<Inode>,
        parent: &Arc<Inode>,
        lower: LayerIdx,
        name: &CStr,
        ust: &Stat,
    ) {
        self.node_now_upper(node, ust);
        let data = if self.is_metacopy(node) {
            self.dir_fd(parent, lower)
                .and_then(|d| sys::openat(d.as_fd(), name, libc::O_PATH, 0))
                .ok()
                .map(Arc::new)
        } else {
            None
        };
        node.set_lowerdata(data);
    }

    /// Whether a node's data is still below it: its copy (upper or index)
    /// keeps the metacopy mark until another name's write copies the data.
    pub(crate) fn refresh_lowerdata(&self, node: &Arc<Inode>) {
        if node.has_lowerdata() {
            if !self.is_metacopy(node) {
                node.set_lowerdata(None);
            }
        } else if let Some(own) = self.own_lower_data(node) {
            // Another name's metadata copy became the index entry since
            // this one was looked up.
            node.set_lowerdata(Some(own));
        }
    }

    /// Whether the node's real object carries the metacopy mark.
    fn is_metacopy(&self, node: &Arc<Inode>) -> bool {
        self.path_fd(node)
            .and_then(|fd| sys::getxattr(fd.as_fd(), self.xattr(Ox::Metacopy)))
            .is_ok()
    }

    /// A copied-up node's top layer is the upper one, and its key the upper inode.
    fn node_now_upper(&self, node: &Arc<Inode>, ust: &Stat) {
        let is_dir = node.is_dir();
        let key = Key::Real(self.layers.get(UPPER).dev, ust.st_ino);
        // Layers and key change together: a reader checks one against the other.
        self.table.rekey_with(node, key, |s| {
            let mut layers: Vec<LayerIdx> = vec![UPPER];
            if is_dir {
                layers.extend(s.layers.as_slice().iter().copied());
                // A new upper dir: no `.wh.` marker in it.
                s.upper_markers = crate::inode::Markers::None;
            }
            s.layers = crate::inode::LayerList::from_vec(layers);
            s.default_acl = None;
            // The copy may carry what the lower object lacked (a label).
            s.xattrs = crate::inode::Xattrs::Unknown;
        });
    }

    /// Builds the copy at `work/tmp`.
    #[allow(clippy::too_many_arguments)]
    fn build_copy(
        &self,
        ldir: BorrowedFd<'_>,
        name: &CStr,
        st: &Stat,
        work: BorrowedFd<'_>,
        tmp: &CStr,
        indexed: bool,
        meta: bool,
    ) -> Result<()> {
        let src = sys::openat(ldir, name, libc::O_PATH, 0)?;
        match sys::mode_type(st.st_mode) {
            libc::S_IFREG => {
                let out = sys::openat(
                    work,
                    tmp,
                    libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
                    0o600,
                )?;
                if meta {
                    // A metadata-only copy has the size, and no data yet.
                    sys::ftruncate(out.as_fd(), st.st_size as u64)?;
                } else {
                    let input = sys::reopen(src.as_fd(), libc::O_RDONLY)?;
                    copy_data(input.as_fd(), out.as_fd(), st.st_size as u64)?;
                    if self.cfg.syncs() {
                        sys::fsync(out.as_fd(), false)?;
                    }
                }
            }
            libc::S_IFDIR => sys::mkdirat(work, tmp, 0o700)?,
            libc::S_IFLNK => {
                let target = sys::readlinkat(ldir, name)?;
                sys::symlinkat(&sys::cstr(&target)?, work, tmp)?;
            }
            _ => sys::mknodat(work, tmp, st.st_mode, st.st_rdev)?,
        }
        let dst = sys::openat(work, tmp, libc::O_PATH, 0)?;
        // Owner before mode (chown clears setuid), xattrs after owner
        // (chown clears file capabilities), times last.
        set_owner_mode(work, tmp, dst.as_fd(), st)?;
        self.copy_xattrs(src.as_fd(), dst.as_fd())?;
        // Like the kernel: a lower hard link gets no origin, its copy is a
        // new inode, unless the index keeps its names together.
        if sys::is_dir(st.st_mode) || st.st_nlink == 1 || indexed {
            self.set_origin(src.as_fd(), dst.as_fd());
        }
        if meta {
            sys::setxattr(dst.as_fd(), self.xattr(Ox::Metacopy), b"", 0)?;
        }
        sys::utimensat(work, tmp, &sys::stat_times(st))
    }

    /// Copies every xattr but the overlay's own.
    fn copy_xattrs(&self, src: BorrowedFd<'_>, dst: BorrowedFd<'_>) -> Result<()> {
        let list = match sys::listxattr(src) {
            Ok(l) => l,
            Err(e) if matches!(e.raw(), libc::ENOTSUP) => return Ok(()),
            Err(e) => return Err(e),
        };
        for raw in list.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            let Ok(name) = std::ffi::CString::new(raw) else {
                continue;
            };
            if self.is_private_xattr(raw) {
                continue;
            }
            let val = match sys::getxattr(src, &name) {
                Ok(v) => v,
                Err(e) if e.raw() == libc::ENODATA => continue,
                Err(e) => return Err(e),
            };
            match sys::setxattr(dst, &name, &val, 0) {
                Ok(()) => {}
                // Like the kernel, skip what the upper fs does not support.
                Err(e) if matches!(e.raw(), libc::ENOTSUP | libc::EPERM) => {
                    log::debug!("copy-up: xattr {:?} not copied: {}", name, e);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Records `origin` as the kernel does: a file handle of the lower
    /// object. A layer without file handles gets none (nothing needs it).
    fn set_origin(&self, src: BorrowedFd<'_>, dst: BorrowedFd<'_>) {
        if let Some(fh) = self.encode_fh(src, false) {
            if let Err(e) = sys::setxattr(dst, self.xattr(Ox::Origin), &fh, 0) {
                log::debug!("copy-up: no origin recorded: {e}");
            }
        }
    }

    /// The kernel's `struct ovl_fb`: version 0, magic 0xfb, length, flags,
    /// handle type, the layer fs UUID, then the handle.
    pub(crate) fn encode_fh(&self, fd: BorrowedFd<'_>, upper: bool) -> Option<Vec<u8>> {
        let (typ, handle) = sys::file_handle(fd).ok()?;
        let st = sys::fstat(fd).ok()?;
        let uuid = self
            .layers
            .all
            .iter()
            .find(|l| l.dev == st.st_dev)
            .map(|l| l.uuid)
            .unwrap_or([0; 16]);
        let len = 21 + handle.len();
        if len > 255 || !(0..=255).contains(&typ) {
            return None;
        }
        let mut flags = 0u8;
        if cfg!(target_endian = "big") {
            flags |= 1;
        }
        if upper {
            flags |= 4;
        }
        let mut fb = vec![0u8, 0xfb, len as u8, flags, typ as u8];
        fb.extend_from_slice(&uuid);
        fb.extend_from_slice(&handle);
        Some(fb)
    }

    /// Finds the lower object an origin file handle names, as the kernel's
    /// `ovl_check_origin`: in the first lower layer whose filesystem
    /// matches the handle's UUID.
    pub(crate) fn decode_origin(&self, fb: &[u8]) -> Option<Stat> {
        if fb.len() < 21 || fb[0] != 0 || fb[1] != 0xfb || fb[2] as usize != fb.len() {
            return None;
        }
        let typ = fb[4] as i32;
        let uuid = &fb[5..21];
        let handle = &fb[21..];
        for l in self.layers.indices() {
            if self.layers.is_upper(l) {
                continue;
            }
            let layer = self.layers.get(l);
            if layer.uuid != uuid {
                continue;
            }
            if let Ok(fd) = sys::open_by_handle(layer.handle_root.as_fd(), typ, handle) {
                return sys::fstat(fd.as_fd()).ok();
            }
        }
        None
    }

    /// Marks an upper dir as holding copied-up entries (`impure=y`).
    pub(crate) fn set_impure(&self, dir: &Arc<Inode>, fd: BorrowedFd<'_>) {
        if dir.state.read().impure {
            return;
        }
        let name = self.xattr(Ox::Impure);
        let already = matches!(sys::getxattr(fd, name), Ok(v) if v == b"y");
        if already || sys::setxattr(fd, name, b"y", 0).is_ok() {
            dir.state.write().impure = true;
            // As the kernel: the next readdir of a newly impure dir reads it
            // again (and drops a mark that no entry needs).
            self.inval_dir(dir.nodeid);
        }
    }

    /// The overlay's own xattrs; escaped ones (`<prefix>overlay.X`) belong to the user.
    pub(crate) fn is_private_xattr(&self, name: &[u8]) -> bool {
        let p = self.xattr_prefix.as_bytes();
        name.starts_with(p) && !name[p.len()..].starts_with(b"overlay.")
    }

    /// Removes a half-built object from the workdir.
    fn remove_tmp(&self, work: BorrowedFd<'_>, tmp: &CStr, st: &Stat) {
        let flags = if sys::is_dir(st.st_mode) {
            libc::AT_REMOVEDIR
        } else {
            0
        };
        let _ = sys::unlinkat(work, tmp, flags);
    }
}

/// Copies file data: FICLONE when the fs shares extents, else
/// copy_file_range in 1 MiB chunks (read/write as the fallback). Holes are
/// skipped as the kernel's copy-up skips them: a SEEK_DATA before each
/// chunk. (SEEK_HOLE would be exact, but tmpfs answers it by walking every
/// page of the data that follows: 64 us for 8 MiB.)
pub fn copy_data(input: BorrowedFd<'_>, out: BorrowedFd<'_>, size: u64) -> Result<()> {
    const CHUNK: i64 = 1 << 20;
    if size == 0 {
        return Ok(());
    }
    if sys::ficlone(out, input).is_ok() {
        crate::stats::COUNTERS.copied(size);
        return Ok(());
    }
    let end = size as i64;
    let mut pos: i64 = 0;
    let mut skip_holes = true;
    let mut since_check = 0;
    while pos < end {
        // An interrupted caller (Ctrl-C) stops the copy, as the kernel's
        // does; the caller of copy_data drops the partial copy.
        since_check += 1;
        if since_check == 16 {
            since_check = 0;
            if crate::request::signal_pending() {
                return Err(sys::err(libc::EINTR));
            }
        }
        if skip_holes {
            match sys::lseek(input, pos, libc::SEEK_DATA) {
                Ok(d) if d > pos => {
                    pos = d;
                    continue;
                }
                Ok(_) => {}
                // No more data: the rest is a hole.
                Err(e) if e.raw() == libc::ENXIO => break,
                Err(_) => skip_holes = false,
            }
        }
        let len = CHUNK.min(end - pos);
        copy_range(input, out, pos, len)?;
        crate::stats::COUNTERS.copied(len as u64);
        pos += len;
    }
    sys::ftruncate(out, size)
}

fn copy_range(input: BorrowedFd<'_>, out: BorrowedFd<'_>, start: i64, len: i64) -> Result<()> {
    let mut off_in = start;
    let mut off_out = start;
    let mut left = len;
    while left > 0 {
        match sys::copy_file_range(input, &mut off_in, out, &mut off_out, left as usize) {
            Ok(0) => break,
            Ok(n) => left -= n as i64,
            Err(e)
                if matches!(
                    e.raw(),
                    libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL
                ) =>
            {
                return copy_rw(input, out, off_in, left);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn copy_rw(input: BorrowedFd<'_>, out: BorrowedFd<'_>, mut off: i64, mut left: i64) -> Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let want = (left as usize).min(buf.len());
        let n = sys::pread(input, &mut buf[..want], off as u64)?;
        if n == 0 {
            break;
        }
        let mut done = 0;
        while done < n {
            done += sys::pwrite(out, &buf[done..n], off as u64 + done as u64)?;
        }
        off += n as i64;
        left -= n as i64;
    }
    Ok(())
}

/// Sets owner, then mode: chown clears setuid, so the mode comes after it.
pub fn set_owner_mode(
    dir: BorrowedFd<'_>,
    name: &CStr,
    fd: BorrowedFd<'_>,
    st: &Stat,
) -> Result<()> {
    sys::fchownat(dir, name, st.st_uid, st.st_gid)?;
    if sys::mode_type(st.st_mode) != libc::S_IFLNK {
        sys::fchmod_any(fd, st.st_mode & 0o7777)?;
    }
    Ok(())
}
