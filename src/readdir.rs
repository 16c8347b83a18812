//! Merged directory listings (the kernel's `readdir.c`): entries of every
//! merged layer, top layer first, de-duplicated, with whiteouts hidden.
//! A listing is read once at opendir, so an open directory sees a snapshot.

use crate::error::Result;
use crate::inode::{Inode, Key};
use crate::overlay::{dtype_kind, Counted, Overlay, Ox};
use crate::sys;
use crate::whiteout::{hidden_by, is_wh_name};
use dashmap::DashMap;
use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

pub struct DirEntry {
    pub name: OsString,
    pub ino: u64,
    pub kind: fuser::FileType,
    /// The layer object's (device, inode number): the key of its node.
    pub real: (u64, u64),
}

impl Overlay {
    /// The merged listing of a directory, with `.` and `..` first. As the
    /// kernel, a directory of one layer is listed as it is (whiteouts show
    /// as character devices) unless `all_merged` asks for the merged view.
    pub fn read_merged(&self, node: &Arc<Inode>, all_merged: bool) -> Result<Vec<DirEntry>> {
        let layers = node.layers();
        let parent_ino = match node.alias() {
            Some((p, _)) => p.ino(),
            None => node.ino(),
        };
        let mut out = vec![
            DirEntry {
                name: ".".into(),
                ino: node.ino(),
                kind: fuser::FileType::Directory,
                real: (0, 0),
            },
            DirEntry {
                name: "..".into(),
                ino: parent_ino,
                kind: fuser::FileType::Directory,
                real: (0, 0),
            },
        ];
        let merged = layers.len() > 1;
        let hide_whiteouts = merged || all_merged;
        let mut seen: HashSet<OsString> = HashSet::new();
        // Names hidden by one layer's `.wh.` markers, from the layers below.
        let mut hidden: Vec<OsString> = Vec::new();
        for &l in &layers {
            let dfd = self.dir_fd(node, l)?;
            let rd = sys::openat(dfd.as_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
            let upper = self.layers.is_upper(l);
            // Only a dir marked `opaque=x` holds xattr whiteouts, as the kernel reads it.
            let xwhiteouts = hide_whiteouts && self.has_xwhiteouts(dfd.as_fd(), l);
            // Whether links of the shared whiteout can be told by number:
            // asked at the first device entry.
            let mut upper_fs = None;
            let entries = sys::read_dir_all(&rd)?;
            self.share_listing(node, &layers, l, &entries);
            for e in entries {
                if is_wh_name(e.name.as_bytes()) {
                    if let Some(n) = hidden_by(e.name.as_bytes()).filter(|_| merged) {
                        hidden.push(OsStr::from_bytes(n).to_os_string());
                    }
                    continue;
                }
                if merged && !seen.insert(e.name.clone()) {
                    continue;
                }
                let mut d_type = e.d_type;
                let maybe_xwhiteout = xwhiteouts && d_type == libc::DT_REG;
                if maybe_xwhiteout
                    || (hide_whiteouts && (d_type == libc::DT_CHR || d_type == libc::DT_UNKNOWN))
                {
                    if upper
                        && d_type == libc::DT_CHR
                        && *upper_fs.get_or_insert_with(|| self.on_upper_fs(dfd.as_fd()))
                        && self.is_shared_whiteout(&e)
                    {
                        continue;
                    }
                    let c = sys::cstr(&e.name)?;
                    match sys::fstatat(dfd.as_fd(), &c) {
                        Ok(st) if self.is_whiteout_at(dfd.as_fd(), &c, &st, l) => continue,
                        Ok(st) => d_type = mode_dtype(st.st_mode),
                        Err(_) => continue,
                    }
                }
                let dev = self.layers.get(l).dev;
                let ino = if upper {
                    self.copied_inos
                        .get(&e.ino)
                        .map(|v| *v)
                        .unwrap_or_else(|| self.xino(e.ino, dev))
                } else {
                    self.xino(e.ino, dev)
                };
                out.push(DirEntry {
                    name: e.name,
                    ino,
                    kind: dtype_kind(d_type),
                    real: (dev, e.ino),
                });
            }
            // A layer's markers hide names of the layers below it, not its own.
            seen.extend(hidden.drain(..));
        }
        if !merged && !all_merged && layers.first().is_some_and(|&l| self.layers.is_upper(l)) {
            self.drop_stale_impure(node, &out);
        }
        Ok(out)
    }

    /// As the kernel's impure-dir readdir: an upper dir marked impure whose
    /// entries no longer come from a lower layer loses the mark.
    fn drop_stale_impure(&self, node: &Arc<Inode>, entries: &[DirEntry]) {
        if self.read_only() {
            return;
        }
        let Ok(dfd) = self.dir_fd(node, crate::layer::UPPER) else {
            return;
        };
        let impure = self.xattr(Ox::Impure);
        if sys::getxattr(dfd.as_fd(), impure).is_err() {
            return;
        }
        let origin = self.xattr(Ox::Origin);
        let translated = entries.iter().skip(2).any(|e| {
            let Ok(c) = sys::cstr(&e.name) else {
                return true;
            };
            // A subdir keeps the mark when it merges lower dirs (through a
            // redirect), since its reported inode number is then theirs.
            if e.kind == fuser::FileType::Directory {
                return !matches!(self.find(node, &c), Ok(Some(f)) if f.layers.len() == 1);
            }
            match sys::openat(dfd.as_fd(), &c, libc::O_PATH, 0) {
                Ok(fd) => sys::getxattr(fd.as_fd(), origin).is_ok(),
                Err(_) => true,
            }
        });
        if !translated && sys::removexattr(dfd.as_fd(), impure).is_ok() {
            node.state.write().impure = false;
        }
    }

    /// Whether a merged directory holds nothing visible (rmdir's test).
    pub(crate) fn check_empty(&self, node: &Arc<Inode>) -> Result<()> {
        if self.read_merged(node, true)?.len() > 2 {
            return Err(sys::err(libc::ENOTEMPTY));
        }
        Ok(())
    }
}

fn mode_dtype(mode: u32) -> u8 {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => libc::DT_DIR,
        libc::S_IFLNK => libc::DT_LNK,
        libc::S_IFCHR => libc::DT_CHR,
        libc::S_IFBLK => libc::DT_BLK,
        libc::S_IFIFO => libc::DT_FIFO,
        libc::S_IFSOCK => libc::DT_SOCK,
        _ => libc::DT_REG,
    }
}

/// The open directories (FUSE dir handles).
#[derive(Default)]
pub struct DirHandles {
    map: DashMap<u64, Arc<DirHandle>>,
    next: AtomicU64,
}

/// An open directory. Its listing is read at the first readdir and kept, so
/// the handle sees a snapshot; a listing the kernel serves from its cache
/// costs nothing.
struct DirHandle {
    node: Arc<Inode>,
    entries: OnceLock<Arc<Vec<DirEntry>>>,
}

impl DirHandles {
    /// A handle for directory `node`.
    pub fn open(&self, node: Arc<Inode>) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let h = DirHandle {
            node,
            entries: OnceLock::new(),
        };
        self.map.insert(fh, Arc::new(h));
        fh
    }

    /// The listing of an open directory, read at its first readdir.
    pub fn listing(&self, ovl: &Overlay, fh: u64) -> Result<Arc<Vec<DirEntry>>> {
        let h = self
            .map
            .get(&fh)
            .map(|h| h.clone())
            .ok_or_else(|| sys::err(libc::EBADF))?;
        if let Some(e) = h.entries.get() {
            return Ok(e.clone());
        }
        let e = Arc::new(ovl.read_merged(&h.node, false)?);
        // The kernel sends one readdir at a time per open directory.
        let _ = h.entries.set(e.clone());
        Ok(e)
    }

    pub fn release(&self, fh: u64) {
        self.map.remove(&fh);
    }
}

/// One readdirplus entry: what to send, and the lookup it counts.
pub struct PlusEntry<'a> {
    pub attr: fuser::FileAttr,
    pub ttl: Duration,
    /// The entry's `d_ino`: the number the file reports, whatever its node id.
    pub d_ino: u64,
    counted: Option<Counted<'a>>,
}

impl PlusEntry<'_> {
    /// The entry went to the kernel, which now counts a lookup of it.
    pub fn sent(self) {
        if let Some(c) = self.counted {
            c.keep();
        }
    }
}

impl Overlay {
    /// Entry `i` of directory `dir`'s listing, as readdirplus sends it: a
    /// lookup reply for the name (dropped unsent, its count goes).
    pub(crate) fn plus_entry(&self, dir: u64, i: usize, e: &DirEntry) -> PlusEntry<'_> {
        let mut attr = self.attr_template();
        if i < 2 {
            // The kernel links neither "." nor "..": no lookup is counted.
            attr.ino = fuser::INodeNo(e.ino);
            return PlusEntry {
                attr,
                ttl: self.ttl,
                d_ino: e.ino,
                counted: None,
            };
        }
        // A name the kernel already holds the node of needs no lookup:
        // node id 0 links nothing and leaves its dentry and attributes as
        // they are (a second listing, as `rm -rf` makes, or `git status`
        // after its lstats).
        if let Some(node) = self.table.find_key(&Key::Real(e.real.0, e.real.1)) {
            if node.is_named_as(dir, &e.name) {
                attr.kind = e.kind;
                return PlusEntry {
                    attr,
                    ttl: Duration::ZERO,
                    d_ino: node.ino(),
                    counted: None,
                };
            }
        }
        match self.lookup(dir, &e.name) {
            Ok((node, st)) => {
                // As a lookup reply: the node id as `ino`, and no cached
                // attributes where the reported number differs.
                let (attr, ttl) = self.entry_attr(&node, &st);
                PlusEntry {
                    attr,
                    ttl,
                    d_ino: node.ino(),
                    counted: Some(node),
                }
            }
            Err(_) => {
                // Listed but not looked up (a whiteout in a one-layer dir):
                // node id 0 links nothing, and the next lookup finds
                // nothing, as on the kernel.
                attr.kind = e.kind;
                PlusEntry {
                    attr,
                    ttl: Duration::ZERO,
                    d_ino: e.ino,
                    counted: None,
                }
            }
        }
    }
}
