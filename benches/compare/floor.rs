//! The FUSE floor: a merged tree held in memory and served through the
//! fuser session rovl runs on, asking the kernel for what rovl asks (its
//! INIT flags, passthrough, io_uring when offered, threads, cache times),
//! but doing no layer work: no lookups in layers, no listing merges, no
//! whiteouts. What it costs is the kernel's FUSE client and the transport:
//! the least any FUSE overlay pays on this kernel. It serves reads and
//! removals (in memory only): an open for writing gets `EROFS`, and the
//! requests that create or change files are not served (`ENOSYS`).

use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyXattr, Request,
};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

/// The bench binary serves the floor when run with this, the tree and the mountpoint.
pub const ARG: &str = "--serve-floor";
/// The source name it mounts with, as mountinfo shows it.
pub const FSNAME: &str = "rovl-floor";
/// The root's node id, as FUSE fixes it.
const ROOT: u64 = 1;
/// rovl's default entry and attribute time.
const TTL: Duration = Duration::from_secs(86400);

struct Dir {
    /// Its `O_PATH` fd: files are opened relative to it, as rovl does.
    fd: OwnedFd,
    /// Entries in listing order; a removed one leaves a hole, so offsets hold.
    list: Vec<Option<(OsString, u64)>>,
    /// Name to node and place in `list`.
    names: HashMap<OsString, (u64, usize)>,
}

struct Node {
    attr: FileAttr,
    parent: u64,
    name: OsString,
    dir: Option<RwLock<Dir>>,
    link: Option<OsString>,
    /// Registered at the first open and kept, as rovl keeps a lower file's.
    backing: Mutex<Option<Arc<BackingId>>>,
}

struct Floor {
    /// By node id: the file's own inode number, as rovl's are where it
    /// can (`git status` compares them with its index), and 1 for the root.
    nodes: HashMap<u64, Node>,
    passthrough: AtomicBool,
    /// Open files read through us when passthrough is not offered.
    open: Mutex<HashMap<u64, Arc<File>>>,
    next_fh: AtomicU64,
}

fn attr(ino: u64, m: &fs::Metadata) -> FileAttr {
    let t = |s: i64, ns: i64| UNIX_EPOCH + Duration::new(s.max(0) as u64, ns as u32);
    let ft = m.file_type();
    let kind = if ft.is_dir() {
        FileType::Directory
    } else if ft.is_symlink() {
        FileType::Symlink
    } else {
        FileType::RegularFile
    };
    FileAttr {
        ino: INodeNo(ino),
        size: m.size(),
        blocks: m.blocks(),
        atime: t(m.atime(), m.atime_nsec()),
        mtime: t(m.mtime(), m.mtime_nsec()),
        ctime: t(m.ctime(), m.ctime_nsec()),
        crtime: UNIX_EPOCH,
        kind,
        perm: (m.mode() & 0o7777) as u16,
        nlink: m.nlink() as u32,
        uid: m.uid(),
        gid: m.gid(),
        rdev: m.rdev() as u32,
        blksize: m.blksize() as u32,
        flags: 0,
    }
}

impl Floor {
    /// Reads the whole tree at `root` into memory.
    fn load(root: &Path) -> io::Result<Floor> {
        let mut f = Floor {
            nodes: HashMap::new(),
            passthrough: AtomicBool::new(false),
            open: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        };
        f.add(root, ROOT, OsString::new())?;
        Ok(f)
    }

    /// Adds `path` and what is below it; returns its node id.
    fn add(&mut self, path: &Path, parent: u64, name: OsString) -> io::Result<u64> {
        let at = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        let m = fs::symlink_metadata(path).map_err(at)?;
        let ino = if self.nodes.is_empty() { ROOT } else { m.ino() };
        let link = if m.file_type().is_symlink() {
            Some(fs::read_link(path).map_err(at)?.into_os_string())
        } else {
            None
        };
        self.nodes.insert(
            ino,
            Node {
                attr: attr(ino, &m),
                parent,
                name,
                dir: None,
                link,
                backing: Mutex::new(None),
            },
        );
        if m.is_dir() {
            let mut list = Vec::new();
            let mut names = HashMap::new();
            for e in fs::read_dir(path).map_err(at)? {
                let e = e.map_err(at)?;
                let child = self.add(&e.path(), ino, e.file_name())?;
                names.insert(e.file_name(), (child, list.len()));
                list.push(Some((e.file_name(), child)));
            }
            let fd = rovl::sys::open_dir_path(path).map_err(|e| at(e.into()))?;
            self.nodes.get_mut(&ino).expect("added above").dir =
                Some(RwLock::new(Dir { fd, list, names }));
        }
        Ok(ino)
    }

    fn node(&self, ino: INodeNo) -> Result<&Node, Errno> {
        self.nodes.get(&ino.0).ok_or(Errno::ENOENT)
    }

    fn dir(&self, ino: INodeNo) -> Result<&RwLock<Dir>, Errno> {
        self.node(ino)?.dir.as_ref().ok_or(Errno::ENOTDIR)
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<u64, Errno> {
        let d = self.dir(parent)?.read();
        d.names.get(name).map(|&(c, _)| c).ok_or(Errno::ENOENT)
    }

    /// Calls `add(node, offset, name)` for the entries from `offset` on
    /// (".", "..", then the live ones) until it says the reply is full.
    fn each_entry(
        &self,
        ino: INodeNo,
        offset: u64,
        mut add: impl FnMut(u64, u64, &OsStr) -> bool,
    ) -> Result<(), Errno> {
        let node = self.node(ino)?;
        let d = self.dir(ino)?.read();
        let dots = [(ino.0, "."), (node.parent, "..")];
        for (k, (c, n)) in dots.iter().enumerate().skip(offset as usize) {
            if add(*c, k as u64 + 1, OsStr::new(n)) {
                return Ok(());
            }
        }
        // Entry `i` of the list is at offset `i + 3`: holes keep them.
        let from = (offset as usize).saturating_sub(dots.len());
        for (i, e) in d.list.iter().enumerate().skip(from) {
            if let Some((n, c)) = e {
                if add(*c, (i + dots.len()) as u64 + 1, n) {
                    break;
                }
            }
        }
        Ok(())
    }

    fn remove(&self, parent: INodeNo, name: &OsStr, dir: bool) -> Result<(), Errno> {
        let mut d = self.dir(parent)?.write();
        let &(child, at) = d.names.get(name).ok_or(Errno::ENOENT)?;
        let node = self.node(INodeNo(child))?;
        match (&node.dir, dir) {
            (Some(sub), true) if sub.read().names.is_empty() => {}
            (Some(_), true) => return Err(Errno::ENOTEMPTY),
            (Some(_), false) => return Err(Errno::EISDIR),
            (None, true) => return Err(Errno::ENOTDIR),
            (None, false) => {}
        }
        d.names.remove(name);
        d.list[at] = None;
        Ok(())
    }

    fn open_file(&self, node: &Node) -> Result<OwnedFd, Errno> {
        let parent = self.dir(INodeNo(node.parent))?.read();
        let name = CString::new(node.name.as_bytes()).map_err(|_| Errno::EINVAL)?;
        let flags = libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW;
        rovl::sys::openat(std::os::fd::AsFd::as_fd(&parent.fd), &name, flags, 0)
            .map_err(|e| Errno::from_i32(e.raw()))
    }
}

impl fuser::Filesystem for Floor {
    fn init(&mut self, _: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let have = config.capabilities();
        let want = rovl::fs::INIT_FLAGS | InitFlags::FUSE_POSIX_ACL;
        let _ = config.add_capabilities(want & have);
        if have.contains(InitFlags::FUSE_PASSTHROUGH)
            && config.set_max_stack_depth(1).is_ok()
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
        {
            self.passthrough.store(true, Ordering::Relaxed);
        }
        let _ = config.set_max_write(1 << 20);
        if have.contains(InitFlags::FUSE_OVER_IO_URING) {
            let _ = config.add_capabilities(InitFlags::FUSE_OVER_IO_URING);
        }
        Ok(())
    }

    fn lookup(&self, _: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.child(parent, name).and_then(|c| self.node(INodeNo(c))) {
            Ok(n) => reply.entry(&TTL, &n.attr, Generation(0)),
            // A negative entry (node id 0) the kernel may cache, as rovl replies.
            Err(e) if e == Errno::ENOENT => {
                let none = FileAttr {
                    ino: INodeNo(0),
                    ..self.nodes[&ROOT].attr
                };
                reply.entry(&TTL, &none, Generation(0))
            }
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _: &Request, ino: INodeNo, _: Option<FileHandle>, reply: ReplyAttr) {
        match self.node(ino) {
            Ok(n) => reply.attr(&TTL, &n.attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _: &Request, ino: INodeNo, reply: ReplyData) {
        match self.node(ino).map(|n| n.link.as_ref()) {
            Ok(Some(t)) => reply.data(t.as_bytes()),
            Ok(None) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.remove(parent, name, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.remove(parent, name, true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _: &Request, ino: INodeNo, flags: OpenFlags, _: bool, reply: ReplyOpen) {
        let flags = flags.0;
        if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
            return reply.error(Errno::EROFS);
        }
        let node = match self.node(ino) {
            Ok(n) if n.dir.is_none() => n,
            Ok(_) => return reply.error(Errno::EISDIR),
            Err(e) => return reply.error(e),
        };
        if self.passthrough.load(Ordering::Relaxed) {
            let mut kept = node.backing.lock();
            if kept.is_none() {
                let fd = match self.open_file(node) {
                    Ok(fd) => fd,
                    Err(e) => return reply.error(e),
                };
                match reply.open_backing(&fd) {
                    Ok(b) => *kept = Some(Arc::new(b)),
                    Err(e) => return reply.error(e.into()),
                }
            }
            let b = kept.clone().expect("set above");
            drop(kept);
            return reply.opened_passthrough(FileHandle(0), FopenFlags::FOPEN_NOFLUSH, &b);
        }
        match self.open_file(node) {
            Ok(fd) => {
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                self.open.lock().insert(fh, Arc::new(File::from(fd)));
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE)
            }
            Err(e) => reply.error(e),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        _: &Request,
        _: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _: OpenFlags,
        _: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(f) = self.open.lock().get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        let mut buf = vec![0; size as usize];
        match f.read_at(&mut buf, offset) {
            Ok(n) => reply.data(&buf[..n]),
            Err(e) => reply.error(e.into()),
        }
    }

    fn release(
        &self,
        _: &Request,
        _: INodeNo,
        fh: FileHandle,
        _: OpenFlags,
        _: Option<LockOwner>,
        _: bool,
        reply: ReplyEmpty,
    ) {
        self.open.lock().remove(&fh.0);
        reply.ok()
    }

    fn opendir(&self, _: &Request, ino: INodeNo, _: OpenFlags, reply: ReplyOpen) {
        match self.dir(ino) {
            Ok(_) => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _: &Request,
        ino: INodeNo,
        _: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let r = self.each_entry(ino, offset, |c, off, name| {
            reply.add(INodeNo(c), off, self.nodes[&c].attr.kind, name)
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdirplus(
        &self,
        _: &Request,
        ino: INodeNo,
        _: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let r = self.each_entry(ino, offset, |c, off, name| {
            let a = &self.nodes[&c].attr;
            reply.add(INodeNo(c), off, name, &TTL, a, Generation(0))
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn getxattr(&self, _: &Request, _: INodeNo, name: &OsStr, _: u32, reply: ReplyXattr) {
        // As rovl answers a missing label, after which coreutils stops asking.
        if name.as_bytes() == b"security.selinux" {
            reply.error(Errno::ENOTSUP)
        } else {
            reply.error(Errno::ENODATA)
        }
    }

    fn listxattr(&self, _: &Request, _: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0)
        } else {
            reply.data(&[])
        }
    }
}

/// Loads `tree` and serves it at `mnt` until unmounted.
pub fn serve(tree: &Path, mnt: &Path) -> Result<(), String> {
    let floor = Floor::load(tree).map_err(|e| e.to_string())?;
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::FSName(FSNAME.into()),
        MountOption::DefaultPermissions,
    ];
    config.acl = fuser::SessionACL::All;
    config.n_threads = Some(rovl::session::default_threads());
    config.clone_fd = true;
    fuser::mount(floor, mnt, &config).map_err(|e| format!("{}: {e}", mnt.display()))
}
