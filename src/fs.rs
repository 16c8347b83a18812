//! The `fuser::Filesystem` impl: a thin dispatcher. Each request is handed
//! to the module that owns it, and every error becomes an errno reply.

use crate::dir::{Caller, NewObj};
use crate::error::{self, Result};
use crate::file::{Handles, Passthrough};
use crate::inode::Inode;
use crate::inode_ops::SetAttr;
use crate::overlay::{Counted, Overlay};
use crate::readdir::DirHandles;
use crate::request;
use crate::stats::Op;
use crate::sys::{self, Stat};
use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileHandle, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use std::ffi::OsStr;
use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

/// The overlay filesystem served over FUSE.
pub struct OverlayFs {
    pub ovl: Arc<Overlay>,
    files: Handles,
    dirs: DirHandles,
}

impl OverlayFs {
    pub fn new(ovl: Overlay) -> Self {
        OverlayFs {
            ovl: Arc::new(ovl),
            files: Handles::default(),
            dirs: DirHandles::default(),
        }
    }
}

/// Open flags of a cached file. Its flush would do nothing (data goes to
/// the layer file on each write), so the kernel need not send one on close.
const CACHED_OPEN: FopenFlags = FopenFlags::FOPEN_KEEP_CACHE.union(FopenFlags::FOPEN_NOFLUSH);

/// Every error reply passes here: the request's log line shows it.
fn errno(e: error::Errno) -> Errno {
    request::failed(e.raw());
    Errno::from_i32(e.raw())
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

impl OverlayFs {
    fn reply_entry(&self, reply: ReplyEntry, r: Result<(Counted<'_>, Stat)>) {
        match r {
            Ok((node, st)) => {
                let (attr, attr_ttl) = self.ovl.entry_attr(&node, &st);
                reply.entry_with_ttls(&attr_ttl, &self.ovl.ttl, &attr, Generation(0));
                node.keep();
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn reply_attr(&self, reply: ReplyAttr, r: Result<(Arc<Inode>, Stat)>) {
        match r {
            Ok((node, st)) => reply.attr(&self.ovl.attr_ttl(&node), &self.ovl.attr(&node, &st)),
            Err(e) => reply.error(errno(e)),
        }
    }

    /// The reply to create and tmpfile: entry, attributes and an open file.
    fn reply_created(
        &self,
        reply: ReplyCreate,
        node: Counted<'_>,
        st: &Stat,
        fd: OwnedFd,
        flags: i32,
    ) {
        let fh = self.ovl.new_handle(&node, fd, flags, &self.files);
        // One TTL covers entry and attributes here.
        let (attr, ttl) = self.ovl.entry_attr(&node, st);
        match self
            .ovl
            .passthrough(&self.files, fh, |fd| Ok(reply.open_backing(fd)?))
        {
            Passthrough::Backing(b) => {
                reply.created_passthrough(
                    &ttl,
                    &attr,
                    Generation(0),
                    FileHandle(fh),
                    FopenFlags::FOPEN_NOFLUSH,
                    &b,
                );
                node.keep();
            }
            Passthrough::Cached => {
                reply.created(&ttl, &attr, Generation(0), FileHandle(fh), CACHED_OPEN);
                node.keep();
            }
            // A new file has no lower backing; the entry's count goes as
            // `node` drops.
            Passthrough::Stale(e) => reply.error(errno(e)),
        }
    }

    fn make(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        obj: NewObj<'_>,
    ) -> Result<(Counted<'_>, Stat)> {
        let (node, st, _) = self
            .ovl
            .create_obj(parent.0, name, mode, obj, caller(req))?;
        Ok((node, st))
    }
}

fn empty(reply: ReplyEmpty, r: Result<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(e)),
    }
}

fn xattr_reply(reply: ReplyXattr, size: u32, r: Result<Vec<u8>>) {
    match r {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(v) => reply.data(&v),
        Err(e) => reply.error(errno(e)),
    }
}

/// What rovl asks of the kernel at INIT, where offered (besides ACLs,
/// passthrough and io_uring). rovl is the only writer of its view: the
/// kernel may cache what it can.
pub const INIT_FLAGS: InitFlags = InitFlags::FUSE_ATOMIC_O_TRUNC
    .union(InitFlags::FUSE_CACHE_SYMLINKS)
    .union(InitFlags::FUSE_DO_READDIRPLUS)
    .union(InitFlags::FUSE_READDIRPLUS_AUTO)
    .union(InitFlags::FUSE_PARALLEL_DIROPS)
    // The umask is ours to apply: not where a default ACL rules.
    .union(InitFlags::FUSE_DONT_MASK)
    // Dropping set-user-ID is ours: the kernel then stops asking for the
    // attributes before every chown.
    .union(InitFlags::FUSE_HANDLE_KILLPRIV_V2);

impl fuser::Filesystem for OverlayFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // The kernel then caches ACLs per inode: `ls -l` stops asking for
        // system.posix_acl_access on every call.
        let want = if self.ovl.cfg.noacl || self.ovl.cfg.noxattrs {
            INIT_FLAGS
        } else {
            INIT_FLAGS | InitFlags::FUSE_POSIX_ACL
        };
        let have = config.capabilities();
        let _ = config.add_capabilities(want & have);
        // Passthrough sends file data straight to the layer file (kernel
        // 6.9+, CAP_SYS_ADMIN); without it reads and writes come to us.
        if have.contains(InitFlags::FUSE_PASSTHROUGH)
            && config.set_max_stack_depth(1).is_ok()
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
        {
            self.ovl.passthrough.store(true, Ordering::Relaxed);
        }
        // Writes come in at most max_pages (1 MiB by default) whatever
        // this says; it also sizes each io_uring entry's payload buffer.
        let _ = config.set_max_write(1 << 20);
        // Requests then wake a thread on the caller's CPU (fuser's rings).
        if self.ovl.cfg.io_uring && have.contains(InitFlags::FUSE_OVER_IO_URING) {
            let _ = config.add_capabilities(InitFlags::FUSE_OVER_IO_URING);
        }
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _r = request::Scope::enter(Op::Lookup, req.pid(), parent.0);
        match self.ovl.lookup(parent.0, name) {
            // A negative entry (node id 0) the kernel may cache: names only
            // appear through requests it sees.
            Err(e) if e.raw() == libc::ENOENT => {
                request::failed(libc::ENOENT);
                let mut attr = self.ovl.attr_template();
                attr.ino = INodeNo(0);
                reply.entry(&self.ovl.ttl, &attr, Generation(0));
            }
            r => self.reply_entry(reply, r),
        }
    }

    fn forget(&self, req: &Request, ino: INodeNo, nlookup: u64) {
        let _r = request::Scope::enter(Op::Forget, req.pid(), ino.0);
        self.ovl.forget(ino.0, nlookup);
    }

    fn getattr(&self, req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let _r = request::Scope::enter(Op::Getattr, req.pid(), ino.0);
        let r = self.ovl.getattr(ino.0, fh.map(|f| f.0), &self.files);
        self.reply_attr(reply, r);
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        kill_suid_gid: bool,
        reply: ReplyAttr,
    ) {
        let _r = request::Scope::enter(Op::Setattr, req.pid(), ino.0);
        let mut a = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
            fh: fh.map(|f| f.0),
            kill_suid_gid,
        };
        // With KILLPRIV_V2 a setattr of nothing is a stripped request to drop
        // set-user-ID (see `empty_setattr_kills`).
        if a.changes_nothing() && ctime.is_none() {
            a.kill_suid_gid |= self.ovl.empty_setattr_kills(ino.0);
        }
        let r = self.ovl.setattr(ino.0, &a, &self.files);
        self.reply_attr(reply, r);
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        let _r = request::Scope::enter(Op::Readlink, req.pid(), ino.0);
        match self.ovl.readlink(ino.0) {
            Ok(t) => reply.data(std::os::unix::ffi::OsStrExt::as_bytes(t.as_os_str())),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let _r = request::Scope::enter(Op::Mknod, req.pid(), parent.0);
        let kind = mode & libc::S_IFMT;
        // A 0/0 character device is a whiteout: the kernel refuses to make one.
        if kind == libc::S_IFCHR && rdev == 0 {
            return reply.error(Errno::EPERM);
        }
        let obj = if kind == libc::S_IFREG {
            NewObj::File {
                flags: libc::O_WRONLY,
            }
        } else {
            NewObj::Node { rdev: rdev as u64 }
        };
        let r = self.make(
            req,
            parent,
            name,
            self.ovl.masked(parent.0, mode, umask, &self.files) | kind,
            obj,
        );
        self.reply_entry(reply, r);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let _r = request::Scope::enter(Op::Mkdir, req.pid(), parent.0);
        let r = self.make(
            req,
            parent,
            name,
            self.ovl.masked(parent.0, mode, umask, &self.files),
            NewObj::Dir,
        );
        self.reply_entry(reply, r);
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _r = request::Scope::enter(Op::Unlink, req.pid(), parent.0);
        empty(reply, self.ovl.remove(parent.0, name, false));
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _r = request::Scope::enter(Op::Rmdir, req.pid(), parent.0);
        empty(reply, self.ovl.remove(parent.0, name, true));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let _r = request::Scope::enter(Op::Symlink, req.pid(), parent.0);
        let r = sys::cstr(target.as_os_str()).and_then(|t| {
            self.make(
                req,
                parent,
                link_name,
                0o777,
                NewObj::Symlink { target: &t },
            )
        });
        self.reply_entry(reply, r);
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _r = request::Scope::enter(Op::Rename, req.pid(), parent.0);
        empty(
            reply,
            self.ovl
                .rename(parent.0, name, newparent.0, newname, flags.bits()),
        );
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _r = request::Scope::enter(Op::Link, req.pid(), ino.0);
        let r = self.ovl.node(ino.0).and_then(|src| {
            if src.is_dir() {
                return Err(sys::err(libc::EPERM));
            }
            self.make(req, newparent, newname, 0, NewObj::Link { src: &src })
        });
        self.reply_entry(reply, r);
    }

    fn open(
        &self,
        req: &Request,
        ino: INodeNo,
        flags: OpenFlags,
        kill_suid_gid: bool,
        reply: ReplyOpen,
    ) {
        let _r = request::Scope::enter(Op::Open, req.pid(), ino.0);
        match self.ovl.open(ino.0, flags.0, kill_suid_gid, &self.files) {
            Ok(fh) => match self
                .ovl
                .passthrough(&self.files, fh, |fd| Ok(reply.open_backing(fd)?))
            {
                Passthrough::Backing(b) => {
                    reply.opened_passthrough(FileHandle(fh), FopenFlags::FOPEN_NOFLUSH, &b)
                }
                Passthrough::Cached => {
                    // Another name of an indexed hard link may have written.
                    let shared = self.ovl.node(ino.0).is_ok_and(|n| n.has_index());
                    let flags = if shared {
                        FopenFlags::FOPEN_NOFLUSH
                    } else {
                        CACHED_OPEN
                    };
                    reply.opened(FileHandle(fh), flags)
                }
                Passthrough::Stale(e) => reply.error(errno(e)),
            },
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _r = request::Scope::enter(Op::Read, req.pid(), ino.0);
        let Some(h) = self.files.get(fh.0, ino.0) else {
            return reply.error(Errno::EBADF);
        };
        let mut reply = Some(reply);
        let r = self.ovl.read(&h, offset, size, |d| {
            if let Some(r) = reply.take() {
                r.data(d);
            }
        });
        if let (Err(e), Some(r)) = (r, reply) {
            r.error(errno(e));
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _r = request::Scope::enter(Op::Write, req.pid(), ino.0);
        let Some(h) = self.files.get(fh.0, ino.0) else {
            return reply.error(Errno::EBADF);
        };
        // The caller has no CAP_FSETID: set-user-ID goes first, as in the kernel.
        let killed = match write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
            true => self.ovl.kill_suid_gid(ino.0, fh.0, &self.files),
            false => Ok(()),
        };
        match killed.and_then(|()| self.ovl.write(&h, offset, data)) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let _r = request::Scope::enter(Op::Flush, req.pid(), ino.0);
        reply.ok();
    }

    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _r = request::Scope::enter(Op::Release, req.pid(), ino.0);
        self.files.remove(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _r = request::Scope::enter(Op::Fsync, req.pid(), ino.0);
        match self.files.get(fh.0, ino.0) {
            Some(h) => empty(reply, self.ovl.fsync(&h, datasync)),
            None => reply.error(Errno::EBADF),
        }
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _r = request::Scope::enter(Op::Opendir, req.pid(), ino.0);
        match self.ovl.node(ino.0) {
            Ok(node) if node.is_dir() => {
                let fh = self.dirs.open(node);
                // The kernel may serve later listings from its cache: every
                // change to a directory goes through it and drops the cache.
                reply.opened(
                    FileHandle(fh),
                    FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
                );
            }
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _r = request::Scope::enter(Op::Readdir, req.pid(), ino.0);
        let entries = match self.dirs.listing(&self.ovl, fh.0) {
            Ok(e) => e,
            Err(e) => return reply.error(errno(e)),
        };
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(e.ino), i as u64 + 1, e.kind, &e.name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let _r = request::Scope::enter(Op::Readdirplus, req.pid(), ino.0);
        let entries = match self.dirs.listing(&self.ovl, fh.0) {
            Ok(e) => e,
            Err(e) => return reply.error(errno(e)),
        };
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            let p = self.ovl.plus_entry(ino.0, i, e);
            let off = i as u64 + 1;
            if reply.add(
                INodeNo(p.d_ino),
                off,
                &e.name,
                &p.ttl,
                &p.attr,
                Generation(0),
            ) {
                // Not sent: the lookup it counted does not happen.
                break;
            }
            p.sent();
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let _r = request::Scope::enter(Op::Releasedir, req.pid(), ino.0);
        self.dirs.release(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _r = request::Scope::enter(Op::Fsyncdir, req.pid(), ino.0);
        let r = self.ovl.node(ino.0).and_then(|n| {
            if !self.ovl.cfg.syncs() {
                return Ok(());
            }
            let fd = self.ovl.path_fd(&n)?;
            let d = sys::reopen(
                std::os::fd::AsFd::as_fd(&fd),
                libc::O_RDONLY | libc::O_DIRECTORY,
            )?;
            sys::fsync(std::os::fd::AsFd::as_fd(&d), false)
        });
        empty(reply, r);
    }

    fn statfs(&self, req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let _r = request::Scope::enter(Op::Statfs, req.pid(), ino.0);
        match self.ovl.statfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                crate::overlay::NAME_MAX as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let _r = request::Scope::enter(Op::Setxattr, req.pid(), ino.0);
        empty(
            reply,
            self.ovl.setxattr(ino.0, name, value, flags, &self.files),
        );
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _r = request::Scope::enter(Op::Getxattr, req.pid(), ino.0);
        xattr_reply(reply, size, self.ovl.getxattr(ino.0, name, &self.files));
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _r = request::Scope::enter(Op::Listxattr, req.pid(), ino.0);
        xattr_reply(reply, size, self.ovl.listxattr(ino.0, &self.files));
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _r = request::Scope::enter(Op::Removexattr, req.pid(), ino.0);
        empty(reply, self.ovl.removexattr(ino.0, name, &self.files));
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let _r = request::Scope::enter(Op::Access, req.pid(), ino.0);
        let r = self.ovl.node(ino.0).and_then(|n| {
            if mask.bits() & libc::W_OK != 0 && self.ovl.read_only() {
                return Err(sys::err(libc::EROFS));
            }
            self.ovl.real_stat(&n).map(drop)
        });
        empty(reply, r);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _r = request::Scope::enter(Op::Create, req.pid(), parent.0);
        let r = self.ovl.create_obj(
            parent.0,
            name,
            self.ovl.masked(parent.0, mode, umask, &self.files),
            NewObj::File { flags },
            caller(req),
        );
        match r {
            Ok((node, st, Some(fd))) => self.reply_created(reply, node, &st, fd, flags),
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn tmpfile(
        &self,
        req: &Request,
        parent: INodeNo,
        mode: u32,
        umask: u32,
        flags: i32,
        _kill_suid_gid: bool,
        reply: ReplyCreate,
    ) {
        let _r = request::Scope::enter(Op::Tmpfile, req.pid(), parent.0);
        let mode = self.ovl.masked(parent.0, mode, umask, &self.files);
        match self.ovl.create_tmpfile(parent.0, mode, flags, caller(req)) {
            Ok((node, st, fd)) => self.reply_created(reply, node, &st, fd, flags),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _r = request::Scope::enter(Op::Fallocate, req.pid(), ino.0);
        match self.files.get(fh.0, ino.0) {
            Some(h) => empty(reply, self.ovl.fallocate(&h, mode, offset, length)),
            None => reply.error(Errno::EBADF),
        }
    }

    fn lseek(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let _r = request::Scope::enter(Op::Lseek, req.pid(), ino.0);
        match self.files.get(fh.0, ino.0) {
            Some(h) => match self.ovl.lseek(&h, offset, whence) {
                Ok(o) => reply.offset(o),
                Err(e) => reply.error(errno(e)),
            },
            None => reply.error(Errno::EBADF),
        }
    }

    fn copy_file_range(
        &self,
        req: &Request,
        ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let _r = request::Scope::enter(Op::CopyFileRange, req.pid(), ino_in.0);
        let (Some(hi), Some(ho)) = (
            self.files.get(fh_in.0, ino_in.0),
            self.files.get(fh_out.0, ino_out.0),
        ) else {
            return reply.error(Errno::EBADF);
        };
        match self
            .ovl
            .copy_file_range(&hi, offset_in, &ho, offset_out, len)
        {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno(e)),
        }
    }
}
