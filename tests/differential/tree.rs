//! Walking a tree into a comparable snapshot, and diffing two snapshots.

use super::ops::{fnv64, norm_stat, Fail, StatNorm};
use super::sys;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkMode {
    /// A mounted merged view: every listed xattr counts (the kernel hides
    /// trusted.overlay.*, so one showing up is a difference).
    Merged,
    /// A raw upper dir: overlay xattrs count too, except that the value of
    /// trusted.overlay.origin (a file handle) and trusted.overlay.uuid
    /// (random per mount) only count as present;
    /// whiteouts ignore nlink (the kernel shares one whiteout inode).
    Upper,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum XVal {
    Value(Vec<u8>),
    Present,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub stat: StatNorm,
    pub content: Option<Result<(usize, u64), Fail>>,
    pub target: Option<Result<Vec<u8>, Fail>>,
    pub xattrs: Result<BTreeMap<String, XVal>, Fail>,
    /// The smallest path sharing this non-directory's inode, if any other does.
    pub link_group: Option<String>,
    /// Identity, never compared across sides (see `ino_anomalies`).
    pub ino: u64,
    pub dev: u64,
    /// What the parent's readdir said (None for the root).
    pub d_ino: Option<u64>,
}

pub type Tree = BTreeMap<String, Result<Node, Fail>>;

fn is_whiteout(s: &StatNorm) -> bool {
    s.kind == 'c' && s.rdev == Some((0, 0))
}

fn fail(stage: &'static str, errno: i32) -> Fail {
    Fail { stage, errno }
}

fn xattrs(p: &Path, mode: WalkMode) -> Result<BTreeMap<String, XVal>, Fail> {
    let names = sys::llistxattr(p).map_err(|e| fail("listxattr", e))?;
    let mut out = BTreeMap::new();
    for n in names {
        // origin is a file handle and uuid is random per filesystem.
        let presence_only = n == "trusted.overlay.origin" || n == "trusted.overlay.uuid";
        let v = if mode == WalkMode::Upper && presence_only {
            XVal::Present
        } else {
            match sys::lgetxattr(p, &n) {
                Ok(v) => XVal::Value(v),
                Err(e) => XVal::Value(format!("<getxattr {}>", sys::errno_name(e)).into_bytes()),
            }
        };
        out.insert(n, v);
    }
    Ok(out)
}

fn content(p: &Path) -> Result<(usize, u64), Fail> {
    let fd = sys::open(p, libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK, 0)
        .map_err(|e| fail("open", e))?;
    let data = fd.read_all(64 << 20).map_err(|e| fail("read", e))?;
    fd.close().map_err(|e| fail("close", e))?;
    Ok((data.len(), fnv64(&data)))
}

/// Snapshots everything below `root` (keys relative, root is ".").
pub fn walk(root: &Path, mode: WalkMode) -> Tree {
    let mut tree = Tree::new();
    let mut inodes: BTreeMap<(u64, u64), Vec<String>> = BTreeMap::new();
    walk_rec(root, ".", None, mode, &mut tree, &mut inodes);
    for paths in inodes.values().filter(|v| v.len() > 1) {
        let first = paths.iter().min().cloned();
        for p in paths {
            if let Some(Ok(n)) = tree.get_mut(p) {
                n.link_group = first.clone();
            }
        }
    }
    tree
}

fn walk_rec(
    root: &Path,
    rel: &str,
    d_ino: Option<u64>,
    mode: WalkMode,
    tree: &mut Tree,
    inodes: &mut BTreeMap<(u64, u64), Vec<String>>,
) {
    let p = if rel == "." {
        root.to_path_buf()
    } else {
        root.join(rel)
    };
    let st = match sys::lstat(&p) {
        Ok(st) => st,
        Err(e) => {
            tree.insert(rel.to_string(), Err(fail("lstat", e)));
            return;
        }
    };
    let mut s = norm_stat(&st);
    let whiteout = is_whiteout(&s);
    if whiteout && mode == WalkMode::Upper {
        s.nlink = None;
    }
    let node = Node {
        content: (s.kind == '-').then(|| content(&p)),
        target: (s.kind == 'l').then(|| sys::readlink(&p).map_err(|e| fail("readlink", e))),
        xattrs: xattrs(&p, mode),
        link_group: None,
        stat: s.clone(),
        ino: st.st_ino,
        dev: st.st_dev,
        d_ino,
    };
    if s.kind != 'd' && !whiteout {
        inodes
            .entry((st.st_dev, st.st_ino))
            .or_default()
            .push(rel.to_string());
    }
    tree.insert(rel.to_string(), Ok(node));
    if s.kind == 'd' {
        match sys::readdir_ino(&p) {
            Ok(entries) => {
                for (name, _, d_ino) in entries {
                    let child = if rel == "." {
                        name
                    } else {
                        format!("{rel}/{name}")
                    };
                    walk_rec(root, &child, Some(d_ino), mode, tree, inodes);
                }
            }
            Err(e) => {
                tree.insert(format!("{rel}/<readdir>"), Err(fail("readdir", e)));
            }
        }
    }
}

/// One differing field: (path, what, left, right).
pub type TreeDiff = (String, String, String, String);

fn show_res<T: std::fmt::Debug>(r: &Result<T, Fail>) -> String {
    match r {
        Ok(v) => format!("{v:?}"),
        Err(f) => format!("Err({f})"),
    }
}

/// One line in `ls -l` spirit: type+mode owner size/target/rdev mtime.
fn show_node(r: &Result<Node, Fail>) -> String {
    let n = match r {
        Ok(n) => n,
        Err(f) => return format!("Err({f})"),
    };
    let mut out = super::ops::show_stat(&n.stat);
    if let Some(Ok(t)) = &n.target {
        out.push_str(&format!(" -> {:?}", String::from_utf8_lossy(t)));
    }
    if !matches!(&n.xattrs, Ok(m) if m.is_empty()) {
        out.push_str(&format!(" xattrs={}", show_xattrs(&n.xattrs)));
    }
    out
}

fn show_xattrs(x: &Result<BTreeMap<String, XVal>, Fail>) -> String {
    match x {
        Err(f) => format!("Err({f})"),
        Ok(m) => {
            let parts: Vec<String> = m
                .iter()
                .map(|(k, v)| match v {
                    XVal::Present => format!("{k}=<present>"),
                    XVal::Value(b) => format!("{k}={:?}", String::from_utf8_lossy(b)),
                })
                .collect();
            format!("{{{}}}", parts.join(", "))
        }
    }
}

/// Every difference between two snapshots, field by field.
pub fn compare(a: &Tree, b: &Tree) -> Vec<TreeDiff> {
    let mut out = Vec::new();
    let mut push = |p: &str, what: &str, x: String, y: String| {
        out.push((p.to_string(), what.to_string(), x, y));
    };
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for k in keys {
        let (na, nb) = match (a.get(k), b.get(k)) {
            (Some(x), None) => {
                push(k, "exists", show_node(x), "missing".into());
                continue;
            }
            (None, Some(y)) => {
                push(k, "exists", "missing".into(), show_node(y));
                continue;
            }
            (Some(Ok(x)), Some(Ok(y))) => (x, y),
            (Some(x), Some(y)) => {
                if x != y {
                    push(k, "entry", show_node(x), show_node(y));
                }
                continue;
            }
            (None, None) => continue,
        };
        let (sa, sb) = (&na.stat, &nb.stat);
        if sa.kind != sb.kind {
            push(k, "type", sa.kind.to_string(), sb.kind.to_string());
            continue;
        }
        if sa.perm != sb.perm {
            push(
                k,
                "mode",
                format!("{:04o}", sa.perm),
                format!("{:04o}", sb.perm),
            );
        }
        if (sa.uid, sa.gid) != (sb.uid, sb.gid) {
            push(
                k,
                "owner",
                format!("{}:{}", sa.uid, sa.gid),
                format!("{}:{}", sb.uid, sb.gid),
            );
        }
        if sa.size != sb.size {
            push(
                k,
                "size",
                format!("{:?}", sa.size),
                format!("{:?}", sb.size),
            );
        }
        if sa.nlink != sb.nlink {
            push(
                k,
                "nlink",
                format!("{:?}", sa.nlink),
                format!("{:?}", sb.nlink),
            );
        }
        if sa.rdev != sb.rdev {
            push(
                k,
                "rdev",
                format!("{:?}", sa.rdev),
                format!("{:?}", sb.rdev),
            );
        }
        if sa.mtime != sb.mtime {
            let what = if sa.kind == 'd' { "dir-mtime" } else { "mtime" };
            push(
                k,
                what,
                format!("{:?}", sa.mtime),
                format!("{:?}", sb.mtime),
            );
        }
        if na.content != nb.content {
            let s = |c: &Option<Result<(usize, u64), Fail>>| match c {
                Some(r) => show_res(r),
                None => "-".into(),
            };
            push(k, "content", s(&na.content), s(&nb.content));
        }
        if na.target != nb.target {
            let s = |t: &Option<Result<Vec<u8>, Fail>>| match t {
                Some(Ok(v)) => format!("{:?}", String::from_utf8_lossy(v)),
                Some(Err(f)) => format!("Err({f})"),
                None => "-".into(),
            };
            push(k, "symlink", s(&na.target), s(&nb.target));
        }
        if na.xattrs != nb.xattrs {
            push(
                k,
                "xattrs",
                show_xattrs(&na.xattrs),
                show_xattrs(&nb.xattrs),
            );
        }
        if na.link_group != nb.link_group {
            push(
                k,
                "hardlink-group",
                format!("{:?}", na.link_group),
                format!("{:?}", nb.link_group),
            );
        }
    }
    out
}

/// Paths and types below `root` (root is "."), cheaply: lstat and readdir only.
pub fn list(root: &Path) -> Vec<(String, char)> {
    let mut out = Vec::new();
    let mut stack = vec![".".to_string()];
    while let Some(rel) = stack.pop() {
        let p = if rel == "." {
            root.to_path_buf()
        } else {
            root.join(&rel)
        };
        let Ok(st) = sys::lstat(&p) else { continue };
        let kind = super::ops::kind_char(st.st_mode);
        if kind == 'd' {
            for (name, _) in sys::readdir(&p).unwrap_or_default() {
                stack.push(if rel == "." {
                    name
                } else {
                    format!("{rel}/{name}")
                });
            }
        }
        out.push((rel, kind));
    }
    out.sort();
    out
}

/// Inode-number rules of a merged view (issue 4): `d_ino` from readdir
/// equals `st_ino`, and every file has the root's `st_dev`. Keyed by
/// (path, rule).
pub fn ino_anomalies(t: &Tree) -> BTreeMap<(String, &'static str), String> {
    let mut out = BTreeMap::new();
    let root_dev = match t.get(".") {
        Some(Ok(n)) => n.dev,
        _ => return out,
    };
    for (k, v) in t {
        let Ok(n) = v else { continue };
        if let Some(d) = n.d_ino.filter(|&d| d != n.ino) {
            out.insert((k.clone(), "d_ino"), format!("d_ino={d} st_ino={}", n.ino));
        }
        if n.dev != root_dev {
            out.insert(
                (k.clone(), "st_dev"),
                format!("st_dev={:#x}, the root's {root_dev:#x}", n.dev),
            );
        }
    }
    out
}
