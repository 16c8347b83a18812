//! The inode table: FUSE node ids, lookup counts, and what each node is made of.
//!
//! Each node reports the kernel overlay's inode number (the lower inode for
//! lower and copied-up files, the upper inode for pure upper ones). fuser
//! sends the `ino` of an entry reply as its FUSE node id, so a node's id is
//! that number when it is free, and a synthetic one otherwise (two names of
//! a lower hard link, a reused number); such a node's entries carry no
//! cached attributes, and GETATTR reports the real number. Nodes are found
//! again by a key (the real inode of their top layer), so hard links share
//! one node.

use crate::layer::LayerIdx;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use parking_lot::{Mutex, RwLock};
use std::ffi::{OsStr, OsString};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

pub const ROOT: u64 = 1;

/// Synthetic inode numbers start here, above any real one.
const SYNTHETIC: u64 = 1 << 62;

/// How a node is found again by a later lookup.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum Key {
    /// The real inode (device, inode number) of the node's top layer.
    Real(u64, u64),
    /// A lower hard link that copy-up would split: one node per name
    /// (parent node id, name). Boxed: rare, and it would double every key.
    Name(Box<(u64, OsString)>),
    Root,
}

/// A name of a node: its parent and the name in it.
pub type Alias = (Arc<Inode>, Box<OsStr>);

fn is_alias(a: &Alias, parent: u64, name: &OsStr) -> bool {
    a.0.nodeid == parent && *a.1 == *name
}

fn owned(a: &Alias) -> (Arc<Inode>, OsString) {
    (a.0.clone(), a.1.to_os_string())
}

/// The layers of a node: one for all but merged dirs, kept without a heap
/// allocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayerList {
    One(LayerIdx),
    Many(Box<[LayerIdx]>),
}

impl LayerList {
    pub fn from_vec(v: Vec<LayerIdx>) -> LayerList {
        match v.as_slice() {
            [one] => LayerList::One(*one),
            _ => LayerList::Many(v.into_boxed_slice()),
        }
    }

    pub fn as_slice(&self) -> &[LayerIdx] {
        match self {
            LayerList::One(l) => std::slice::from_ref(l),
            LayerList::Many(v) => v,
        }
    }

    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    pub fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }
}

/// Where a directory's lower layers hold it when it was renamed
/// (`redirect_dir`): a name in its parent's lower dirs, or a path from the
/// lower layer roots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Redirect {
    Rel(OsString),
    Abs(Vec<OsString>),
}

impl Redirect {
    /// Parses an xattr value as the kernel writes it; None if malformed.
    pub fn parse(v: &[u8]) -> Option<Redirect> {
        use std::os::unix::ffi::OsStrExt;
        let bad = |c: &[u8]| c.is_empty() || c == b"." || c == b".." || c.contains(&0);
        if let Some(rest) = v.strip_prefix(b"/") {
            let parts: Vec<&[u8]> = rest.split(|&b| b == b'/').collect();
            if parts.iter().any(|c| bad(c)) {
                return None;
            }
            let comps = parts
                .into_iter()
                .map(|c| std::ffi::OsStr::from_bytes(c).to_os_string())
                .collect();
            Some(Redirect::Abs(comps))
        } else if bad(v) || v.contains(&b'/') {
            None
        } else {
            Some(Redirect::Rel(std::ffi::OsStr::from_bytes(v).to_os_string()))
        }
    }

    /// The xattr value.
    pub fn encode(&self) -> Vec<u8> {
        use std::os::unix::ffi::OsStrExt;
        match self {
            Redirect::Rel(n) => n.as_bytes().to_vec(),
            Redirect::Abs(c) => {
                let mut v = Vec::new();
                for x in c {
                    v.push(b'/');
                    v.extend_from_slice(x.as_bytes());
                }
                v
            }
        }
    }
}

/// Open files of a node by data path.
#[derive(Default)]
pub struct IoMode {
    /// Open handles whose data goes through the daemon and the page cache.
    pub cached: usize,
    /// The passthrough backing file shared by the other open handles.
    pub backing: Option<Weak<fuser::BackingId>>,
    /// That backing file is a lower file (`passthrough=all`).
    pub lower: bool,
    /// A lower backing file stays registered after its last close, until
    /// the kernel forgets the node: opening the file again costs no
    /// registration (two ioctls). Lower files never change, and the kernel
    /// binds an inode to a backing file only while a file is open.
    pub kept: Option<Arc<fuser::BackingId>>,
}

impl IoMode {
    /// Open handles sharing the backing file.
    pub fn backing_users(&self) -> usize {
        let refs = self.backing.as_ref().map_or(0, Weak::strong_count);
        refs.saturating_sub(usize::from(self.kept.is_some()))
    }

    /// Open read-only files read a lower file in the kernel: a write must
    /// not share their backing.
    pub fn lower_backed(&self) -> bool {
        self.lower && self.backing_users() > 0
    }

    /// Forgets a lower backing file that no open file uses.
    pub fn drop_kept(&mut self) {
        // Closed (BACKING_CLOSE) here unless an open file still shares it.
        drop(self.kept.take());
        if self.backing_users() == 0 {
            self.backing = None;
            self.lower = false;
        }
    }

    /// No open file and no kept backing: nothing to keep.
    fn idle(&self) -> bool {
        self.cached == 0
            && self.kept.is_none()
            && self.backing.as_ref().is_none_or(|w| w.strong_count() == 0)
    }
}

/// Whether a node's upper dir holds `.wh.NAME` markers (only other tools
/// write them; rovl never adds one: see `whiteout`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Markers {
    /// Not known yet: the dir is listed at its first miss (`marked_in`).
    #[default]
    Unknown,
    /// None: rovl made the dir, or a listing found none.
    None,
    /// Some: a missing name is probed for its marker.
    Some,
}

/// Mutable facts about a node, updated by lookups and by our own changes.
pub struct State {
    /// The first name this node is known by. None for the root and for
    /// unlinked nodes; more names (hard links) are in `extra`.
    /// Directories have at most one.
    alias: Option<Alias>,
    /// Layers holding this object, top-down. For a directory, the layers
    /// merged into it; for anything else, exactly one.
    pub layers: LayerList,
    pub key: Key,
    /// The key no longer finds this node (its name went away).
    unkeyed: bool,
    /// The upper dir is known to carry the impure xattr.
    pub impure: bool,
    /// What is known of `.wh.` markers in the upper dir (see `marked_in`).
    pub upper_markers: Markers,
    /// Whether the dir has a default ACL, once a create asked (`masked`);
    /// a change of its xattrs or layers forgets it.
    pub default_acl: Option<bool>,
    /// What is known of the object's xattrs without asking its layer.
    pub xattrs: Xattrs,
    /// What few nodes have, boxed so that the others stay small.
    extra: Option<Box<Extra>>,
}

/// What a node knows of its object's xattrs. The kernel asks for
/// `security.capability` before the first write and at each chown of a
/// file, and at each exec, and never caches the answer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Xattrs {
    Unknown,
    /// Made by this mount and given no xattr since: no capability.
    NoCaps,
    /// A lower object that lists none (lower layers never change).
    None,
}

/// The rarely set parts of a node's state.
#[derive(Default)]
struct Extra {
    /// How its lower layers are reached, for a renamed directory (or a
    /// moved metadata-only copy).
    redirect: Option<Redirect>,
    /// With index=on, a lower hard link's index entry name (hex of the
    /// lower file handle): its copy, once made, is shared by every name.
    index: Option<std::ffi::CString>,
    /// A metadata-only copy's data: the lower file (O_PATH) reads go to
    /// until a write copies the data up (metacopy=on).
    lowerdata: Option<Arc<std::os::fd::OwnedFd>>,
    /// How requests reach a non-directory whose last name went away
    /// (unlinked or renamed over) while the kernel still holds the node,
    /// until FORGET, as the kernel's overlay keeps using its dentry.
    held: Option<Held>,
    /// How its open files reach their data: the kernel keeps an inode
    /// either cached (data through us) or passthrough (one backing file
    /// for all its opens), never both at once.
    io: IoMode,
    /// Names after the first, for hard links.
    more_aliases: Vec<Alias>,
}

/// See `Extra::held`.
pub enum Held {
    /// The object itself (O_PATH): an upper one, whose name is gone.
    Object(Arc<std::os::fd::OwnedFd>),
    /// Where a lower object still is: lower layers never change, so its
    /// place (the layer, its dir there, its name) outlives the merged name
    /// and costs no system call to keep.
    Place(LayerIdx, Arc<std::os::fd::OwnedFd>, std::ffi::CString),
}

impl State {
    fn extra_mut(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Box::default)
    }

    /// Drops the box once nothing is left in it.
    fn trim(&mut self) {
        if self.extra.as_ref().is_some_and(|e| {
            e.redirect.is_none()
                && e.index.is_none()
                && e.lowerdata.is_none()
                && e.held.is_none()
                && e.io.idle()
                && e.more_aliases.is_empty()
        }) {
            self.extra = None;
        }
    }
}

impl State {
    pub fn top(&self) -> Option<LayerIdx> {
        self.layers.as_slice().first().copied()
    }

    fn more_aliases(&self) -> &[Alias] {
        self.extra.as_ref().map_or(&[], |e| &e.more_aliases)
    }

    fn has_alias(&self, parent: u64, name: &OsStr) -> bool {
        let mut all = self.alias.iter().chain(self.more_aliases());
        all.any(|a| is_alias(a, parent, name))
    }

    fn push_alias(&mut self, a: Alias) {
        match self.alias {
            None => self.alias = Some(a),
            Some(_) => self.extra_mut().more_aliases.push(a),
        }
    }

    /// Drops a name; the next one, if any, becomes the first.
    fn remove_alias(&mut self, parent: u64, name: &OsStr) {
        if let Some(e) = self.extra.as_mut() {
            e.more_aliases.retain(|a| !is_alias(a, parent, name));
        }
        if self
            .alias
            .as_ref()
            .is_some_and(|a| is_alias(a, parent, name))
        {
            self.alias = match self.extra.as_mut() {
                Some(e) if !e.more_aliases.is_empty() => Some(e.more_aliases.remove(0)),
                _ => None,
            };
        }
        self.trim();
    }

    fn clear_aliases(&mut self) {
        self.alias = None;
        if let Some(e) = self.extra.as_mut() {
            e.more_aliases.clear();
        }
        self.trim();
    }
}

/// A node: 120 bytes, so that with its `Arc` counts it takes a 144-byte
/// allocation (what little most nodes lack is in `State::extra`).
pub struct Inode {
    pub nodeid: u64,
    /// The inode number users see; it may differ from the node id.
    ino: AtomicU64,
    /// `S_IFMT` bits; the type of a node never changes.
    pub kind: u32,
    /// Names looked up in vain in its one lower layer, while that layer is
    /// not listed (`resolve::note_miss`); `LIST` once it should be.
    pub lower_misses: AtomicU16,
    lookups: AtomicU64,
    pub state: RwLock<State>,
    /// Serializes copy-up of this node.
    pub copyup_lock: Mutex<()>,
}

impl Inode {
    pub fn is_dir(&self) -> bool {
        self.kind == libc::S_IFDIR
    }

    /// The first known (parent, name), if any.
    pub fn alias(&self) -> Option<(Arc<Inode>, OsString)> {
        self.state.read().alias.as_ref().map(owned)
    }

    /// Whether `name` in dir `parent` is one of the node's names.
    pub fn is_named_as(&self, parent: u64, name: &OsStr) -> bool {
        self.state.read().has_alias(parent, name)
    }

    /// Whether the node has a name left.
    pub fn is_named(&self) -> bool {
        self.state.read().alias.is_some()
    }

    /// Every known (parent, name), the first one first.
    pub fn all_aliases(&self) -> Vec<(Arc<Inode>, OsString)> {
        let st = self.state.read();
        st.alias
            .iter()
            .chain(st.more_aliases())
            .map(owned)
            .collect()
    }

    pub fn layers(&self) -> Vec<LayerIdx> {
        self.state.read().layers.as_slice().to_vec()
    }

    pub fn top(&self) -> Option<LayerIdx> {
        self.state.read().top()
    }

    /// The top layer and the key, read together: what the node stands
    /// for, consistent even while a copy-up moves it to the upper layer.
    pub fn top_and_key(&self) -> (Option<LayerIdx>, Key) {
        let s = self.state.read();
        (s.top(), s.key.clone())
    }

    pub fn redirect(&self) -> Option<Redirect> {
        self.state.read().extra.as_ref()?.redirect.clone()
    }

    pub fn set_redirect(&self, r: Option<Redirect>) {
        let mut st = self.state.write();
        st.extra_mut().redirect = r;
        st.trim();
    }

    pub fn index_name(&self) -> Option<std::ffi::CString> {
        self.state.read().extra.as_ref()?.index.clone()
    }

    pub fn has_index(&self) -> bool {
        self.state
            .read()
            .extra
            .as_ref()
            .is_some_and(|e| e.index.is_some())
    }

    pub fn set_index(&self, name: Option<std::ffi::CString>) {
        let mut st = self.state.write();
        st.extra_mut().index = name;
        st.trim();
    }

    pub fn lowerdata(&self) -> Option<Arc<std::os::fd::OwnedFd>> {
        self.state.read().extra.as_ref()?.lowerdata.clone()
    }

    pub fn has_lowerdata(&self) -> bool {
        self.state
            .read()
            .extra
            .as_ref()
            .is_some_and(|e| e.lowerdata.is_some())
    }

    /// The held object (see `Extra::held`).
    pub fn held(&self) -> Option<Arc<std::os::fd::OwnedFd>> {
        match self.state.read().extra.as_ref()?.held.as_ref()? {
            Held::Object(fd) => Some(fd.clone()),
            Held::Place(..) => None,
        }
    }

    /// The held place in `layer` (see `Extra::held`).
    pub fn held_place(
        &self,
        layer: LayerIdx,
    ) -> Option<(Arc<std::os::fd::OwnedFd>, std::ffi::CString)> {
        match self.state.read().extra.as_ref()?.held.as_ref()? {
            Held::Place(l, dir, name) if *l == layer => Some((dir.clone(), name.clone())),
            _ => None,
        }
    }

    pub fn set_held(&self, held: Option<Held>) {
        let mut st = self.state.write();
        st.extra_mut().held = held;
        st.trim();
    }

    pub fn set_lowerdata(&self, fd: Option<Arc<std::os::fd::OwnedFd>>) {
        let mut st = self.state.write();
        st.extra_mut().lowerdata = fd;
        st.trim();
    }

    /// Runs `f` on how the node's open files reach their data, under the
    /// node's lock. `f` must not touch the node's state.
    pub fn with_io<R>(&self, f: impl FnOnce(&mut IoMode) -> R) -> R {
        let mut st = self.state.write();
        let r = f(&mut st.extra_mut().io);
        st.trim();
        r
    }

    /// See `IoMode::lower_backed`.
    pub fn lower_backed(&self) -> bool {
        let st = self.state.read();
        st.extra.as_ref().is_some_and(|e| e.io.lower_backed())
    }

    /// The inode number reported to users.
    pub fn ino(&self) -> u64 {
        self.ino.load(Ordering::Relaxed)
    }

    /// Changes the reported number (a split hard link's copy-up).
    pub fn set_ino(&self, ino: u64) {
        self.ino.store(ino, Ordering::Relaxed);
    }

    /// Whether entry replies (which carry the node id as `ino`) show the
    /// reported number.
    pub fn ino_is_id(&self) -> bool {
        self.ino() == self.nodeid
    }

    pub fn add_alias(&self, parent: &Arc<Inode>, name: &OsString) {
        let mut st = self.state.write();
        if !st.has_alias(parent.nodeid, name) {
            if self.is_dir() {
                st.clear_aliases();
            }
            st.push_alias((parent.clone(), name.as_os_str().into()));
        }
    }

    pub fn remove_alias(&self, parent: u64, name: &OsString) {
        self.state.write().remove_alias(parent, name);
    }

    /// Leaves every name: the node lives on for its open files only.
    pub fn clear_aliases(&self) {
        self.state.write().clear_aliases();
    }
}

/// Nodes by id, and the way back from a key to a node.
///
/// A node whose id is its key's inode number (most of them: one layer
/// filesystem, no reused number) is found at that id in `nodes`; `keys`
/// holds only the others, so the common node costs one map entry.
pub struct InodeTable {
    nodes: DashMap<u64, Arc<Inode>>,
    /// Keys of nodes away from their home id. A key's shard lock here
    /// also orders a lookup of it against `forget`, whether or not the
    /// key has an entry.
    keys: DashMap<Key, u64>,
    next: AtomicU64,
}

/// The id a node of this key takes when the number is free.
fn home(key: &Key) -> Option<u64> {
    match key {
        Key::Real(_, ino) => Some(*ino),
        _ => None,
    }
}

impl InodeTable {
    pub fn new(root_layers: Vec<LayerIdx>) -> InodeTable {
        let t = InodeTable {
            nodes: DashMap::new(),
            keys: DashMap::new(),
            next: AtomicU64::new(SYNTHETIC),
        };
        let root = Arc::new(Inode {
            nodeid: ROOT,
            ino: AtomicU64::new(ROOT),
            kind: libc::S_IFDIR,
            // The kernel never forgets the root.
            lower_misses: AtomicU16::new(0),
            lookups: AtomicU64::new(1),
            state: RwLock::new(State {
                alias: None,
                layers: LayerList::from_vec(root_layers),
                key: Key::Root,
                unkeyed: false,
                impure: false,
                upper_markers: Markers::Unknown,
                default_acl: None,
                xattrs: Xattrs::Unknown,
                extra: None,
            }),
            copyup_lock: Mutex::new(()),
        });
        t.nodes.insert(ROOT, root);
        t
    }

    pub fn get(&self, nodeid: u64) -> Option<Arc<Inode>> {
        self.nodes.get(&nodeid).map(|n| n.clone())
    }

    /// Gives back the maps' memory once most nodes are gone: a hash map
    /// keeps the capacity of its largest size, which after a walk of a
    /// million files is most of the daemon's memory.
    pub fn shrink(&self) {
        if self.nodes.len() * 4 < self.nodes.capacity() {
            self.nodes.shrink_to_fit();
        }
        if self.keys.len() * 4 < self.keys.capacity() {
            self.keys.shrink_to_fit();
        }
    }

    /// The node a key maps to, without counting a lookup.
    pub fn find_key(&self, key: &Key) -> Option<Arc<Inode>> {
        match self.keys.get(key) {
            Some(id) => self.get(*id),
            None => self.at_home(key),
        }
    }

    /// The node at the key's home id, if it stands for this key.
    fn at_home(&self, key: &Key) -> Option<Arc<Inode>> {
        let n = self.get(home(key)?)?;
        let st = n.state.read();
        let here = st.key == *key && !st.unkeyed;
        drop(st);
        here.then_some(n)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Finds the node for `key` or makes one, and counts one kernel lookup.
    /// `fresh` gives (kind, layers, ino) for a new node, and refreshes the
    /// layers of an existing one.
    pub fn lookup(
        &self,
        key: Key,
        kind: u32,
        layers: Vec<LayerIdx>,
        ino: u64,
        parent: &Arc<Inode>,
        name: &OsString,
    ) -> Arc<Inode> {
        let node = self.keyed(key, kind, layers, ino);
        if node.nodeid != ROOT {
            node.add_alias(parent, name);
        }
        node
    }

    /// A node with no name yet (an O_TMPFILE file), counted once.
    pub fn unnamed(&self, key: Key, kind: u32, layers: Vec<LayerIdx>, ino: u64) -> Arc<Inode> {
        self.keyed(key, kind, layers, ino)
    }

    fn keyed(&self, key: Key, kind: u32, layers: Vec<LayerIdx>, ino: u64) -> Arc<Inode> {
        // The key's shard lock orders us against forget() dropping the node.
        let entry = self.keys.entry(key.clone());
        let found = match &entry {
            Entry::Occupied(e) => self.get(*e.get()),
            Entry::Vacant(_) => self.at_home(&key),
        };
        if let Some(n) = found.filter(|n| n.kind == kind) {
            n.lookups.fetch_add(1, Ordering::Relaxed);
            n.state.write().layers = LayerList::from_vec(layers);
            return n;
        }
        let at_home = home(&key);
        let n = self.make(key, kind, layers, ino);
        match entry {
            Entry::Occupied(e) if at_home == Some(n.nodeid) => {
                e.remove();
            }
            Entry::Occupied(e) => {
                e.replace_entry(n.nodeid);
            }
            Entry::Vacant(_) if at_home == Some(n.nodeid) => {}
            Entry::Vacant(e) => {
                e.insert(n.nodeid);
            }
        }
        n
    }

    fn make(&self, key: Key, kind: u32, layers: Vec<LayerIdx>, ino: u64) -> Arc<Inode> {
        let mut nodeid = ino;
        let n = loop {
            if nodeid <= ROOT || nodeid >= SYNTHETIC {
                nodeid = self.next.fetch_add(1, Ordering::Relaxed);
            }
            let n = Arc::new(Inode {
                nodeid,
                ino: AtomicU64::new(if ino == 0 { nodeid } else { ino }),
                kind,
                lower_misses: AtomicU16::new(0),
                lookups: AtomicU64::new(1),
                state: RwLock::new(State {
                    alias: None,
                    layers: LayerList::from_vec(layers.clone()),
                    key: key.clone(),
                    unkeyed: false,
                    impure: false,
                    upper_markers: Markers::Unknown,
                    default_acl: None,
                    xattrs: Xattrs::Unknown,
                    extra: None,
                }),
                copyup_lock: Mutex::new(()),
            });
            // The number may belong to a live node (a reused inode number,
            // or a split hard link): then take a synthetic one.
            match self.nodes.entry(nodeid) {
                Entry::Vacant(v) => {
                    v.insert(n.clone());
                    break n;
                }
                Entry::Occupied(_) => nodeid = SYNTHETIC,
            }
        };
        n
    }

    /// Drops `n` kernel references; frees the node when none remain and
    /// returns it, so its caches can go too.
    pub fn forget(&self, nodeid: u64, n: u64) -> Option<Arc<Inode>> {
        if nodeid == ROOT {
            return None;
        }
        let node = self.get(nodeid)?;
        // Saturating: a readdirplus entry may have linked a name to this id
        // before the node existed, and its forget counts that too.
        let prev = node
            .lookups
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                Some(c.saturating_sub(n))
            })
            .unwrap_or(0);
        if prev > n {
            return None;
        }
        let key = node.state.read().key.clone();
        // Decide under the key's shard lock: a lookup may have revived it.
        let freed = match self.keys.entry(key) {
            Entry::Occupied(e) if *e.get() == nodeid => {
                let gone = node.lookups.load(Ordering::Acquire) == 0;
                if gone {
                    e.remove();
                    self.nodes.remove(&nodeid);
                }
                gone
            }
            _ => {
                let gone = node.lookups.load(Ordering::Acquire) == 0;
                if gone {
                    self.nodes.remove(&nodeid);
                }
                gone
            }
        };
        freed.then_some(node)
    }

    /// Moves a node to a new key (after copy-up changes its top layer).
    pub fn rekey(&self, node: &Arc<Inode>, new: Key) {
        self.rekey_with(node, new, |_| {});
    }

    /// `rekey`, with `f` changing the node's state under the same lock, so
    /// no reader sees the new layers with the old key.
    pub fn rekey_with(&self, node: &Arc<Inode>, new: Key, f: impl FnOnce(&mut State)) {
        let old = {
            let mut st = node.state.write();
            f(&mut st);
            st.unkeyed = false;
            std::mem::replace(&mut st.key, new.clone())
        };
        self.keys.remove_if(&old, |_, id| *id == node.nodeid);
        if home(&new) == Some(node.nodeid) {
            self.keys.remove(&new);
        } else {
            self.keys.insert(new, node.nodeid);
        }
    }

    /// Forgets the key of a node whose name went away, so a new file that
    /// reuses the real inode number gets a new node.
    pub fn unkey(&self, node: &Arc<Inode>) {
        let key = {
            let mut st = node.state.write();
            st.unkeyed = true;
            st.key.clone()
        };
        self.keys.remove_if(&key, |_, id| *id == node.nodeid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> (InodeTable, Arc<Inode>) {
        let t = InodeTable::new(vec![0]);
        let root = t.get(ROOT).unwrap();
        (t, root)
    }

    fn file(t: &InodeTable, root: &Arc<Inode>, key: Key, ino: u64, name: &str) -> Arc<Inode> {
        t.lookup(key, libc::S_IFREG, vec![0], ino, root, &name.into())
    }

    #[test]
    fn keys_map_holds_only_nodes_away_from_home() {
        let (t, root) = table();
        let a = file(&t, &root, Key::Real(1, 100), 100, "a");
        assert_eq!(a.nodeid, 100);
        assert_eq!(
            t.keys.len(),
            0,
            "a node at its inode number needs no key entry"
        );
        // The same number on another device: a synthetic id, found by its key.
        let b = file(&t, &root, Key::Real(2, 100), 100, "b");
        assert!(b.nodeid >= SYNTHETIC);
        assert_eq!(t.keys.len(), 1);
        assert!(Arc::ptr_eq(&t.find_key(&Key::Real(1, 100)).unwrap(), &a));
        assert!(Arc::ptr_eq(&t.find_key(&Key::Real(2, 100)).unwrap(), &b));
        // A second lookup counts on the same node.
        let a2 = file(&t, &root, Key::Real(1, 100), 100, "a");
        assert!(Arc::ptr_eq(&a, &a2));
        assert!(t.forget(100, 1).is_none());
        assert!(t.forget(100, 1).is_some());
        assert!(t.find_key(&Key::Real(1, 100)).is_none());
        assert!(t.forget(b.nodeid, 1).is_some());
        assert_eq!((t.len(), t.keys.len()), (1, 0));
    }

    #[test]
    fn an_unkeyed_node_is_not_found_again() {
        let (t, root) = table();
        let a = file(&t, &root, Key::Real(1, 7), 7, "a");
        t.unkey(&a);
        assert!(t.find_key(&Key::Real(1, 7)).is_none());
        // A new file reusing the number gets its own node while `a` lives.
        let n = file(&t, &root, Key::Real(1, 7), 7, "n");
        assert!(!Arc::ptr_eq(&a, &n));
        assert!(Arc::ptr_eq(&t.find_key(&Key::Real(1, 7)).unwrap(), &n));
        assert!(t.forget(7, 1).is_some());
        assert!(Arc::ptr_eq(&t.find_key(&Key::Real(1, 7)).unwrap(), &n));
    }

    #[test]
    fn rekey_moves_a_node_away_from_home_and_back() {
        let (t, root) = table();
        let a = file(&t, &root, Key::Real(1, 5), 5, "a");
        // Copy-up: the upper inode keys it, the lower number stays its id.
        t.rekey(&a, Key::Real(3, 9));
        assert!(t.find_key(&Key::Real(1, 5)).is_none());
        assert!(Arc::ptr_eq(&t.find_key(&Key::Real(3, 9)).unwrap(), &a));
        assert_eq!(t.keys.len(), 1);
        t.rekey(&a, Key::Real(1, 5));
        assert_eq!(t.keys.len(), 0);
        assert!(Arc::ptr_eq(&t.find_key(&Key::Real(1, 5)).unwrap(), &a));
    }

    #[test]
    fn names_after_the_first_live_in_the_rare_state() {
        let (t, root) = table();
        let a = file(&t, &root, Key::Real(1, 5), 5, "a");
        let b = file(&t, &root, Key::Real(1, 5), 5, "b");
        assert!(Arc::ptr_eq(&a, &b));
        let names =
            |n: &Inode| -> Vec<OsString> { n.all_aliases().into_iter().map(|(_, n)| n).collect() };
        assert_eq!(names(&a), ["a", "b"]);
        a.remove_alias(ROOT, &"a".into());
        assert_eq!(names(&a), ["b"]);
        assert!(a.state.read().extra.is_none(), "an emptied box is dropped");
        a.remove_alias(ROOT, &"b".into());
        assert!(!a.is_named());
    }

    #[test]
    fn the_box_goes_when_no_file_is_open() {
        let (t, root) = table();
        let a = file(&t, &root, Key::Real(1, 5), 5, "a");
        a.with_io(|io| io.cached = 1);
        assert!(a.state.read().extra.is_some());
        // A backing no handle holds any more is no reason to keep it.
        a.with_io(|io| {
            io.cached = 0;
            io.backing = Some(std::sync::Weak::new());
        });
        assert!(a.state.read().extra.is_none());
    }

    #[test]
    fn a_node_takes_a_144_byte_allocation() {
        // The Arc's two counts and the node; malloc rounds 136 to 144.
        assert!(
            std::mem::size_of::<Inode>() <= 120,
            "{}",
            std::mem::size_of::<Inode>()
        );
    }
}
