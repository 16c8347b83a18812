//! The overlay instance (the kernel's `struct ovl_fs`) and the helpers every
//! operation shares: resolving a node to real fds, and building attributes.

use crate::inode::{Inode, InodeTable, Key, Redirect, ROOT};
use crate::layer::{LayerIdx, Layers, UPPER};
use crate::options::MountConfig;
use crate::sys::{self, Stat};
use crate::workdir::WorkDir;
use dashmap::DashMap;
use lru::LruCache;
use parking_lot::{Mutex, RwLock};
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The longest name any layer accepts (the kernel takes the minimum too).
pub const NAME_MAX: usize = 255;

/// Which lower layers of a merged directory hold each name. Lower layers
/// never change, so one listing per dir answers every lookup in it: a name
/// missing from 50 layers costs one hash probe. Layers are listed as
/// lookups first need them.
#[derive(Default)]
pub struct DirNames {
    inner: RwLock<NamesInner>,
}

#[derive(Default)]
struct NamesInner {
    names: HashMap<Box<OsStr>, Held>,
    /// The layers listed, a bit per layer index.
    listed: Bits,
    /// Names added by the layers listed: the entry's weight in the cache.
    weight: usize,
}

/// A set of layer indices (the upper layer and up to `MAX_LOWERS` lowers),
/// copied by value: a lookup takes a snapshot without allocating.
#[derive(Clone, Copy, Default)]
struct Bits([u64; (crate::options::MAX_LOWERS + 1).div_ceil(64)]);

impl Bits {
    fn has(&self, l: LayerIdx) -> bool {
        let l = l as usize;
        self.0.get(l / 64).is_some_and(|w| w & (1 << (l % 64)) != 0)
    }

    /// A layer beyond the set's range stays out of it, and is probed.
    fn set(&mut self, l: LayerIdx) {
        let l = l as usize;
        if let Some(w) = self.0.get_mut(l / 64) {
            *w |= 1 << (l % 64);
        }
    }
}

/// The lower layers holding one name (most names are in one).
#[derive(Clone)]
enum Held {
    One(LayerIdx),
    Many(Box<[LayerIdx]>),
}

impl Held {
    fn contains(&self, l: LayerIdx) -> bool {
        match self {
            Held::One(x) => *x == l,
            Held::Many(v) => v.contains(&l),
        }
    }

    fn add(&mut self, l: LayerIdx) {
        if self.contains(l) {
            return;
        }
        *self = match self {
            Held::One(x) => Held::Many(Box::new([*x, l])),
            Held::Many(v) => Held::Many(v.iter().copied().chain([l]).collect()),
        };
    }
}

/// What a directory's listing says of one name, as of the layers listed.
pub struct Holders {
    dir: Option<Arc<DirNames>>,
    held: Option<Held>,
    listed: Bits,
}

/// Dir listings by node id, bounded by the number of names they hold.
struct NameCache {
    lru: LruCache<u64, Arc<DirNames>>,
    weight: usize,
    cap: usize,
}

impl NameCache {
    /// Records that `dir`, `id`'s listing, grew by `added` names (caching
    /// it if it is not), then evicts the least recently used entries while
    /// over the bound.
    fn grew(&mut self, id: u64, dir: &Arc<DirNames>, added: usize) {
        match self.lru.peek(&id) {
            Some(d) if Arc::ptr_eq(d, dir) => self.weight += added,
            _ => {
                if let Some(old) = self.lru.put(id, dir.clone()) {
                    self.weight -= old.inner.read().weight;
                }
                self.weight += dir.inner.read().weight;
            }
        }
        while self.weight > self.cap && self.lru.len() > 1 {
            match self.lru.pop_lru() {
                Some((_, old)) => self.weight -= old.inner.read().weight,
                None => break,
            }
        }
    }

    fn pop(&mut self, id: u64) {
        if let Some(old) = self.lru.pop(&id) {
            self.weight -= old.inner.read().weight;
        }
    }
}

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

pub struct Overlay {
    pub layers: Layers,
    pub table: InodeTable,
    /// LRU of directory fds by (node id, layer): name resolution without
    /// walking from the layer root each time. Bounded by `cache_entries`.
    dircache: Mutex<LruCache<(u64, LayerIdx), Arc<OwnedFd>>>,
    /// Names in a merged dir's lower layers (which never change), so a
    /// lookup over many layers probes only those that hold the name.
    listings: Mutex<NameCache>,
    /// `W/work`, where copy-ups and whiteouts are built before they are renamed into place.
    pub work: Option<OwnedFd>,
    /// xino: the fs ids and the high bits they take (0: one filesystem).
    fs_devs: Vec<u64>,
    xino_bits: u32,
    /// `W/index` with index=on (see `index`).
    pub index: Option<Arc<OwnedFd>>,
    pub cfg: MountConfig,
    /// `trusted.overlay.` or, with `userxattr`, `user.overlay.`.
    pub xattr_prefix: &'static str,
    /// Overlay xattr names read on every lookup, built once.
    pub xattrs: XattrNames,
    /// Reported inode numbers of files copied up during this mount, by upper inode.
    pub copied_inos: DashMap<u64, u64>,
    tmp_counter: AtomicU64,
    /// Our pid, for temporary names (`std::process::id` is a system call).
    pid: u32,
    /// Nodes freed so far, to pace `malloc_trim`.
    freed: AtomicU64,
    pub ttl: Duration,
    pub notifier: OnceLock<fuser::Notifier>,
    /// The kernel accepted FUSE passthrough: file data bypasses the daemon.
    pub passthrough: std::sync::atomic::AtomicBool,
    /// Serializes the data copy of metadata-only copies (see `copyup`).
    pub metacopy_lock: Mutex<()>,
}

impl Overlay {
    /// The overlay over prepared layers (see [`crate::prepare`]); it keeps
    /// its own fd of `W/work`, and opens `W/index` in `workdir`.
    pub fn new(
        cfg: &MountConfig,
        layers: Layers,
        workdir: Option<&WorkDir>,
    ) -> io::Result<Overlay> {
        let work = match workdir {
            Some(w) => Some(w.work_fd().try_clone_to_owned()?),
            None => None,
        };
        let root_layers: Vec<LayerIdx> = layers.indices().collect();
        // Cached dir fds must stay well inside the fd limit.
        let fds = sys::raise_fd_limit();
        let cap = cfg.cache_entries.min((fds / 4) as usize).max(16);
        let cap = NonZeroUsize::new(cap).unwrap_or(NonZeroUsize::MIN);
        let table = InodeTable::new(root_layers);
        let root_st = layers
            .all
            .first()
            .and_then(|t| sys::fstat(t.root.as_fd()).ok());
        let (fs_devs, xino_bits) = (layers.fs_devs(), layers.xino_bits());
        let mut ovl = Overlay {
            table,
            layers,
            dircache: Mutex::new(LruCache::new(cap)),
            listings: Mutex::new(NameCache {
                lru: LruCache::unbounded(),
                weight: 0,
                // Names, not dirs: memory stays bounded however big the dirs.
                cap: cfg.cache_entries.saturating_mul(4).max(1024),
            }),
            work,
            fs_devs,
            xino_bits,
            index: None,
            cfg: cfg.clone(),
            xattr_prefix: if cfg.userxattr { USER } else { TRUSTED },
            xattrs: XattrNames::new(cfg.userxattr),
            copied_inos: DashMap::new(),
            tmp_counter: AtomicU64::new(0),
            pid: std::process::id(),
            freed: AtomicU64::new(0),
            ttl: cfg.timeout.unwrap_or(Duration::from_secs(86400)),
            notifier: OnceLock::new(),
            passthrough: std::sync::atomic::AtomicBool::new(false),
            metacopy_lock: Mutex::new(()),
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
    pub fn init_upper_uuid(&self) -> bool {
        if self.read_only() {
            return false;
        }
        let root = self.upper_root();
        let uuid = self.xattr(Ox::Uuid);
        let absent = |name: &CStr| matches!(sys::getxattr(root, name), Err(e) if e.raw_os_error() == Some(libc::ENODATA));
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
    pub fn drop_upper_uuid(&self) {
        let _ = sys::removexattr(self.upper_root(), self.xattr(Ox::Uuid));
    }

    /// An inode number of the filesystem `dev` in the overlay's one number
    /// space: with layers on several filesystems, the fs id goes in the high
    /// bits (the kernel's xino). A number already using them stays as is.
    pub fn xino(&self, ino: u64, dev: u64) -> u64 {
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
    pub fn allow_offline_changes(&self) -> bool {
        !self.cfg.index
            && !self.cfg.metacopy
            && self.cfg.redirect_dir != crate::options::RedirectDir::On
            && self.cfg.xino != crate::options::Xino::On
    }

    pub fn read_only(&self) -> bool {
        !self.layers.has_upper || self.cfg.read_only
    }

    pub fn node(&self, nodeid: u64) -> io::Result<Arc<Inode>> {
        self.table.get(nodeid).ok_or_else(|| sys::err(libc::ENOENT))
    }

    pub fn work_fd(&self) -> io::Result<BorrowedFd<'_>> {
        self.work
            .as_ref()
            .map(|w| w.as_fd())
            .ok_or_else(|| sys::err(libc::EROFS))
    }

    pub fn upper_root(&self) -> BorrowedFd<'_> {
        self.layers.get(UPPER).root.as_fd()
    }

    /// A unique temporary name in the workdir, in the kernel's `#N` style.
    pub fn tmp_name(&self) -> CString {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        CString::new(format!("#rovl{:x}.{}", n, self.pid)).expect("no NUL")
    }

    /// The mount's name of an overlay xattr (built once per mount).
    pub fn xattr(&self, x: Ox) -> &CStr {
        &self.xattrs.own[x as usize]
    }

    /// The fd of directory `node` in `layer` (O_PATH). Walks up the parents,
    /// one `openat(O_NOFOLLOW)` per component, filling the cache.
    pub fn dir_fd(&self, node: &Arc<Inode>, layer: LayerIdx) -> io::Result<Arc<OwnedFd>> {
        if node.nodeid == ROOT {
            return Ok(self.layers.get(layer).root.clone());
        }
        if let Some(fd) = self.dircache.lock().get(&(node.nodeid, layer)) {
            return Ok(fd.clone());
        }
        let (parent, name) = node.alias().ok_or_else(|| sys::err(libc::ENOENT))?;
        // A renamed directory is found in the lower layers where it was.
        let redirect = if self.layers.is_upper(layer) {
            None
        } else {
            node.redirect()
        };
        let (pfd, c) = match redirect {
            Some(Redirect::Abs(p)) => self
                .walk_path(layer, &p)?
                .at
                .ok_or_else(|| sys::err(libc::ENOENT))?,
            Some(Redirect::Rel(n)) => (self.dir_fd(&parent, layer)?, sys::cstr(&n)?),
            None => (self.dir_fd(&parent, layer)?, sys::cstr(&name)?),
        };
        let fd = Arc::new(sys::openat(
            pfd.as_fd(),
            &c,
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )?);
        self.dircache.lock().put((node.nodeid, layer), fd.clone());
        Ok(fd)
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

    /// Drops cached fds and listings of a directory (after rmdir, rename or forget).
    pub fn forget_dir_fds(&self, nodeid: u64) {
        {
            let mut c = self.dircache.lock();
            for l in self.layers.indices() {
                c.pop(&(nodeid, l));
            }
        }
        self.listings.lock().pop(nodeid);
    }

    /// What `node`'s listing says of `name`. Listings are kept for dirs
    /// merged from several lower layers, where they save most probes.
    pub fn holders(&self, node: &Arc<Inode>, layers: &[LayerIdx], name: &CStr) -> Holders {
        let lowers = layers.iter().filter(|&&l| !self.layers.is_upper(l)).count();
        if lowers < 2 {
            return Holders {
                dir: None,
                held: None,
                listed: Bits::default(),
            };
        }
        // Cached once a layer is listed (see `list_layer`).
        let cached = self.listings.lock().lru.get(&node.nodeid).cloned();
        let dir = cached.unwrap_or_default();
        let (held, listed) = {
            let g = dir.inner.read();
            (g.names.get(cstr_of(name)).cloned(), g.listed)
        };
        Holders {
            dir: Some(dir),
            held,
            listed,
        }
    }

    /// Whether lower layer `l` of `node` may hold `name`: false only when
    /// its listing lacks the name. A layer not listed yet is listed now; one
    /// that cannot be read is probed.
    pub fn may_hold(&self, h: &mut Holders, node: &Arc<Inode>, l: LayerIdx, name: &CStr) -> bool {
        if self.layers.is_upper(l) {
            return true;
        }
        let Some(dir) = &h.dir else {
            return true;
        };
        if !h.listed.has(l) {
            let dir = dir.clone();
            self.list_layer(&dir, node, l);
            let g = dir.inner.read();
            h.held = g.names.get(cstr_of(name)).cloned();
            h.listed = g.listed;
            if !h.listed.has(l) {
                return true;
            }
        }
        h.held.as_ref().is_some_and(|x| x.contains(l))
    }

    /// Adds lower layer `l` of `node` to its listing.
    fn list_layer(&self, dir: &Arc<DirNames>, node: &Arc<Inode>, l: LayerIdx) {
        let entries = self.dir_fd(node, l).and_then(|dfd| {
            let rd = sys::openat(dfd.as_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
            sys::read_dir_all(&rd)
        });
        let Ok(entries) = entries else {
            return;
        };
        let added = entries.len();
        {
            let mut g = dir.inner.write();
            if g.listed.has(l) {
                return;
            }
            for e in entries {
                // A `.wh.NAME` marker: this layer may hide NAME (the probe tells).
                let name = match crate::whiteout::hidden_by(e.name.as_bytes()) {
                    Some(n) => OsStr::from_bytes(n).into(),
                    None => e.name.into_boxed_os_str(),
                };
                match g.names.entry(name) {
                    Entry::Occupied(mut o) => o.get_mut().add(l),
                    Entry::Vacant(v) => {
                        v.insert(Held::One(l));
                    }
                }
            }
            g.listed.set(l);
            g.weight += added;
        }
        self.listings.lock().grew(node.nodeid, dir, added);
    }

    /// The parent dir fd in `layer` and the name of a non-root node.
    pub fn entry_in(
        &self,
        node: &Arc<Inode>,
        layer: LayerIdx,
    ) -> io::Result<(Arc<OwnedFd>, CString)> {
        // A lower hard link's names read its index entry once there is one.
        if self.index.is_some() && !self.layers.is_upper(layer) && node.has_index() {
            if let Some(e) = self.index_dir_entry(node) {
                return Ok(e);
            }
        }
        // Its names went away since the kernel looked it up: see `check_same`.
        let (parent, name) = node.alias().ok_or_else(|| sys::err(libc::ESTALE))?;
        Ok((self.dir_fd(&parent, layer)?, sys::cstr(&name)?))
    }

    /// An O_PATH fd of the node's real object in its top layer.
    pub fn path_fd(&self, node: &Arc<Inode>) -> io::Result<OwnedFd> {
        let top = node.top().ok_or_else(|| sys::err(libc::ENOENT))?;
        self.path_fd_in(node, top)
    }

    pub fn path_fd_in(&self, node: &Arc<Inode>, layer: LayerIdx) -> io::Result<OwnedFd> {
        if node.nodeid == ROOT {
            return sys::openat(self.layers.get(layer).root.as_fd(), c".", libc::O_PATH, 0);
        }
        match self.entry_in(node, layer) {
            Ok((pfd, name)) => sys::openat(pfd.as_fd(), &name, libc::O_PATH, 0),
            Err(e) => Ok(node.held().ok_or(e)?.try_clone()?),
        }
    }

    /// Real stat of the node's top layer object.
    pub fn real_stat(&self, node: &Arc<Inode>) -> io::Result<Stat> {
        let (top, key) = node.top_and_key();
        let top = top.ok_or_else(|| sys::err(libc::ENOENT))?;
        if node.nodeid == ROOT {
            return sys::fstat(self.layers.get(top).root.as_fd());
        }
        let (pfd, name) = match self.entry_in(node, top) {
            Ok(e) => e,
            Err(e) => return sys::fstat(node.held().ok_or(e)?.as_fd()),
        };
        let st = sys::fstatat(pfd.as_fd(), &name)?;
        self.check_same(node, &key, &st)?;
        Ok(st)
    }

    /// Whether `st`, found by the node's name, is still the object the node
    /// stands for. A concurrent rename or unlink can put another object, or
    /// a whiteout, under the name between two requests: the answer is then
    /// ESTALE, and the kernel looks the name up again (path calls retry
    /// once), as it does for any filesystem whose objects moved.
    pub fn check_same(&self, node: &Arc<Inode>, key: &Key, st: &Stat) -> io::Result<()> {
        // A node's type never changes (a freed inode number may come back
        // as a whiteout).
        if sys::mode_type(st.st_mode) != node.kind {
            return Err(sys::err(libc::ESTALE));
        }
        let Key::Real(dev, ino) = key else {
            return Ok(());
        };
        // Dirs are held by cached fds; an indexed or metadata-only file
        // reads another object by design.
        if node.is_dir() || node.has_index() || node.has_lowerdata() {
            return Ok(());
        }
        if st.st_ino == *ino && st.st_dev == *dev {
            Ok(())
        } else {
            Err(sys::err(libc::ESTALE))
        }
    }

    /// The attributes the kernel overlay would report for `node`.
    pub fn attr(&self, node: &Arc<Inode>, st: &Stat) -> fuser::FileAttr {
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

    /// Attributes with nothing set, for entries that carry no inode.
    pub fn attr_template(&self) -> fuser::FileAttr {
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
    pub fn check_name(name: &OsStr) -> io::Result<CString> {
        if name.len() > NAME_MAX {
            return Err(sys::err(libc::ENAMETOOLONG));
        }
        sys::cstr(name)
    }

    pub fn check_writable(&self) -> io::Result<()> {
        if self.read_only() {
            Err(sys::err(libc::EROFS))
        } else {
            Ok(())
        }
    }

    /// Sizes of the caches, for `rovl stats`: nodes, dir fds, listed names.
    pub fn cache_sizes(&self) -> (usize, usize, usize) {
        (
            self.table.len(),
            self.dircache.lock().len(),
            self.listings.lock().weight,
        )
    }

    /// Drops the kernel's cached attributes and listing of a directory.
    pub fn inval_dir(&self, nodeid: u64) {
        if let Some(n) = self.notifier.get() {
            let _ = n.inval_inode(fuser::INodeNo(nodeid), 0, 0);
        }
    }

    /// Drops the kernel's cached attributes of a node (not its pages): safe
    /// to send from inside a request.
    pub fn inval_attr(&self, nodeid: u64) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn names(listed: &[LayerIdx], held: &[(&str, &[LayerIdx])]) -> Arc<DirNames> {
        let mut g = NamesInner::default();
        for &l in listed {
            g.listed.set(l);
            g.weight += 1;
        }
        for (n, ls) in held {
            let mut h = Held::One(ls[0]);
            for &l in &ls[1..] {
                h.add(l);
            }
            g.names.insert(OsStr::new(n).into(), h);
        }
        Arc::new(DirNames {
            inner: RwLock::new(g),
        })
    }

    #[test]
    fn held_and_bits() {
        let mut h = Held::One(3);
        h.add(130);
        h.add(7);
        assert!(h.contains(3) && h.contains(7) && h.contains(130) && !h.contains(4));
        let mut b = Bits::default();
        b.set(0);
        b.set(200);
        assert!(b.has(0) && b.has(200) && !b.has(1) && !b.has(64) && !b.has(499));
        // Out of range: not set, so probed.
        b.set(600);
        assert!(!b.has(600));
    }

    #[test]
    fn name_cache_is_bounded_by_weight() {
        let mut c = NameCache {
            lru: LruCache::unbounded(),
            weight: 0,
            cap: 10,
        };
        let dirs: Vec<Arc<DirNames>> = (0..5).map(|_| names(&[], &[])).collect();
        let grow = |c: &mut NameCache, id: u64, n: usize| {
            for _ in 0..n {
                dirs[id as usize].inner.write().weight += 1;
                c.grew(id, &dirs[id as usize], 1);
            }
        };
        grow(&mut c, 1, 4);
        grow(&mut c, 2, 4);
        assert_eq!(c.weight, 8);
        // A weight of 12 over the bound of 10: the oldest dir went.
        grow(&mut c, 3, 4);
        assert_eq!(c.weight, 8);
        assert!(c.lru.peek(&1).is_none() && c.lru.peek(&3).is_some());
        c.pop(2);
        c.pop(2);
        assert_eq!(c.weight, 4);
        // An evicted dir that grows again comes back with all its layers.
        grow(&mut c, 1, 1);
        assert_eq!(c.weight, 9);
        // One entry heavier than the bound is still kept.
        grow(&mut c, 4, 50);
        assert_eq!(c.lru.len(), 1);
        assert_eq!(c.weight, 50);
    }
}
