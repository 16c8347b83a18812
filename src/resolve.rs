//! From a node to its real objects (the kernel's `ovl_path_real` and
//! friends in `util.c`): a node's dir fd in each layer, walked one
//! `openat(O_NOFOLLOW)` per component and cached; the parent fd and name
//! of an entry (through its index entry or redirect); its real `stat`.
//! Also the lower listings that tell a lookup which layers can hold a
//! name. Name lookup itself (a name to a node) is `lookup`.

use crate::error::Result;
use crate::inode::{Inode, Key, Markers, Redirect, ROOT};
use crate::layer::LayerIdx;
use crate::overlay::{cstr_of, Overlay};
use crate::sys::{self, Stat};
use crate::whiteout::{has_marker, hidden_by};
use lru::LruCache;
use parking_lot::{Mutex, RwLock};
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr};
use std::hash::{BuildHasher, RandomState};
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// `Inode::lower_misses` once the dir's one lower layer should be listed.
const LIST: u16 = u16::MAX;

/// The resolution caches of a mount.
pub(crate) struct DirCache {
    /// LRU of directory fds by (node id, layer): name resolution without
    /// walking from the layer root each time. Bounded by `cache_entries`.
    fds: Mutex<LruCache<(u64, LayerIdx), Arc<OwnedFd>>>,
    /// Names in a merged dir's lower layers (which never change), so a
    /// lookup over many layers probes only those that hold the name.
    listings: Mutex<NameCache>,
    /// The node last looked up under each (parent, name), one slot per
    /// hash of both, overwritten on collision: an unlink finds there the
    /// node the kernel holds for the name without probing the layers.
    recent: Box<[AtomicU64]>,
    hasher: RandomState,
}

impl DirCache {
    /// At most `fds` dir fds, listings of about `entries` * 4 names, and
    /// about `entries` recent names (8 bytes each).
    pub(crate) fn new(fds: usize, entries: usize) -> DirCache {
        let slots = entries.clamp(1024, 1 << 16).next_power_of_two();
        DirCache {
            fds: Mutex::new(LruCache::new(
                NonZeroUsize::new(fds).unwrap_or(NonZeroUsize::MIN),
            )),
            listings: Mutex::new(NameCache {
                lru: LruCache::unbounded(),
                weight: 0,
                // Names, not dirs: memory stays bounded however big the dirs.
                cap: entries.saturating_mul(4).max(1024),
            }),
            recent: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            hasher: RandomState::new(),
        }
    }

    fn recent_slot(&self, parent: u64, name: &OsStr) -> &AtomicU64 {
        let h = self.hasher.hash_one((parent, name.as_bytes()));
        &self.recent[h as usize & (self.recent.len() - 1)]
    }

    /// Dir fds and listed names held now.
    pub(crate) fn sizes(&self) -> (usize, usize) {
        (self.fds.lock().len(), self.listings.lock().weight)
    }
}

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

/// The entries of dir `dir` (an O_PATH fd will do).
fn list_dir(dir: BorrowedFd<'_>) -> Result<Vec<sys::RawDirent>> {
    let rd = sys::openat(dir, c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    sys::read_dir_all(&rd)
}

impl Overlay {
    /// The fd of directory `node` in `layer` (O_PATH). Walks up the parents,
    /// one `openat(O_NOFOLLOW)` per component, filling the cache.
    pub(crate) fn dir_fd(&self, node: &Arc<Inode>, layer: LayerIdx) -> Result<Arc<OwnedFd>> {
        if node.nodeid == ROOT {
            return Ok(self.layers.get(layer).root.clone());
        }
        if let Some(fd) = self.cached_dir_fd(node, layer) {
            return Ok(fd);
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
        self.cache.fds.lock().put((node.nodeid, layer), fd.clone());
        Ok(fd)
    }

    /// The fd of directory `node` in `layer` if the cache holds it.
    fn cached_dir_fd(&self, node: &Inode, layer: LayerIdx) -> Option<Arc<OwnedFd>> {
        self.cache.fds.lock().get(&(node.nodeid, layer)).cloned()
    }

    /// Notes that `node` was just looked up as `name` in `parent`.
    pub(crate) fn note_named(&self, parent: u64, name: &OsStr, node: u64) {
        self.cache.recent_slot(parent, name).store(node, Relaxed);
    }

    /// The node the kernel holds for `name` in `parent`, if it was looked
    /// up recently and is still named so.
    pub(crate) fn named_child(&self, parent: u64, name: &OsStr) -> Option<Arc<Inode>> {
        let id = self.cache.recent_slot(parent, name).load(Relaxed);
        let node = self.table.get(id)?;
        node.is_named_as(parent, name).then_some(node)
    }

    /// Drops cached fds and listings of a directory (after rmdir, rename or forget).
    pub(crate) fn forget_dir_fds(&self, nodeid: u64) {
        {
            let mut c = self.cache.fds.lock();
            for l in self.layers.indices() {
                c.pop(&(nodeid, l));
            }
        }
        self.cache.listings.lock().pop(nodeid);
    }

    /// What `node`'s listing says of `name`. Listings are kept for dirs
    /// merged from several lower layers, where they save most probes, and
    /// for a dir of one lower layer once its misses call for one
    /// (`note_miss`).
    pub(crate) fn holders(&self, node: &Arc<Inode>, layers: &[LayerIdx], name: &CStr) -> Holders {
        if !self.wants_listings(node, layers) {
            return Holders {
                dir: None,
                held: None,
                listed: Bits::default(),
            };
        }
        // Cached once a layer is listed (see `list_layer`).
        let cached = self.cache.listings.lock().lru.get(&node.nodeid).cloned();
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

    /// Whether lookups in `node`, a dir of `layers`, read the listings of
    /// its lower layers: always where several lower layers merge, and in
    /// one lower layer once misses there have cost about a listing.
    fn wants_listings(&self, node: &Inode, layers: &[LayerIdx]) -> bool {
        let lowers = layers.iter().filter(|&&l| !self.layers.is_upper(l)).count();
        match lowers {
            0 => false,
            1 => node.lower_misses.load(Relaxed) == LIST,
            _ => true,
        }
    }

    /// Keeps the entries of lower layer `l` of `node` (a dir of `layers`),
    /// just read for its merged listing, where its lookups would read the
    /// layer again: a readdirplus then looks its entries up with no
    /// second listing. A lower layer never changes under the mount.
    pub(crate) fn share_listing(
        &self,
        node: &Arc<Inode>,
        layers: &[LayerIdx],
        l: LayerIdx,
        entries: &[sys::RawDirent],
    ) {
        if self.layers.is_upper(l) || !self.wants_listings(node, layers) {
            return;
        }
        let cached = self.cache.listings.lock().lru.get(&node.nodeid).cloned();
        let dir = cached.unwrap_or_default();
        if dir.inner.read().listed.has(l) {
            return;
        }
        let names = entries.iter().map(|e| Box::from(e.name.as_os_str()));
        self.fill_listing(&dir, node, l, names);
    }

    /// Whether lower layer `l` of `node` may hold `name`: false only when
    /// its listing lacks the name. A layer not listed yet is listed now; one
    /// that cannot be read is probed.
    pub(crate) fn may_hold(
        &self,
        h: &mut Holders,
        node: &Arc<Inode>,
        l: LayerIdx,
        name: &CStr,
    ) -> bool {
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

    /// Counts a name that lower layer `l` of `node`, a dir of one lower
    /// layer not listed, turned out to lack. Listing the layer costs about
    /// a probe per 128 bytes of its size (some 6 entries), so it is listed
    /// once the probes spent in vain have cost that much (the rent-or-buy
    /// rule: at most twice the better choice's cost, whatever comes next).
    /// Dirs where names are looked up but not missed are never listed.
    pub(crate) fn note_miss(&self, node: &Inode, h: &Holders, l: LayerIdx, dir: BorrowedFd<'_>) {
        if h.dir.is_some() || self.layers.is_upper(l) {
            return;
        }
        let n = node.lower_misses.load(Relaxed);
        if n >= LIST - 1 {
            return;
        }
        let n = n + 1;
        node.lower_misses.store(n, Relaxed);
        // The size is read at 4, 8, 16... misses: a few fstats per dir.
        if n >= 4 && n.is_power_of_two() {
            if let Ok(st) = sys::fstat(dir) {
                if u64::from(n) * 128 >= st.st_size as u64 {
                    node.lower_misses.store(LIST, Relaxed);
                }
            }
        }
    }

    /// Whether dir `dir`, `node`'s in layer `l`, which lacks `name`, holds
    /// the `.wh.NAME` marker that hides it from the layers below. A lower
    /// one: the listing of several lowers says (it has `.wh.NAME` under
    /// NAME). The upper one: the node knows, once the dir is listed (at its
    /// first miss), whether it holds any marker, and rovl adds none. Only
    /// where markers may be is the marker probed.
    pub(crate) fn marked_in(
        &self,
        node: &Arc<Inode>,
        h: &Holders,
        l: LayerIdx,
        dir: BorrowedFd<'_>,
        name: &CStr,
    ) -> bool {
        if !self.layers.is_upper(l) {
            if h.listed.has(l) {
                return h.held.as_ref().is_some_and(|x| x.contains(l));
            }
            return has_marker(dir, name);
        }
        let known = node.state.read().upper_markers;
        let markers = match known {
            Markers::Unknown => {
                let Ok(names) = list_dir(dir) else {
                    return has_marker(dir, name);
                };
                let some = names.iter().any(|e| hidden_by(e.name.as_bytes()).is_some());
                let m = if some { Markers::Some } else { Markers::None };
                node.state.write().upper_markers = m;
                m
            }
            m => m,
        };
        markers == Markers::Some && has_marker(dir, name)
    }

    /// Adds lower layer `l` of `node` to its listing.
    fn list_layer(&self, dir: &Arc<DirNames>, node: &Arc<Inode>, l: LayerIdx) {
        let entries = self.dir_fd(node, l).and_then(|dfd| list_dir(dfd.as_fd()));
        let Ok(entries) = entries else {
            return;
        };
        let names = entries.into_iter().map(|e| e.name.into_boxed_os_str());
        self.fill_listing(dir, node, l, names);
    }

    /// Adds the entry names of lower layer `l` to `dir`, `node`'s listing.
    fn fill_listing(
        &self,
        dir: &Arc<DirNames>,
        node: &Arc<Inode>,
        l: LayerIdx,
        names: impl ExactSizeIterator<Item = Box<OsStr>>,
    ) {
        let added = names.len();
        {
            let mut g = dir.inner.write();
            if g.listed.has(l) {
                return;
            }
            for name in names {
                // A `.wh.NAME` marker: this layer may hide NAME (the probe tells).
                let name = match crate::whiteout::hidden_by(name.as_bytes()) {
                    Some(n) => OsStr::from_bytes(n).into(),
                    None => name,
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
        self.cache.listings.lock().grew(node.nodeid, dir, added);
    }

    /// The parent dir fd in `layer` and the name of a non-root node.
    pub(crate) fn entry_in(
        &self,
        node: &Arc<Inode>,
        layer: LayerIdx,
    ) -> Result<(Arc<OwnedFd>, CString)> {
        // A lower hard link's names read its index entry once there is one.
        if self.index.is_some() && !self.layers.is_upper(layer) && node.has_index() {
            if let Some(e) = self.index_dir_entry(node) {
                return Ok(e);
            }
        }
        // Its names went away since the kernel looked it up: see
        // `check_same`; a lower object is still at its held place.
        let Some((parent, name)) = node.alias() else {
            return node.held_place(layer).ok_or_else(|| sys::err(libc::ESTALE));
        };
        Ok((self.dir_fd(&parent, layer)?, sys::cstr(&name)?))
    }

    /// An O_PATH fd of the node's real object in its top layer.
    pub(crate) fn path_fd(&self, node: &Arc<Inode>) -> Result<OwnedFd> {
        let top = node.top().ok_or_else(|| sys::err(libc::ENOENT))?;
        self.path_fd_in(node, top)
    }

    pub(crate) fn path_fd_in(&self, node: &Arc<Inode>, layer: LayerIdx) -> Result<OwnedFd> {
        if node.nodeid == ROOT {
            return sys::openat(self.layers.get(layer).root.as_fd(), c".", libc::O_PATH, 0);
        }
        match self.entry_in(node, layer) {
            Ok((pfd, name)) => match sys::openat(pfd.as_fd(), &name, libc::O_PATH, 0) {
                Err(e) if e.raw() == libc::ENOENT => {
                    let (pfd, name) = self.next_alias(node, layer, e)?;
                    sys::openat(pfd.as_fd(), &name, libc::O_PATH, 0)
                }
                r => r,
            },
            Err(e) => Ok(node.held().ok_or(e)?.try_clone()?),
        }
    }

    /// When a node's first name is gone, its next name that is still
    /// there; the gone one is dropped. A name can go stale without a
    /// request on this node: another node for the same name (a lower hard
    /// link's per-name node) was renamed or unlinked.
    fn next_alias(
        &self,
        node: &Arc<Inode>,
        layer: LayerIdx,
        e: sys::Errno,
    ) -> Result<(Arc<OwnedFd>, CString)> {
        let mut aliases = node.all_aliases().into_iter();
        let Some((p0, n0)) = aliases.next() else {
            return Err(e);
        };
        for (p, n) in aliases {
            let Ok(pfd) = self.dir_fd(&p, layer) else {
                continue;
            };
            let c = sys::cstr(&n)?;
            if sys::fstatat(pfd.as_fd(), &c).is_ok() {
                node.remove_alias(p0.nodeid, &n0);
                return Ok((pfd, c));
            }
        }
        Err(e)
    }

    /// Real stat of the node's top layer object.
    pub(crate) fn real_stat(&self, node: &Arc<Inode>) -> Result<Stat> {
        let (top, key) = node.top_and_key();
        let top = top.ok_or_else(|| sys::err(libc::ENOENT))?;
        if node.nodeid == ROOT {
            return sys::fstat(self.layers.get(top).root.as_fd());
        }
        // A dir's cached fd is the dir itself: no walk of its name.
        if node.is_dir() {
            if let Some(fd) = self.cached_dir_fd(node, top) {
                return sys::fstat(fd.as_fd());
            }
        }
        let (pfd, name) = match self.entry_in(node, top) {
            Ok(e) => e,
            Err(e) => return sys::fstat(node.held().ok_or(e)?.as_fd()),
        };
        let st = match sys::fstatat(pfd.as_fd(), &name) {
            Err(e) if e.raw() == libc::ENOENT => {
                let (pfd, name) = self.next_alias(node, top, e)?;
                sys::fstatat(pfd.as_fd(), &name)?
            }
            r => r?,
        };
        self.check_same(node, &key, &st)?;
        Ok(st)
    }

    /// Whether `st`, found by the node's name, is still the object the node
    /// stands for. A concurrent rename or unlink can put another object, or
    /// a whiteout, under the name between two requests: the answer is then
    /// ESTALE, and the kernel looks the name up again (path calls retry
    /// once), as it does for any filesystem whose objects moved.
    pub(crate) fn check_same(&self, node: &Arc<Inode>, key: &Key, st: &Stat) -> Result<()> {
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
