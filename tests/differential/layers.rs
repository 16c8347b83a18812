//! Seeded layer trees: a pure description (`TreeSpec`) materialized twice,
//! byte for byte and with the same metadata, into two layer sets.

use super::rng::Rng;
use super::sys;
use std::collections::BTreeMap;
use std::path::Path;

/// Names are drawn from a small alphabet so layers overlap a lot.
const NAMES: &[&str] = &["a", "b", "c", "d", "e", "f"];
/// Absolute symlink targets never resolve (and have no existing parent, so
/// O_CREAT through them cannot create anything outside the mount).
pub const ABS_TARGET_PREFIX: &str = "/nonexistent-rovl-diff";

#[derive(Clone, Debug)]
pub enum Kind {
    Dir {
        opaque: bool,
    },
    File(Vec<u8>),
    Symlink(String),
    Fifo,
    Whiteout,
    /// Hard link to another entry of the same layer.
    HardLink(String),
}

#[derive(Clone, Debug)]
pub struct Meta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, i64),
    pub xattrs: Vec<(String, Vec<u8>)>,
}

#[derive(Clone, Debug)]
pub struct Entry {
    pub kind: Kind,
    pub meta: Meta,
}

#[derive(Clone, Debug)]
pub struct LayerSpec {
    pub root_mtime: (i64, i64),
    pub root_xattrs: Vec<(String, Vec<u8>)>,
    pub entries: BTreeMap<String, Entry>,
}

/// `lowers[0]` is materialized into `Layers::lowers[0]`; the same mapping is
/// used for both copies, so the stacking order cannot differ between them.
#[derive(Clone, Debug)]
pub struct TreeSpec {
    pub lowers: Vec<LayerSpec>,
    pub upper: LayerSpec,
}

impl TreeSpec {
    /// Every path of every layer (present, whited out or shadowed), sorted.
    pub fn all_paths(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .lowers
            .iter()
            .chain(std::iter::once(&self.upper))
            .flat_map(|l| l.entries.keys().cloned())
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

pub fn random_mtime(rng: &mut Rng) -> (i64, i64) {
    // 2001..2020: far from "now", so times the filesystem sets are told apart.
    (
        rng.range(1_000_000_000, 1_600_000_000) as i64,
        rng.below(1_000_000_000) as i64,
    )
}

pub fn random_owner(rng: &mut Rng) -> (u32, u32) {
    *rng.pick(&[
        (0, 0),
        (0, 0),
        (0, 0),
        (1000, 1000),
        (2000, 2000),
        (1000, 2000),
        (0, 2000),
    ])
}

pub fn random_file_mode(rng: &mut Rng) -> u32 {
    *rng.pick(&[
        0o644, 0o644, 0o600, 0o755, 0o000, 0o777, 0o4755, 0o2755, 0o6755, 0o1644, 0o444, 0o640,
    ])
}

pub fn random_dir_mode(rng: &mut Rng) -> u32 {
    *rng.pick(&[
        0o755, 0o755, 0o700, 0o777, 0o1777, 0o2775, 0o555, 0o000, 0o711,
    ])
}

fn random_path(rng: &mut Rng) -> String {
    let depth = 1 + rng.weighted(&[4, 4, 2]);
    (0..depth)
        .map(|_| *rng.pick(NAMES))
        .collect::<Vec<_>>()
        .join("/")
}

/// A symlink target that stays inside the mount: relative ones never use
/// `..` (a later rename could otherwise make them escape), absolute ones
/// point below a directory that does not exist.
pub fn random_target(rng: &mut Rng, own_name: &str) -> String {
    match rng.weighted(&[6, 3, 1, 1]) {
        0 => {
            let depth = 1 + rng.weighted(&[3, 1]);
            (0..depth)
                .map(|_| *rng.pick(NAMES))
                .collect::<Vec<_>>()
                .join("/")
        }
        1 => format!("{ABS_TARGET_PREFIX}/{}", rng.pick(NAMES)),
        2 => own_name.to_string(),
        _ => format!("./{}", rng.pick(NAMES)),
    }
}

fn random_xattrs(rng: &mut Rng, user_ok: bool) -> Vec<(String, Vec<u8>)> {
    let mut v = Vec::new();
    if user_ok && rng.chance(1, 4) {
        for i in 0..rng.range(1, 3) {
            let len = rng.below(24) as usize;
            v.push((format!("user.k{i}"), rng.bytes(len)));
        }
    }
    if rng.chance(1, 6) {
        let len = rng.range(1, 16) as usize;
        v.push(("trusted.t1".to_string(), rng.bytes(len)));
    }
    v
}

fn random_meta(rng: &mut Rng, mode: u32, user_xattrs_ok: bool) -> Meta {
    let (uid, gid) = random_owner(rng);
    Meta {
        mode,
        uid,
        gid,
        mtime: random_mtime(rng),
        xattrs: random_xattrs(rng, user_xattrs_ok),
    }
}

/// `level` 0 is the bottom layer; whiteouts and opaque dirs only appear
/// above it (they would be meaningless in the bottom layer).
fn gen_layer(rng: &mut Rng, level: usize, is_upper: bool) -> LayerSpec {
    let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
    let count = rng.range(6, 16);
    for _ in 0..count {
        let path = random_path(rng);
        if entries.contains_key(&path) {
            continue;
        }
        let comps: Vec<&str> = path.split('/').collect();
        let mut parents_ok = true;
        for i in 1..comps.len() {
            let parent = comps[..i].join("/");
            match entries.get(&parent) {
                Some(Entry {
                    kind: Kind::Dir { .. },
                    ..
                }) => {}
                Some(_) => {
                    parents_ok = false;
                    break;
                }
                None => {
                    let mode = random_dir_mode(rng);
                    let meta = random_meta(rng, mode, true);
                    entries.insert(
                        parent,
                        Entry {
                            kind: Kind::Dir { opaque: false },
                            meta,
                        },
                    );
                }
            }
        }
        if !parents_ok {
            continue;
        }
        let upper_ish = level > 0 || is_upper;
        let files: Vec<String> = entries
            .iter()
            .filter(|(_, e)| matches!(e.kind, Kind::File(_) | Kind::Fifo))
            .map(|(p, _)| p.clone())
            .collect();
        let entry = match rng.weighted(&[35, 12, 6, 12, 4, 12, 8]) {
            0 => {
                let len = match rng.weighted(&[2, 5, 2]) {
                    0 => 0,
                    1 => rng.range(1, 100) as usize,
                    _ => rng.range(1000, 6000) as usize,
                };
                let mode = random_file_mode(rng);
                Entry {
                    kind: Kind::File(rng.bytes(len)),
                    meta: random_meta(rng, mode, true),
                }
            }
            2 if upper_ish => {
                let mode = random_dir_mode(rng);
                Entry {
                    kind: Kind::Dir { opaque: true },
                    meta: random_meta(rng, mode, true),
                }
            }
            1 | 2 => {
                let mode = random_dir_mode(rng);
                Entry {
                    kind: Kind::Dir { opaque: false },
                    meta: random_meta(rng, mode, true),
                }
            }
            3 => {
                let own = comps[comps.len() - 1];
                Entry {
                    kind: Kind::Symlink(random_target(rng, own)),
                    meta: random_meta(rng, 0o777, false),
                }
            }
            5 if upper_ish => Entry {
                kind: Kind::Whiteout,
                meta: Meta {
                    mode: 0,
                    uid: 0,
                    gid: 0,
                    mtime: random_mtime(rng),
                    xattrs: Vec::new(),
                },
            },
            6 if !files.is_empty() => Entry {
                kind: Kind::HardLink(rng.pick(&files).clone()),
                meta: random_meta(rng, 0, false),
            },
            _ => {
                let mode = *rng.pick(&[0o644, 0o600, 0o666, 0o4644]);
                Entry {
                    kind: Kind::Fifo,
                    meta: random_meta(rng, mode, false),
                }
            }
        };
        entries.insert(path, entry);
    }
    LayerSpec {
        root_mtime: random_mtime(rng),
        root_xattrs: if rng.chance(1, 3) {
            vec![("user.root".to_string(), rng.bytes(6))]
        } else {
            Vec::new()
        },
        entries,
    }
}

pub fn gen_tree(seed: u64, n_lowers: usize) -> TreeSpec {
    let mut rng = Rng::new(seed ^ 0x1a7e_25ee_d000_0000);
    // Generated bottom-up; lowers[0] is the top of the stack (kernel order).
    let mut lowers: Vec<LayerSpec> = (0..n_lowers)
        .map(|l| gen_layer(&mut rng, l, false))
        .collect();
    lowers.reverse();
    let upper = gen_layer(&mut rng, n_lowers, true);
    TreeSpec { lowers, upper }
}

fn ts(t: (i64, i64)) -> libc::timespec {
    libc::timespec {
        tv_sec: t.0 as libc::time_t,
        tv_nsec: t.1 as libc::c_long,
    }
}

fn must(what: &str, p: &Path, r: sys::Sys<()>) {
    if let Err(e) = r {
        panic!(
            "materializing layers: {what} {}: {}",
            p.display(),
            sys::errno_name(e)
        );
    }
}

/// Writes `spec` into the (empty, existing) directory `root`.
pub fn materialize(spec: &LayerSpec, root: &Path) {
    for (path, e) in &spec.entries {
        let p = root.join(path);
        match &e.kind {
            Kind::Dir { .. } => must("mkdir", &p, sys::mkdir(&p, 0o700)),
            Kind::File(data) => {
                let fd = sys::open(&p, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL, 0o600)
                    .unwrap_or_else(|e| panic!("create {}: {}", p.display(), sys::errno_name(e)));
                let n = fd.pwrite(data, 0).expect("write layer file");
                assert_eq!(n, data.len(), "short write");
                must("close", &p, fd.close());
            }
            Kind::Symlink(t) => must("symlink", &p, sys::symlink(t.as_bytes(), &p)),
            Kind::Fifo => must("mkfifo", &p, sys::mknod(&p, libc::S_IFIFO | 0o600, 0)),
            Kind::Whiteout => must("whiteout", &p, sys::mknod(&p, libc::S_IFCHR, 0)),
            Kind::HardLink(_) => {}
        }
    }
    for (path, e) in &spec.entries {
        if let Kind::HardLink(to) = &e.kind {
            let p = root.join(path);
            must("link", &p, sys::link(&root.join(to), &p));
        }
    }
    for (path, e) in &spec.entries {
        let p = root.join(path);
        let m = &e.meta;
        match &e.kind {
            Kind::HardLink(_) => continue,
            Kind::Whiteout => {
                must("chmod", &p, sys::chmod(&p, 0));
                continue;
            }
            _ => {}
        }
        must("chown", &p, sys::chown(&p, m.uid, m.gid, true));
        // chown drops setuid/setgid, so modes go after owners.
        if !matches!(e.kind, Kind::Symlink(_)) {
            must("chmod", &p, sys::chmod(&p, m.mode));
        }
        for (k, v) in &m.xattrs {
            must(k, &p, sys::lsetxattr(&p, k, v, 0));
        }
        if let Kind::Dir { opaque: true } = e.kind {
            must(
                "opaque",
                &p,
                sys::lsetxattr(&p, "trusted.overlay.opaque", b"y", 0),
            );
        }
    }
    for (k, v) in &spec.root_xattrs {
        must(k, root, sys::lsetxattr(root, k, v, 0));
    }
    // Children before parents: creating entries bumps the parent's mtime.
    for (path, e) in spec.entries.iter().rev() {
        if matches!(e.kind, Kind::HardLink(_)) {
            continue;
        }
        let p = root.join(path);
        let t = ts(e.meta.mtime);
        must("utimensat", &p, sys::utimens(&p, [t, t], true));
    }
    let t = ts(spec.root_mtime);
    must("utimensat", root, sys::utimens(root, [t, t], true));
}
