//! Directory operations (the kernel's `dir.c`): create, remove and rename
//! names in the merged view, with whiteouts and opaque directories.

use crate::error::Result;
use crate::file::Handles;
use crate::inode::{Held, Inode, Markers, Redirect, Xattrs};
use crate::layer::UPPER;
use crate::lookup::Found;
use crate::options::RedirectDir;
use crate::overlay::{cstr_of, Counted, Overlay, Ox};
use crate::sys::{self, Stat};
use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

/// The kernel's default `redirect_max`.
const REDIRECT_MAX: usize = 256;

/// What to create.
#[derive(Clone, Copy)]
pub enum NewObj<'a> {
    File { flags: i32 },
    Dir,
    Node { rdev: u64 },
    Symlink { target: &'a CStr },
    Link { src: &'a Arc<Inode> },
}

/// The caller's identity, for the owner of new objects.
#[derive(Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

impl Overlay {
    /// The umask applies unless the parent has a default ACL, which the
    /// upper filesystem then applies instead (POSIX ACL semantics).
    pub(crate) fn masked(&self, parent: u64, mode: u32, umask: u32, files: &Handles) -> u32 {
        let node = self.node(parent).ok();
        // Known after the first create in the dir: one system call less
        // per create (the kernel holds the dir's lock for xattr changes
        // and creates alike, so none races with this).
        let known = node.as_ref().and_then(|n| n.state.read().default_acl);
        let has_default_acl = known.unwrap_or_else(|| {
            let acl = OsStr::new("system.posix_acl_default");
            let r = self.getxattr(parent, acl, files);
            let sure = r.as_ref().map_or_else(
                |e| matches!(e.raw(), libc::ENODATA | libc::EOPNOTSUPP),
                |_| true,
            );
            if let Some(n) = node.as_ref().filter(|_| sure) {
                n.state.write().default_acl = Some(r.is_ok());
            }
            r.is_ok()
        });
        if has_default_acl {
            mode
        } else {
            mode & !umask
        }
    }

    /// Creates `name` in `parent`. Returns the node, its stat and, for
    /// files, the open fd.
    pub(crate) fn create_obj(
        &self,
        parent_id: u64,
        name: &OsStr,
        mode: u32,
        obj: NewObj<'_>,
        who: Caller,
    ) -> Result<(Counted<'_>, Stat, Option<OwnedFd>)> {
        let parent = self.node(parent_id)?;
        // In a dir of the upper layer alone nothing below can hold the
        // name: the create's own EEXIST is the check, one system call
        // less. Something there (a whiteout too) takes the full way.
        let upper_only = parent.state.read().layers.as_slice() == [UPPER];
        if upper_only && !matches!(obj, NewObj::Link { .. }) {
            match self.create_in(&parent, name, mode, obj, who, false) {
                Err(e) if e.raw() == libc::EEXIST => {}
                r => return r,
            }
        }
        self.create_in(&parent, name, mode, obj, who, true)
    }

    /// [`Self::create_obj`]; `probe`: look the name up first (else the
    /// caller knows only the upper dir can hold it).
    fn create_in(
        &self,
        parent: &Arc<Inode>,
        name: &OsStr,
        mode: u32,
        obj: NewObj<'_>,
        who: Caller,
        probe: bool,
    ) -> Result<(Counted<'_>, Stat, Option<OwnedFd>)> {
        self.check_writable()?;
        let cname = Self::check_name(name)?;
        Self::check_new_name(&cname)?;
        // The kernel holds the parent's lock: nothing changes the name
        // between this lookup and the create.
        let (found, over_whiteout) = if probe {
            self.find_over(parent, &cname)?
        } else {
            (None, false)
        };
        if found.is_some() {
            return Err(sys::err(libc::EEXIST));
        }
        let mut nlink_fd = None;
        if let NewObj::Link { src } = &obj {
            self.copy_up(src)?;
            // As the kernel: a metadata-only copy about to get a second
            // name records where its data is, by absolute path.
            if src.has_lowerdata() {
                let (sdir, sname) = self.entry_in(src, UPPER)?;
                if let Some(r) = self.set_redirect(src, false, sdir.as_fd(), &sname)? {
                    src.set_redirect(Some(r));
                }
            }
            nlink_fd = self.nlink_start(src)?;
        }
        self.copy_up(parent)?;
        let ufd = self.dir_fd(parent, UPPER)?;
        // As the kernel: linking a file with an origin makes the new parent impure.
        if let NewObj::Link { src } = &obj {
            if self.has_origin(src) {
                self.set_impure(parent, ufd.as_fd());
            }
        }
        let pst = sys::fstat(ufd.as_fd())?;
        let (uid, gid) = self.new_owner(&pst, who);
        let is_dir = matches!(obj, NewObj::Dir);
        // A setgid parent passes the bit on to new dirs (built in the workdir
        // over a whiteout, they would not inherit it from the upper fs).
        let mode = if is_dir && pst.st_mode & libc::S_ISGID != 0 {
            mode | libc::S_ISGID
        } else {
            mode
        };
        let mut made = None;
        let file = if over_whiteout {
            // Build in the workdir, then swap with the whiteout atomically.
            let work = self.work_fd()?;
            let scratch = self.acl_scratch(work, ufd.as_fd())?;
            let at = scratch.as_ref().map_or(work, |(_, fd)| fd.as_fd());
            let tmp = self.tmp_name();
            let r = (|| -> Result<Option<OwnedFd>> {
                // Its stat goes stale with the rename.
                let (file, _) = self.make_obj(at, &tmp, mode, &obj, uid, gid)?;
                if is_dir {
                    let fd = sys::openat(at, &tmp, libc::O_PATH, 0)?;
                    sys::setxattr(fd.as_fd(), self.xattr(Ox::Opaque), b"y", 0)?;
                }
                sys::renameat2(at, &tmp, ufd.as_fd(), &cname, libc::RENAME_EXCHANGE)?;
                Ok(file)
            })();
            // The whiteout is now at the temporary name, or the half-built
            // object is.
            let _ = sys::unlinkat(
                at,
                &tmp,
                if r.is_err() && is_dir {
                    libc::AT_REMOVEDIR
                } else {
                    0
                },
            );
            if let Some((name, _)) = scratch {
                let _ = sys::unlinkat(work, &name, libc::AT_REMOVEDIR);
            }
            r?
        } else {
            let (f, st) = self.make_obj(ufd.as_fd(), &cname, mode, &obj, uid, gid)?;
            made = Some(st);
            // As the kernel when offline changes to the layers are not
            // allowed (redirect_dir=on): a new dir in a merged dir is opaque,
            // which spares later lookups the lower layers.
            if is_dir && parent.layers().len() > 1 && !self.allow_offline_changes() {
                if let Ok(fd) = sys::openat(ufd.as_fd(), &cname, libc::O_PATH, 0) {
                    let _ = sys::setxattr(fd.as_fd(), self.xattr(Ox::Opaque), b"y", 0);
                    made = None;
                }
            }
            f
        };
        if let NewObj::Link { src } = &obj {
            self.nlink_end(src, nlink_fd.take());
            made = None;
        } else if self.override_name().is_some() && !matches!(obj, NewObj::Symlink { .. }) {
            // The owner and mode the caller asked for, as fuse-overlayfs keeps them.
            let fd = sys::openat(ufd.as_fd(), &cname, libc::O_PATH, 0)?;
            self.set_override(fd.as_fd(), Some(uid), Some(gid), Some(mode))?;
            made = None;
        }
        // The stat `make_obj` took, unless a change since made it stale.
        let st = match made {
            Some(st) => st,
            None => sys::fstatat(ufd.as_fd(), &cname)?,
        };
        let found = Found {
            st,
            layers: vec![UPPER],
            redirect: None,
            lower_ino: None,
            lowerdata: None,
            metacopy: false,
            fresh: true,
            bare: false,
        };
        let node = match obj {
            NewObj::Link { src } => {
                // A named tmpfile is reached by its name from now on.
                if src.alias().is_none() {
                    src.set_held(None);
                }
                let key = src.state.read().key.clone();
                self.table.lookup(
                    key,
                    src.kind,
                    vec![UPPER],
                    src.ino(),
                    parent,
                    &name.to_os_string(),
                );
                Counted::new(self, src.clone())
            }
            _ => {
                let node = self.instantiate(parent, name, found).0;
                let mut st = node.state.write();
                // Made by us: no capability xattr; no `.wh.` marker in a dir.
                st.xattrs = Xattrs::NoCaps;
                if is_dir {
                    st.upper_markers = Markers::None;
                }
                drop(st);
                node
            }
        };
        Ok((node, st, file))
    }

    /// An O_TMPFILE file (the kernel's `ovl_tmpfile`): made anonymous in the
    /// parent's upper dir, copied up first, and held by its node (see
    /// `Inode::held`) until `link` names it or the kernel forgets it.
    pub(crate) fn create_tmpfile(
        &self,
        parent_id: u64,
        mode: u32,
        flags: i32,
        who: Caller,
    ) -> Result<(Counted<'_>, Stat, OwnedFd)> {
        self.check_writable()?;
        let parent = self.node(parent_id)?;
        if !parent.is_dir() {
            return Err(sys::err(libc::ENOTDIR));
        }
        self.copy_up(&parent)?;
        let ufd = self.dir_fd(&parent, UPPER)?;
        let (uid, gid) = self.new_owner(&sys::fstat(ufd.as_fd())?, who);
        let perm = mode & 0o7777;
        // Never O_EXCL here: the kernel refuses to link the caller's
        // O_EXCL tmpfile itself, and ours must stay linkable for `link`.
        let fl = (flags & !(libc::O_TRUNC | libc::O_APPEND | libc::O_DIRECT | libc::O_EXCL))
            | libc::O_TMPFILE;
        let file = sys::openat(ufd.as_fd(), c".", fl, perm)?;
        sys::fchown_any(file.as_fd(), uid, gid)?;
        if perm & 0o6000 != 0 {
            // chown cleared setuid/setgid: put them back.
            sys::fchmod_any(file.as_fd(), perm)?;
        }
        if self.override_name().is_some() {
            self.set_override(file.as_fd(), Some(uid), Some(gid), Some(mode))?;
        }
        let st = sys::fstat(file.as_fd())?;
        let held = sys::reopen(file.as_fd(), libc::O_PATH)?;
        let dev = self.layers.get(UPPER).dev;
        let node = self.table.unnamed(
            crate::inode::Key::Real(dev, st.st_ino),
            libc::S_IFREG,
            vec![UPPER],
            self.xino(st.st_ino, st.st_dev),
        );
        node.set_held(Some(Held::Object(Arc::new(held))));
        Ok((Counted::new(self, node), st, file))
    }

    /// Where an object for upper dir `udir` is built in the workdir when
    /// `udir` has a default ACL: a scratch dir in `W/work` with the same
    /// one, so that the object gets the ACLs and mode it would get in
    /// `udir` (the kernel's `ovl_create_over_whiteout` sets those that
    /// `posix_acl_create` gives). None: build in `W/work` itself.
    fn acl_scratch(
        &self,
        work: BorrowedFd<'_>,
        udir: BorrowedFd<'_>,
    ) -> Result<Option<(CString, OwnedFd)>> {
        let name = c"system.posix_acl_default";
        let Ok(acl) = sys::getxattr(udir, name) else {
            return Ok(None);
        };
        let tmp = self.tmp_name();
        sys::mkdirat(work, &tmp, 0o700)?;
        let made = sys::openat(work, &tmp, libc::O_RDONLY | libc::O_DIRECTORY, 0)
            .and_then(|fd| sys::setxattr(fd.as_fd(), name, &acl, 0).map(|()| fd));
        match made {
            Ok(fd) => Ok(Some((tmp, fd))),
            Err(e) => {
                let _ = sys::unlinkat(work, &tmp, libc::AT_REMOVEDIR);
                Err(e)
            }
        }
    }

    /// The owner on disk of a new object in an upper dir (`pst`): the
    /// caller's, with the group of a setgid dir.
    fn new_owner(&self, pst: &Stat, who: Caller) -> (u32, u32) {
        let uid = self.cfg.ids.uid.disk(who.uid);
        let gid = if pst.st_mode & libc::S_ISGID != 0 {
            pst.st_gid
        } else {
            self.cfg.ids.gid.disk(who.gid)
        };
        (uid, gid)
    }

    /// Makes one object at `dir/name`, owned by `uid:gid`. Returns the
    /// open file (for a file) and the object's stat.
    fn make_obj(
        &self,
        dir: BorrowedFd<'_>,
        name: &CStr,
        mode: u32,
        obj: &NewObj<'_>,
        uid: u32,
        gid: u32,
    ) -> Result<(Option<OwnedFd>, Stat)> {
        let perm = mode & 0o7777;
        let mut file = None;
        match obj {
            NewObj::File { flags } => {
                // As open's: O_DIRECT and O_APPEND are the kernel's to honour.
                let fl = (flags & !(libc::O_TRUNC | libc::O_APPEND | libc::O_DIRECT))
                    | libc::O_CREAT
                    | libc::O_EXCL;
                file = Some(sys::openat(dir, name, fl, perm)?);
            }
            NewObj::Dir => sys::mkdirat(dir, name, perm)?,
            NewObj::Node { rdev } => sys::mknodat(dir, name, mode, *rdev)?,
            NewObj::Symlink { target } => sys::symlinkat(target, dir, name)?,
            NewObj::Link { src } => {
                match self.entry_in(src, UPPER) {
                    Ok((sdir, sname)) => sys::linkat(sdir.as_fd(), &sname, dir, name)?,
                    // No name: an O_TMPFILE file's first (the kernel lets
                    // only those through with no links).
                    Err(e) => sys::link_fd(src.held().ok_or(e)?.as_fd(), dir, name)?,
                }
                return Ok((None, sys::fstatat(dir, name)?));
            }
        }
        let r = (|| {
            let st = match &file {
                Some(f) => sys::fstat(f.as_fd())?,
                None => sys::fstatat(dir, name)?,
            };
            // Made by the daemon's ids: often the caller's already.
            if (st.st_uid, st.st_gid) == (uid, gid) {
                return Ok(st);
            }
            sys::fchownat(dir, name, uid, gid)?;
            // chown cleared setuid/setgid: put them back.
            if perm & 0o6000 != 0 && !matches!(obj, NewObj::Symlink { .. }) {
                sys::fchmodat(dir, name, (st.st_mode & 0o7777) | (perm & 0o6000))?;
            }
            sys::fstatat(dir, name)
        })();
        match r {
            Ok(st) => Ok((file, st)),
            Err(e) => {
                let flags = if matches!(obj, NewObj::Dir) {
                    libc::AT_REMOVEDIR
                } else {
                    0
                };
                let _ = sys::unlinkat(dir, name, flags);
                Err(e)
            }
        }
    }

    /// unlink and rmdir.
    pub fn remove(&self, parent_id: u64, name: &OsStr, dir: bool) -> Result<()> {
        self.check_writable()?;
        let parent = self.node(parent_id)?;
        let cname = Self::check_name(name)?;
        if !dir && self.unlink_lower(&parent, name, &cname)? {
            return Ok(());
        }
        let f = self
            .find(&parent, &cname)?
            .ok_or_else(|| sys::err(libc::ENOENT))?;
        let is_dir = sys::is_dir(f.st.st_mode);
        let merged = f.layers.len() > 1;
        // Found in a lower layer only: nothing to probe again below.
        let lower_only = !self.layers.is_upper(f.layers[0]);
        if self.layers.is_upper(f.layers[0]) && (is_dir || f.st.st_nlink <= 1) {
            self.copied_inos.remove(&f.st.st_ino);
        }
        if dir && !is_dir {
            return Err(sys::err(libc::ENOTDIR));
        }
        if !dir && is_dir {
            return Err(sys::err(libc::EISDIR));
        }
        let node = self.table.find_key(&self.key_of(&parent, name, &f).0);
        // An indexed hard link is linked up first and its count recorded.
        // A node the kernel does not hold is made for the checks below
        // only: its count goes when `_probe` drops.
        let mut _probe = None;
        let mut nlink: Option<(Arc<Inode>, Option<OwnedFd>)> = None;
        if !is_dir && self.index.is_some() {
            let n = match &node {
                Some(n) => n.clone(),
                None => Arc::clone(_probe.insert(self.instantiate(&parent, name, f).0)),
            };
            nlink = Some((n.clone(), self.nlink_start(&n)?));
        } else if is_dir {
            let probe = match &node {
                Some(n) => n.clone(),
                None => Arc::clone(_probe.insert(self.instantiate(&parent, name, f).0)),
            };
            self.check_empty(&probe)?;
        }
        // (An indexed name was just linked up.)
        let lower_only = lower_only && nlink.is_none();
        let held = node.as_ref().and_then(|n| self.holdable_lower(n));
        let res = (|| -> Result<()> {
            self.copy_up(&parent)?;
            let ufd = self.dir_fd(&parent, UPPER)?;
            let in_upper = !lower_only
                && match sys::fstatat(ufd.as_fd(), &cname) {
                    Ok(st) => !self.is_whiteout_at(ufd.as_fd(), &cname, &st, UPPER),
                    Err(_) => false,
                };
            if lower_only || self.lower_positive(&parent, &cname)? {
                self.whiteout(ufd.as_fd(), &cname, in_upper, is_dir)?;
            } else if is_dir {
                // As the kernel: a pure upper dir is removed as it is, so
                // whiteouts left inside it make it not empty; a renamed merged
                // dir (redirect) is cleared first.
                if merged {
                    self.clear_whiteouts(ufd.as_fd(), &cname)?;
                }
                sys::unlinkat(ufd.as_fd(), &cname, libc::AT_REMOVEDIR)?;
            } else {
                sys::unlinkat(ufd.as_fd(), &cname, 0)?;
            }
            Ok(())
        })();
        if let Some((n, fd)) = nlink {
            self.nlink_end(&n, fd);
        }
        res?;
        if let Some(n) = node {
            self.detach(&n, parent.nodeid, name, held);
        }
        Ok(())
    }

    /// Unlink of a file only lower layers hold, in a dir with an upper
    /// half: the link of the shared whiteout into the upper dir is also the
    /// probe of the name there, one lookup less. A taken name (`EEXIST`),
    /// or any other failure, sends the unlink the full way; false then. The
    /// kernel holds the parent's lock, so no request through the mount
    /// takes the name in between.
    fn unlink_lower(&self, parent: &Arc<Inode>, name: &OsStr, cname: &CStr) -> Result<bool> {
        let mut layers = parent.layers();
        if self.index.is_some()
            || layers.len() < 2
            || !self.layers.is_upper(layers[0])
            || !self.shares_whiteouts()
        {
            return Ok(false);
        }
        // The node the kernel holds for the name, when it was looked up
        // lately, tells what is there: lower layers never change.
        let node = match self.named_child(parent.nodeid, name) {
            Some(n) if !n.is_dir() && n.top().is_some_and(|t| !self.layers.is_upper(t)) => Some(n),
            Some(_) => return Ok(false),
            None => {
                layers.remove(0);
                let Some(f) = self.find_in(parent, cname, layers)?.0 else {
                    return Ok(false);
                };
                if sys::is_dir(f.st.st_mode) {
                    return Ok(false);
                }
                self.table.find_key(&self.key_of(parent, name, &f).0)
            }
        };
        let held = node.as_ref().and_then(|n| self.holdable_lower(n));
        let Ok(ufd) = self.dir_fd(parent, UPPER) else {
            return Ok(false);
        };
        if !self.link_whiteout(ufd.as_fd(), cname) {
            return Ok(false);
        }
        if let Some(n) = node {
            self.detach(&n, parent.nodeid, name, held);
        }
        Ok(true)
    }

    /// [`Self::holdable`] for a node whose top object is a lower one: an
    /// unlinked upper file's space must come back at once, as on the
    /// kernel's overlay, so only lower objects (kept anyway) are held.
    fn holdable_lower(&self, node: &Arc<Inode>) -> Option<Held> {
        let top = node.top()?;
        (!self.layers.is_upper(top))
            .then(|| self.holdable(node))
            .flatten()
    }

    /// How to reach a non-directory about to lose a name, if that was its
    /// last (see `Inode::held`): a lower object by its place, an upper one
    /// by an fd; not for nodes that read another object by design
    /// (indexed, metadata-only).
    fn holdable(&self, node: &Arc<Inode>) -> Option<Held> {
        if node.is_dir() || node.has_index() || node.has_lowerdata() {
            return None;
        }
        match node.top()? {
            l if !self.layers.is_upper(l) => {
                let (dir, name) = self.entry_in(node, l).ok()?;
                Some(Held::Place(l, dir, name))
            }
            _ => Some(Held::Object(Arc::new(self.path_fd(node).ok()?))),
        }
    }

    /// Forgets one name of a node; a node with no names left loses its key
    /// and keeps its object in `held`.
    fn detach(&self, node: &Arc<Inode>, parent: u64, name: &OsStr, held: Option<Held>) {
        node.remove_alias(parent, &name.to_os_string());
        if !node.is_named() {
            if held.is_some() {
                node.set_held(held);
            }
            // The upper inode may be freed and reused by a new file, which
            // must not inherit this one's number.
            if let crate::inode::Key::Real(dev, ino) = node.state.read().key {
                if self.layers.has_upper && dev == self.layers.get(UPPER).dev {
                    self.copied_inos.remove(&ino);
                }
            }
            self.table.unkey(node);
            if node.is_dir() {
                self.forget_dir_fds(node.nodeid);
            }
        }
    }

    /// Puts a whiteout at `dir/name`, atomically replacing what the upper layer has there.
    fn whiteout(&self, dir: BorrowedFd<'_>, name: &CStr, exists: bool, is_dir: bool) -> Result<()> {
        let work = self.work_fd()?;
        // Nothing to replace: a link is atomic in place.
        if !exists && self.link_whiteout(dir, name) {
            return Ok(());
        }
        let tmp = self.tmp_name();
        if self.make_whiteout(work, &tmp)? {
            if let Err(e) = self.mark_xwhiteouts(dir) {
                let _ = sys::unlinkat(work, &tmp, 0);
                return Err(e);
            }
        }
        let flags = if exists { libc::RENAME_EXCHANGE } else { 0 };
        if let Err(e) = sys::renameat2(work, &tmp, dir, name, flags) {
            let _ = sys::unlinkat(work, &tmp, 0);
            return Err(e);
        }
        if exists {
            // The replaced object is now at the temporary name.
            if is_dir {
                self.clear_whiteouts(work, &tmp)?;
                sys::unlinkat(work, &tmp, libc::AT_REMOVEDIR)?;
            } else {
                sys::unlinkat(work, &tmp, 0)?;
            }
        }
        Ok(())
    }

    /// rename, with RENAME_NOREPLACE and RENAME_EXCHANGE.
    pub fn rename(
        &self,
        parent_id: u64,
        name: &OsStr,
        newparent_id: u64,
        newname: &OsStr,
        flags: u32,
    ) -> Result<()> {
        self.check_writable()?;
        if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 {
            return Err(sys::err(libc::EINVAL));
        }
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        let parent = self.node(parent_id)?;
        let newparent = self.node(newparent_id)?;
        let cname = Self::check_name(name)?;
        let cnew = Self::check_name(newname)?;
        Self::check_new_name(&cnew)?;
        let src_f = self
            .find(&parent, &cname)?
            .ok_or_else(|| sys::err(libc::ENOENT))?;
        let dst_f = self.find(&newparent, &cnew)?;
        if exchange && dst_f.is_none() {
            return Err(sys::err(libc::ENOENT));
        }
        if flags & libc::RENAME_NOREPLACE != 0 && dst_f.is_some() {
            return Err(sys::err(libc::EEXIST));
        }
        if parent_id == newparent_id && name == newname {
            return Ok(());
        }
        // Counted for the rename only: forgotten when they drop.
        let src = self.instantiate(&parent, name, src_f).0;
        let dst = dst_f.map(|f| self.instantiate(&newparent, newname, f).0);
        let mut nlink = None;
        let res = self.rename_nodes(
            &parent,
            &cname,
            &src,
            &newparent,
            &cnew,
            dst.as_deref(),
            exchange,
            &mut nlink,
        );
        if let Some(d) = &dst {
            self.nlink_end(d, nlink);
        }
        if res.is_err() {
            // A failed rename may still have touched the dirs (ext4 bumps a
            // dir's times when a RENAME_WHITEOUT fails), and the kernel only
            // refreshes them after a success.
            self.inval_attr(parent.nodeid);
            self.inval_attr(newparent.nodeid);
        }
        res
    }

    /// Whether a node is a directory with lower layers (the kernel's
    /// "merge or lower" type): without redirect_dir it cannot move.
    fn merge_or_lower(&self, node: &Arc<Inode>) -> bool {
        node.is_dir() && node.layers().iter().any(|&l| !self.layers.is_upper(l))
    }

    /// The kernel's "not pure upper" dir: one with lower layers, or an
    /// upper dir with an origin (it was merged once and may keep
    /// whiteouts).
    fn may_hold_whiteouts(&self, node: &Arc<Inode>) -> bool {
        node.is_dir()
            && (self.merge_or_lower(node)
                || self
                    .path_fd(node)
                    .and_then(|fd| sys::getxattr(fd.as_fd(), self.xattr(Ox::Origin)))
                    .is_ok())
    }

    /// The kernel's `ovl_rename`, step by step, so that even a rename that
    /// fails in the upper fs leaves the same marks behind.
    #[allow(clippy::too_many_arguments)]
    fn rename_nodes(
        &self,
        parent: &Arc<Inode>,
        cname: &CStr,
        src: &Arc<Inode>,
        newparent: &Arc<Inode>,
        cnew: &CStr,
        dst: Option<&Arc<Inode>>,
        exchange: bool,
        nlink: &mut Option<OwnedFd>,
    ) -> Result<()> {
        let src_dir = src.is_dir();
        // The VFS checks come first and change nothing.
        if let Some(d) = dst {
            if !exchange {
                if src_dir && !d.is_dir() {
                    return Err(sys::err(libc::ENOTDIR));
                }
                if !src_dir && d.is_dir() {
                    return Err(sys::err(libc::EISDIR));
                }
            }
            if Arc::ptr_eq(src, d) {
                // Two names of one file: nothing to do.
                return Ok(());
            }
        }
        if (src_dir && self.is_ancestor(src, newparent))
            || (exchange && dst.is_some_and(|d| d.is_dir() && self.is_ancestor(d, parent)))
        {
            return Err(sys::err(libc::EINVAL));
        }
        // Without redirect_dir=on a directory with lower layers cannot move.
        let redirects = self.cfg.redirect_dir == RedirectDir::On;
        let src_redirect = self.merge_or_lower(src);
        let dst_redirect = exchange && dst.is_some_and(|d| self.merge_or_lower(d));
        if !redirects && (src_redirect || dst_redirect) {
            return Err(sys::err(libc::EXDEV));
        }
        // As the kernel: an overwritten dir that may hold whiteouts must be
        // empty, checked before anything is copied up.
        let dst_clear = dst.filter(|d| !exchange && self.may_hold_whiteouts(d));
        if let Some(d) = dst_clear {
            self.check_empty(d)?;
        }
        self.copy_up(src)?;
        self.copy_up(newparent)?;
        if exchange {
            if let Some(d) = dst {
                self.copy_up(d)?;
            }
        } else if let Some(d) = dst.filter(|d| !d.is_dir()) {
            // An indexed hard link overwritten: linked up, count recorded.
            *nlink = self.nlink_start(d)?;
        }
        // The kernel's "origin" type, taken after copy-up.
        let src_origin = self.has_origin(src);
        let dst_origin = exchange && dst.is_some_and(|d| self.has_origin(d));
        let old_ufd = self.dir_fd(parent, UPPER)?;
        let new_ufd = self.dir_fd(newparent, UPPER)?;
        // The upper whiteouts of an overwritten dir go first.
        if let Some(d) = dst_clear {
            if d.top().is_some_and(|t| self.layers.is_upper(t)) {
                self.clear_whiteouts(new_ufd.as_fd(), cnew)?;
            }
        }
        let new_whiteout = dst.is_none()
            && matches!(sys::fstatat(new_ufd.as_fd(), cnew), Ok(st) if self.is_whiteout_at(new_ufd.as_fd(), cnew, &st, UPPER));
        let mut flags = 0;
        let mut cleanup_whiteout = false;
        if exchange {
            flags = libc::RENAME_EXCHANGE;
        } else if self.lower_positive(parent, cname)? {
            flags = if new_whiteout {
                libc::RENAME_EXCHANGE
            } else {
                libc::RENAME_WHITEOUT
            };
        } else if src_dir && new_whiteout {
            flags = libc::RENAME_EXCHANGE;
            cleanup_whiteout = true;
        }
        if parent.nodeid != newparent.nodeid {
            if src_origin {
                self.set_impure(newparent, new_ufd.as_fd());
            }
            if dst_origin {
                self.set_impure(parent, old_ufd.as_fd());
            }
        }
        let opaque = self.xattr(Ox::Opaque);
        let samedir = parent.nodeid == newparent.nodeid;
        let mut src_new_redirect = None;
        let mut dst_new_redirect = None;
        if !src_dir && src.has_lowerdata() {
            // A metadata-only copy keeps finding its data, as a moved dir does.
            src_new_redirect = self.set_redirect(src, samedir, old_ufd.as_fd(), cname)?;
        }
        if let Some(d) = dst.filter(|d| exchange && !d.is_dir()) {
            if d.has_lowerdata() {
                dst_new_redirect = self.set_redirect(d, samedir, new_ufd.as_fd(), cnew)?;
            }
        }
        if src_dir {
            if src_redirect {
                src_new_redirect = self.set_redirect(src, samedir, old_ufd.as_fd(), cname)?;
            } else if !self.is_opaque_at(old_ufd.as_fd(), cname) && newparent.layers().len() > 1 {
                let fd = sys::openat(old_ufd.as_fd(), cname, libc::O_PATH, 0)?;
                sys::setxattr(fd.as_fd(), opaque, b"y", 0).map_err(|_| sys::err(libc::EXDEV))?;
            }
        }
        if let Some(d) = dst.filter(|d| exchange && d.is_dir()) {
            if dst_redirect {
                dst_new_redirect = self.set_redirect(d, samedir, new_ufd.as_fd(), cnew)?;
            } else if !self.is_opaque_at(new_ufd.as_fd(), cnew) && parent.layers().len() > 1 {
                let fd = sys::openat(new_ufd.as_fd(), cnew, libc::O_PATH, 0)?;
                sys::setxattr(fd.as_fd(), opaque, b"y", 0).map_err(|_| sys::err(libc::EXDEV))?;
            }
        }
        let dst_held = dst.filter(|_| !exchange).and_then(|d| self.holdable(d));
        match sys::renameat2(old_ufd.as_fd(), cname, new_ufd.as_fd(), cnew, flags) {
            // Some filesystems and user namespaces refuse RENAME_WHITEOUT:
            // the whiteout follows the rename (not atomically).
            Err(e)
                if flags == libc::RENAME_WHITEOUT
                    && matches!(e.raw(), libc::EINVAL | libc::EPERM) =>
            {
                sys::renameat2(old_ufd.as_fd(), cname, new_ufd.as_fd(), cnew, 0)?;
                self.whiteout(old_ufd.as_fd(), cname, false, false)?;
            }
            r => r?,
        }
        if let Some(r) = src_new_redirect {
            src.set_redirect(Some(r));
        }
        if let (Some(r), Some(d)) = (dst_new_redirect, dst) {
            d.set_redirect(Some(r));
        }
        if cleanup_whiteout {
            sys::unlinkat(old_ufd.as_fd(), cname, 0)?;
        }
        let (n1, n2) = (cstr_of(cname).to_os_string(), cstr_of(cnew).to_os_string());
        src.remove_alias(parent.nodeid, &n1);
        match dst {
            Some(d) if exchange => {
                d.remove_alias(newparent.nodeid, &n2);
                d.add_alias(parent, &n1);
            }
            Some(d) => self.detach(d, newparent.nodeid, &n2, dst_held),
            None => {}
        }
        src.add_alias(newparent, &n2);
        Ok(())
    }

    /// Records where a moving merged dir lies in the lower layers, as the
    /// kernel's `ovl_set_redirect`: its old name when it stays in its
    /// parent, else its absolute lower path. Returns a new redirect to
    /// remember once the rename is done; any failure falls back to EXDEV,
    /// so `mv` copies instead.
    fn set_redirect(
        &self,
        node: &Arc<Inode>,
        samedir: bool,
        dir: BorrowedFd<'_>,
        name: &CStr,
    ) -> Result<Option<Redirect>> {
        let cur = match node.redirect() {
            // The copy an indexed hard link's names share may have one
            // from another name: as the kernel (one inode), it stays.
            None if !node.is_dir() && node.has_index() => {
                match sys::getxattr_at(dir, name, self.xattr(Ox::Redirect))
                    .ok()
                    .and_then(|v| Redirect::parse(&v))
                {
                    Some(r @ Redirect::Abs(_)) => return Ok(Some(r)),
                    r => r,
                }
            }
            r => r,
        };
        // As the kernel: a file that is a lower hard link always gets an
        // absolute redirect, since its names may live in different dirs.
        let samedir = samedir
            && (node.is_dir()
                || node
                    .lowerdata()
                    .and_then(|l| sys::fstat(l.as_fd()).ok())
                    .is_none_or(|st| st.st_nlink <= 1));
        let new = match cur {
            Some(Redirect::Abs(_)) => return Ok(None),
            Some(Redirect::Rel(_)) if samedir => return Ok(None),
            _ if samedir => Redirect::Rel(cstr_of(name).to_os_string()),
            _ => Redirect::Abs(self.lower_path(node).ok_or_else(|| sys::err(libc::EXDEV))?),
        };
        let value = new.encode();
        if value.len() > REDIRECT_MAX {
            return Err(sys::err(libc::EXDEV));
        }
        let fd = sys::openat(dir, name, libc::O_PATH, 0).map_err(|_| sys::err(libc::EXDEV))?;
        sys::setxattr(fd.as_fd(), self.xattr(Ox::Redirect), &value, 0).map_err(|e| {
            log::warn!("failed to set redirect: {e}");
            sys::err(libc::EXDEV)
        })?;
        Ok(Some(new))
    }

    /// A dir's path in the lower layers, from the root: each ancestor's
    /// redirect stands for its name, and an absolute one ends the walk.
    fn lower_path(&self, node: &Arc<Inode>) -> Option<Vec<std::ffi::OsString>> {
        let mut comps = Vec::new();
        let mut cur = node.clone();
        while cur.nodeid != crate::inode::ROOT {
            let (parent, name) = cur.alias()?;
            match cur.redirect() {
                Some(Redirect::Abs(p)) => {
                    comps.extend(p.into_iter().rev());
                    break;
                }
                Some(Redirect::Rel(r)) => comps.push(r),
                None => comps.push(name),
            }
            cur = parent;
        }
        comps.reverse();
        Some(comps)
    }

    /// Whether `a` is `b` or one of its ancestors.
    fn is_ancestor(&self, a: &Arc<Inode>, b: &Arc<Inode>) -> bool {
        let mut cur = Some(b.clone());
        while let Some(n) = cur {
            if n.nodeid == a.nodeid {
                return true;
            }
            cur = n.alias().map(|(p, _)| p);
        }
        false
    }

    /// The kernel's "origin" path type: an upper dir merged with lower dirs
    /// (with or without an origin xattr), or an upper non-dir with an origin.
    fn has_origin(&self, node: &Arc<Inode>) -> bool {
        if !node.top().is_some_and(|t| self.layers.is_upper(t)) {
            return false;
        }
        if node.is_dir() {
            return node.layers().len() > 1;
        }
        self.path_fd(node)
            .and_then(|fd| sys::getxattr(fd.as_fd(), self.xattr(Ox::Origin)))
            .is_ok()
    }
}
