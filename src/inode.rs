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
use std::ffi::OsString;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

pub const ROOT: u64 = 1;

/// Synthetic inode numbers start here, above any real one.
const SYNTHETIC: u64 = 1 << 62;

/// How a node is found again by a later lookup.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum Key {
    /// The real inode (device, inode number) of the node's top layer.
    Real(u64, u64),
    /// A lower hard link that copy-up would split: one node per name.
    Name(u64, OsString),
    Root,
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
}

/// Mutable facts about a node, updated by lookups and by our own changes.
pub struct State {
    /// Names this node is known by, as (parent, name). Empty for the root and
    /// for unlinked nodes. Directories have at most one.
    pub aliases: Vec<(Arc<Inode>, OsString)>,
    /// Layers holding this object, top-down. For a directory, the layers
    /// merged into it; for anything else, exactly one.
    pub layers: Vec<LayerIdx>,
    pub key: Key,
    /// The upper dir is known to carry the impure xattr.
    pub impure: bool,
    /// How its lower layers are reached, for a renamed directory.
    pub redirect: Option<Redirect>,
    /// With index=on, a lower hard link's index entry name (hex of the
    /// lower file handle): its copy, once made, is shared by every name.
    pub index: Option<std::ffi::CString>,
    /// A metadata-only copy's data: the lower file (O_PATH) reads go to
    /// until a write copies the data up (metacopy=on).
    pub lowerdata: Option<Arc<std::os::fd::OwnedFd>>,
}

impl State {
    pub fn top(&self) -> Option<LayerIdx> {
        self.layers.first().copied()
    }
}

pub struct Inode {
    pub nodeid: u64,
    /// The inode number users see; it may differ from the node id.
    ino: AtomicU64,
    /// `S_IFMT` bits; the type of a node never changes.
    pub kind: u32,
    lookups: AtomicU64,
    pub state: RwLock<State>,
    /// Serializes copy-up of this node.
    pub copyup_lock: Mutex<()>,
    /// How the node's open files reach their data: the kernel keeps an
    /// inode either cached (data through us) or passthrough (one backing
    /// file for all its opens), never both at once.
    pub io: Mutex<IoMode>,
}

impl Inode {
    pub fn is_dir(&self) -> bool {
        self.kind == libc::S_IFDIR
    }

    /// The first known (parent, name), if any.
    pub fn alias(&self) -> Option<(Arc<Inode>, OsString)> {
        self.state.read().aliases.first().cloned()
    }

    pub fn layers(&self) -> Vec<LayerIdx> {
        self.state.read().layers.clone()
    }

    pub fn top(&self) -> Option<LayerIdx> {
        self.state.read().top()
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
        if !st
            .aliases
            .iter()
            .any(|(p, n)| p.nodeid == parent.nodeid && n == name)
        {
            if self.is_dir() {
                st.aliases.clear();
            }
            st.aliases.push((parent.clone(), name.clone()));
        }
    }

    pub fn remove_alias(&self, parent: u64, name: &OsString) {
        self.state
            .write()
            .aliases
            .retain(|(p, n)| !(p.nodeid == parent && n == name));
    }
}

pub struct InodeTable {
    nodes: DashMap<u64, Arc<Inode>>,
    keys: DashMap<Key, u64>,
    next: AtomicU64,
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
            lookups: AtomicU64::new(1),
            state: RwLock::new(State {
                aliases: Vec::new(),
                layers: root_layers,
                key: Key::Root,
                impure: false,
                redirect: None,
                index: None,
                lowerdata: None,
            }),
            copyup_lock: Mutex::new(()),
            io: Mutex::new(IoMode::default()),
        });
        t.nodes.insert(ROOT, root);
        t
    }

    pub fn get(&self, nodeid: u64) -> Option<Arc<Inode>> {
        self.nodes.get(&nodeid).map(|n| n.clone())
    }

    /// A node id no node has or will have: for a name the kernel must not
    /// keep (it gets no lookup count here, and its forget is ignored).
    pub fn unused_id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
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

    /// Counts one more kernel lookup of a live node; false if there is none.
    pub fn bump(&self, nodeid: u64) -> bool {
        match self.nodes.get(&nodeid) {
            Some(n) => {
                n.lookups.fetch_add(1, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// The node a key maps to, without counting a lookup.
    pub fn find_key(&self, key: &Key) -> Option<Arc<Inode>> {
        let id = *self.keys.get(key)?;
        self.get(id)
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
        // The key's shard lock orders us against forget() dropping the node.
        let node = match self.keys.entry(key.clone()) {
            Entry::Occupied(e) => {
                let id = *e.get();
                match self.nodes.get(&id).map(|n| n.clone()) {
                    Some(n) if n.kind == kind => {
                        n.lookups.fetch_add(1, Ordering::Relaxed);
                        {
                            let mut st = n.state.write();
                            st.layers = layers;
                        }
                        n
                    }
                    _ => {
                        let n = self.make(key, kind, layers, ino);
                        e.replace_entry(n.nodeid);
                        n
                    }
                }
            }
            Entry::Vacant(e) => {
                let n = self.make(key, kind, layers, ino);
                e.insert(n.nodeid);
                n
            }
        };
        if node.nodeid != ROOT {
            node.add_alias(parent, name);
        }
        node
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
                lookups: AtomicU64::new(1),
                state: RwLock::new(State {
                    aliases: Vec::new(),
                    layers: layers.clone(),
                    key: key.clone(),
                    impure: false,
                    redirect: None,
                    index: None,
                    lowerdata: None,
                }),
                copyup_lock: Mutex::new(()),
                io: Mutex::new(IoMode::default()),
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
        let old = {
            let mut st = node.state.write();
            std::mem::replace(&mut st.key, new.clone())
        };
        self.keys.remove_if(&old, |_, id| *id == node.nodeid);
        self.keys.insert(new, node.nodeid);
    }

    /// Forgets the key of a node whose name went away, so a new file that
    /// reuses the real inode number gets a new node.
    pub fn unkey(&self, node: &Arc<Inode>) {
        let key = node.state.read().key.clone();
        self.keys.remove_if(&key, |_, id| *id == node.nodeid);
    }
}
