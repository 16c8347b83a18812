//! The overlay instance (the kernel's `struct ovl_fs`): the layers, the node
//! table, the caches, and what every operation shares (attributes, name
//! checks, the xattr names). Resolving a node to its real objects is
//! `resolve`.

use crate::error::{Error, Result, StartResult};
use crate::inode::{Inode, InodeTable, ROOT};
use crate::layer::{LayerIdx, Layers, UPPER};
use crate::options::MountConfig;
use crate::resolve::DirCache;
use crate::sys::{self, Stat};
use crate::workdir::WorkDir;
use dashmap::DashMap;
use parking_lot::Mutex;
use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The longest name any layer accepts (the kernel takes the minimum too).
pub const NAME_MAX: usize = 255;

const TRUSTED: &str = "trusted.overlay.";
const USER: &str = "user.overlay.";

/// Overlay xattr names read on every lookup, built once per mount. Layer
/// format markers (opaque, whiteout) are read under both prefixes, own
/// first, so lower layers written either way read right.
pub struct XattrNames {
    pub opaque: [CString; 2],
    pub whiteout: [CString; 2],
    pub redirect: CString,
    /// The mount's own names of the other overlay xattrs, by `Ox`.
    own: [CString; OX_COUNT],
}

/// The overlay's own xattrs (after `trusted.overlay.` or `user.overlay.`).
#[derive(Clone, Copy, Debug)]
pub enum Ox {
    Opaque,
    Redirect,
    Origin,
    Impure,
    Nlink,
    Upper,
    Uuid,
    Metacopy,
}

const OX_NAMES: [&str; 8] = [
    "opaque", "redirect", "origin", "impure", "nlink", "upper", "uuid", "metacopy",
];
const OX_COUNT: usize = OX_NAMES.len();

impl XattrNames {
    fn new(userxattr: bool) -> XattrNames {
        let (own, other) = if userxattr {
            (USER, TRUSTED)
        } else {
            (TRUSTED, USER)
        };
        let name = |p: &str, s: &str| CString::new(format!("{p}{s}")).expect("no NUL");
        XattrNames {
            opaque: [name(own, "opaque"), name(other, "opaque")],
            whiteout: [name(own, "whiteout"), name(other, "whiteout")],
            redirect: name(own, "redirect"),
            own: OX_NAMES.map(|s| name(own, s)),
        }
    }
}

/// One lookup count on a node: what the kernel holds once an entry reply
/// carrying the node reaches it. `keep` hands it over (the reply is sent);
/// dropped instead (an error, a full readdirplus buffer, a node only
/// probed), it is forgotten, so counts always even out.
#[must_use = "a lookup count is forgotten unless kept"]
pub struct Counted<'a> {
    ovl: &'a Overlay,
    node: Option<Arc<Inode>>,
}

impl<'a> Counted<'a> {
    pub fn new(ovl: &'a Overlay, node: Arc<Inode>) -> Self {
        Counted {
            ovl,
            node: Some(node),
        }
    }

    /// The count goes to the kernel with the reply.
    pub fn keep(mut self) -> Arc<Inode> {
        self.node.take().expect("a count is kept once")
    }
}

impl std::ops::Deref for Counted<'_> {
    type Target = Arc<Inode>;

    fn deref(&self) -> &Arc<Inode> {
        self.node.as_ref().expect("a kept count is gone")
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        if let Some(n) = self.node.take() {
            self.ovl.forget(n.nodeid, 1);
        }
    }
}

/// Free memory an arena may keep at its top (glibc's default until its
/// dynamic threshold moves it, 128 KiB; 1 MiB spares small churn).
const TRIM_THRESHOLD: usize = 1 << 20;

pub struct Overlay {
    pub(crate) layers: Layers,
    pub(crate) table: InodeTable,
    /// Dir fds and lower listings (see `resolve`).
    pub(crate) cache: DirCache,
    /// `W/work`, where copy-ups and whiteouts are built before they are renamed into place.
    pub(crate) work: Option<OwnedFd>,
    /// xino: the fs ids and the high bits they take (0: one filesystem).
    fs_devs: Vec<u64>,
    xino_bits: u32,
    /// `W/index` with index=on (see `index`).
    pub(crate) index: Option<Arc<OwnedFd>>,
    pub(crate) cfg: MountConfig,
    /// `trusted.overlay.` or, with `userxattr`, `user.overlay.`.
    pub(crate) xattr_prefix: &'static str,
    /// Overlay xattr names read on every lookup, built once.
    pub(crate) xattrs: XattrNames,
    /// Reported inode numbers of files copied up during this mount, by upper inode.
    pub(crate) copied_inos: DashMap<u64, u64>,
    tmp_counter: AtomicU64,
    /// Our pid, for temporary names (`std::process::id` is a system call).
    pid: u32,
    /// Nodes freed so far, to pace `malloc_trim`.
    freed: AtomicU64,
    pub(crate) ttl: Duration,
    pub(crate) notifier: OnceLock<fuser::Notifier>,
    /// The kernel accepted FUSE passthrough: file data bypasses the daemon.
    pub(crate) passthrough: std::sync::atomic::AtomicBool,
    /// Serializes the data copy of metadata-only copies (see `copyup`).
    pub(crate) metacopy_lock: Mutex<()>,
    /// The node whose `security.capability` a caller removed last: the
    /// kernel's setattr of nothing that follows may keep set-user-ID.
    pub(crate) caps_removed: AtomicU64,
    pub(crate) shared_whiteout: crate::whiteout::SharedWhiteout,
}

impl Overlay {
    /// The overlay over prepared layers (see [`crate::prepare`]); it keeps
    /// its own fd of `W/work`, and opens `W/index` in `workdir`.
    pub fn new(
        cfg: &MountConfig,
        layers: Layers,
        workdir: Option<&WorkDir>,
    ) -> StartResult<Overlay> {
        let work = match workdir {
            Some(w) => Some(
                w.work_fd()
                    .try_clone_to_owned()
                    .map_err(|e| Error::because("cannot keep the workdir", e))?,
            ),
            None => None,
        };
        let root_layers: Vec<LayerIdx> = layers.indices().collect();
        // Memory follows the kernel's cache (see `forget`) only if every
        // thread's arena hands its freed top back too.
        sys::fix_malloc_trim_threshold(TRIM_THRESHOLD);
        // Cached dir fds must stay well inside the fd limit.
        let fds = sys::raise_fd_limit();
        let cap = cfg.cache_entries.min((fds / 4) as usize).max(16);
        let table = InodeTable::new(root_layers);
        let root_st = layers
            .all
            .first()
            .and_then(|t| sys::fstat(t.root.as_fd()).ok());
        let (fs_devs, xino_bits) = (layers.fs_devs(), layers.xino_bits());
        let mut ovl = Overlay {
            table,
            layers,
            cache: DirCache::new(cap, cfg.cache_entries),
            work,
            fs_devs,
            xino_bits,
            index: None,
            cfg: cfg.clone(),
            xattr_prefix: if cfg.userxattr { USER } else { TRUSTED },
            xattrs: XattrNames::new(cfg.userxattr),
            copied_inos: DashMap::new(),
            tmp_counter: AtomicU64::new(0),
            caps_removed: AtomicU64::new(0),
            pid: std::process::id(),
            freed: AtomicU64::new(0),
            ttl: cfg.timeout.unwrap_or(Duration::from_secs(86400)),
            notifier: OnceLock::new(),
            passthrough: std::sync::atomic::AtomicBool::new(false),
            metacopy_lock: Mutex::new(()),
            shared_whiteout: Default::default(),
        };
        // As the kernel: the root reports its top layer root's number.
        if let (Some(root), Some(st)) = (ovl.table.get(ROOT), root_st) {
            root.set_ino(ovl.xino(st.st_ino, st.st_dev));
        }
        if let (true, Some(w)) = (cfg.index, workdir) {
            // A read-only mount reads the index as it is: lower names of
            // an indexed hard link still show its copy.
            ovl.index = if cfg.read_only {
                sys::openat(w.base_fd(), c"index", libc::O_PATH | libc::O_DIRECTORY, 0)
                    .ok()
                    .map(Arc::new)
            } else {
                Some(Arc::new(ovl.open_index(w.base_fd())?))
            };
        }
        Ok(ovl)
    }

    /// As the kernel (uuid=auto): a new overlay, whose upper root is not yet
    /// impure, gets a persistent random UUID in the upper root's xattr.
    /// Returns whether it wrote one (a mount that then fails takes it back).
    pub(crate) fn init_upper_uuid(&self) -> bool {
        if self.read_only() {
            return false;
        }
        let root = self.upper_root();
        let uuid = self.xattr(Ox::Uuid);
        let absent =
            |name: &CStr| matches!(sys::getxattr(root, name), Err(e) if e.raw() == libc::ENODATA);
        if absent(uuid) && absent(self.xattr(Ox::Impure)) {
            let mut b = [0u8; 16];
            if sys::getrandom(&mut b).is_ok() {
                // RFC 4122 version 4, as uuid_gen() makes them.
                b[6] = (b[6] & 0x0f) | 0x40;
                b[8] = (b[8] & 0x3f) | 0x80;
                return sys::setxattr(root, uuid, &b, 0).is_ok();
            }
        }
        false
    }

    /// Takes back a uuid `init_upper_uuid` wrote, for a mount that failed.
    pub(crate) fn drop_upper_uuid(&self) {
        let _ = sys::removexattr(self.upper_root(), self.xattr(Ox::Uuid));
    }

    /// An inode number of the filesystem `dev` in the overlay's one number
    /// space: with layers on several filesystems, the fs id goes in the high
    /// bits (the kernel's xino). A number already using them stays as is.
    pub(crate) fn xino(&self, ino: u64, dev: u64) -> u64 {
        let bits = self.xino_bits;
        if bits == 0 {
            return ino;
        }
        let shift = 64 - bits;
        let Some(fsid) = self.fs_devs.iter().position(|&d| d == dev) else {
            return ino;
        };
        if ino >> shift != 0 {
            return ino;
        }
        ino | (fsid as u64) << (shift + 1)
    }

    /// The kernel's `ovl_allow_offline_changes`: none of the features that
    /// assume lower layers never change is on.
    pub(crate) fn allow_offline_changes(&self) -> bool {
        !self.cfg.index
            && !self.cfg.metacopy
            && self.cfg.redirect_dir != crate::options::RedirectDir::On
            && self.cfg.xino != crate::options::Xino::On
    }

    pub(crate) fn read_only(&self) -> bool {
        !self.layers.has_upper || self.cfg.read_only
    }

    pub fn node(&self, nodeid: u64) -> Result<Arc<Inode>> {
        self.table.get(nodeid).ok_or_else(|| sys::err(libc::ENOENT))
    }

    pub(crate) fn work_fd(&self) -> Result<BorrowedFd<'_>> {
        self.work
            .as_ref()
            .map(|w| w.as_fd())
            .ok_or_else(|| sys::err(libc::EROFS))
    }

    pub(crate) fn upper_root(&self) -> BorrowedFd<'_> {
        self.layers.get(UPPER).root.as_fd()
    }

    /// A unique temporary name in the workdir, in the kernel's `#N` style.
    pub(crate) fn tmp_name(&self) -> CString {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        CString::new(format!("#rovl{:x}.{}", n, self.pid)).expect("no NUL")
    }

    /// The mount's name of an overlay xattr (built once per mount).
    pub(crate) fn xattr(&self, x: Ox) -> &CStr {
        &self.xattrs.own[x as usize]
    }

    /// The kernel dropped `n` references to a node: a node it no longer
    /// holds loses its cached fds too, so memory follows the kernel's cache.
    pub fn forget(&self, nodeid: u64, n: u64) {
        if let Some(node) = self.table.forget(nodeid, n) {
            if node.is_dir() {
                self.forget_dir_fds(nodeid);
            }
            // After the kernel drops its caches, hand freed memory back to
            // the system, so the daemon's size follows the kernel's cache.
            let freed = self.freed.fetch_add(1, Ordering::Relaxed) + 1;
            if freed.is_multiple_of(16384) {
                self.table.shrink();
                sys::malloc_trim();
            }
        }
    }

    /// The attributes the kernel overlay would report for `node`.
    pub(crate) fn attr(&self, node: &Arc<Inode>, st: &Stat) -> fuser::FileAttr {
        let mut own;
        let st = if self.override_name().is_some() {
            own = *st;
            self.overridden(node, &mut own);
            &own
        } else {
            st
        };
        let mut nlink = st.st_nlink as u32;
        // An indexed hard link counts the names users see (its nlink xattr).
        if self.index.is_some() && node.has_index() {
            if let Ok(fd) = self.path_fd(node) {
                if let Ok(rst) = sys::fstat(fd.as_fd()) {
                    nlink = self.union_nlink(fd.as_fd(), &rst) as u32;
                }
            }
        }
        // As the kernel: merged directories report one link.
        if node.is_dir() && (self.cfg.static_nlink || node.state.read().layers.len() > 1) {
            nlink = 1;
        }
        // A metadata-only copy uses the blocks of its lower data.
        let mut blocks = st.st_blocks as u64;
        if let Some(lower) = self.cfg.metacopy.then(|| node.lowerdata()).flatten() {
            if let Ok(lst) = sys::fstat(lower.as_fd()) {
                blocks = lst.st_blocks as u64;
            }
        }
        // Only an id mapping asks which layer the ids come from.
        let idmapped =
            !self.cfg.ids.is_identity() && node.top().is_some_and(|t| self.layers.get(t).idmapped);
        fuser::FileAttr {
            ino: fuser::INodeNo(node.ino()),
            size: st.st_size as u64,
            blocks,
            atime: to_time(st.st_atime, st.st_atime_nsec),
            mtime: to_time(st.st_mtime, st.st_mtime_nsec),
            ctime: to_time(st.st_ctime, st.st_ctime_nsec),
            crtime: UNIX_EPOCH,
            kind: file_type(st.st_mode),
            perm: (st.st_mode & 0o7777) as u16,
            nlink,
            uid: self.cfg.ids.uid.shown_from(st.st_uid, idmapped),
            gid: self.cfg.ids.gid.shown_from(st.st_gid, idmapped),
            rdev: st.st_rdev as u32,
            blksize: st.st_blksize as u32,
            flags: 0,
        }
    }

    /// Attributes for an entry reply, whose `ino` fuser sends as the node
    /// id: when the reported number differs, the attributes expire at once
    /// so that the next stat asks GETATTR, which reports the real number.
    pub(crate) fn entry_attr(&self, node: &Arc<Inode>, st: &Stat) -> (fuser::FileAttr, Duration) {
        let mut attr = self.attr(node, st);
        if node.ino_is_id() {
            return (attr, self.attr_ttl(node));
        }
        attr.ino = fuser::INodeNo(node.nodeid);
        (attr, Duration::ZERO)
    }

    /// The names of an indexed hard link are separate kernel inodes sharing
    /// one file: their attributes are never cached, so a change through one
    /// name shows through the others at once.
    pub(crate) fn attr_ttl(&self, node: &Inode) -> Duration {
        if node.has_index() {
            Duration::ZERO
        } else {
            self.ttl
        }
    }

    /// Attributes with nothing set, for entries that carry no inode.
    pub(crate) fn attr_template(&self) -> fuser::FileAttr {
        fuser::FileAttr {
            ino: fuser::INodeNo(0),
            size: 0,
            blocks: 0,
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: fuser::FileType::Directory,
            perm: 0,
            nlink: 0,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    /// Name checks shared by every operation that takes one.
    pub(crate) fn check_name(name: &OsStr) -> Result<CString> {
        if name.len() > NAME_MAX {
            return Err(sys::err(libc::ENAMETOOLONG));
        }
        sys::cstr(name)
    }

    pub(crate) fn check_writable(&self) -> Result<()> {
        if self.read_only() {
            Err(sys::err(libc::EROFS))
        } else {
            Ok(())
        }
    }

    /// Sizes of the caches, for `rovl stats`: nodes, dir fds, listed names.
    pub(crate) fn cache_sizes(&self) -> (usize, usize, usize) {
        let (fds, names) = self.cache.sizes();
        (self.table.len(), fds, names)
    }

    /// Drops the kernel's cached attributes and listing of a directory.
    pub(crate) fn inval_dir(&self, nodeid: u64) {
        if let Some(n) = self.notifier.get() {
            let _ = n.inval_inode(fuser::INodeNo(nodeid), 0, 0);
        }
    }

    /// Drops the kernel's cached attributes of a node (not its pages): safe
    /// to send from inside a request.
    pub(crate) fn inval_attr(&self, nodeid: u64) {
        if let Some(n) = self.notifier.get() {
            let _ = n.inval_inode(fuser::INodeNo(nodeid), -1, 0);
        }
    }
}

pub fn to_time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs((-sec) as u64) + Duration::from_nanos(nsec as u64)
    }
}

pub fn file_type(mode: u32) -> fuser::FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => fuser::FileType::Directory,
        libc::S_IFLNK => fuser::FileType::Symlink,
        libc::S_IFCHR => fuser::FileType::CharDevice,
        libc::S_IFBLK => fuser::FileType::BlockDevice,
        libc::S_IFIFO => fuser::FileType::NamedPipe,
        libc::S_IFSOCK => fuser::FileType::Socket,
        _ => fuser::FileType::RegularFile,
    }
}

/// `d_type` of a mode.
pub fn dtype_kind(d_type: u8) -> fuser::FileType {
    match d_type {
        libc::DT_DIR => fuser::FileType::Directory,
        libc::DT_LNK => fuser::FileType::Symlink,
        libc::DT_CHR => fuser::FileType::CharDevice,
        libc::DT_BLK => fuser::FileType::BlockDevice,
        libc::DT_FIFO => fuser::FileType::NamedPipe,
        libc::DT_SOCK => fuser::FileType::Socket,
        _ => fuser::FileType::RegularFile,
    }
}

pub fn cstr_of(s: &CStr) -> &OsStr {
    use std::os::unix::ffi::OsStrExt;
    OsStr::from_bytes(s.to_bytes())
}
