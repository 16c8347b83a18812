//! Random operations over merged-view paths and their normalized outcomes.
//!
//! Ops are generated from a path pool, never from what a mount answers, so
//! both mounts get exactly the same sequence even after they diverge.

use super::layers::{random_mtime, random_target, TreeSpec};
use super::rng::Rng;
use super::sys::{self, Sys};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const XATTR_NAMES: &[&str] = &[
    "user.k0",
    "user.k1",
    "user.new",
    "user.overlay.opaque",
    "trusted.t1",
    "trusted.overlay.opaque",
    "trusted.overlay.redirect",
    "trusted.overlay.foo",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Time {
    At(i64, i64),
    Now,
    Omit,
}

#[derive(Clone, Debug)]
pub enum Op {
    Write {
        path: String,
        off: u64,
        len: usize,
        fill: u8,
        trunc: bool,
        excl: bool,
        mode: u32,
    },
    Append {
        path: String,
        len: usize,
        fill: u8,
    },
    Truncate {
        path: String,
        len: u64,
    },
    Read {
        path: String,
    },
    Unlink {
        path: String,
    },
    Mkdir {
        path: String,
        mode: u32,
    },
    Rmdir {
        path: String,
    },
    Rename {
        from: String,
        to: String,
        flags: u32,
    },
    Link {
        from: String,
        to: String,
    },
    Symlink {
        target: String,
        path: String,
    },
    Readlink {
        path: String,
    },
    Mkfifo {
        path: String,
        mode: u32,
    },
    /// mknod c 0 0: what a whiteout looks like on disk.
    MknodWhiteout {
        path: String,
    },
    Chmod {
        path: String,
        mode: u32,
    },
    Chown {
        path: String,
        uid: u32,
        gid: u32,
        nofollow: bool,
    },
    Utimens {
        path: String,
        atime: Time,
        mtime: Time,
        nofollow: bool,
    },
    SetXattr {
        path: String,
        name: String,
        value: Vec<u8>,
        flags: i32,
    },
    RemoveXattr {
        path: String,
        name: String,
    },
    GetXattr {
        path: String,
        name: String,
    },
    ListXattr {
        path: String,
    },
    Stat {
        path: String,
        follow: bool,
    },
    Readdir {
        path: String,
    },
    /// open(dir, O_TMPFILE), write, and maybe name it by linkat.
    Tmpfile {
        dir: String,
        to: Option<String>,
        len: usize,
        fill: u8,
        excl: bool,
    },
}

/// Filesystem-set times ("now") compare equal to each other; times we set
/// (all far in the past) must match to the nanosecond.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MTime {
    Now,
    At(i64, i64),
}

fn now_threshold() -> i64 {
    static START: OnceLock<i64> = OnceLock::new();
    *START.get_or_init(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        now - 10
    })
}

pub fn norm_mtime(sec: i64, nsec: i64) -> MTime {
    if sec >= now_threshold() {
        MTime::Now
    } else {
        MTime::At(sec, nsec)
    }
}

/// The comparable part of a `struct stat` (no inode or device numbers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatNorm {
    pub kind: char,
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    /// None for directories (their size is the upper fs's business).
    pub size: Option<u64>,
    /// None for directories.
    pub nlink: Option<u64>,
    pub mtime: MTime,
    pub rdev: Option<(u32, u32)>,
}

pub fn kind_char(mode: u32) -> char {
    match mode & libc::S_IFMT {
        libc::S_IFREG => '-',
        libc::S_IFDIR => 'd',
        libc::S_IFLNK => 'l',
        libc::S_IFIFO => 'p',
        libc::S_IFCHR => 'c',
        libc::S_IFBLK => 'b',
        libc::S_IFSOCK => 's',
        _ => '?',
    }
}

pub fn norm_stat(st: &libc::stat) -> StatNorm {
    let kind = kind_char(st.st_mode);
    let dir = kind == 'd';
    StatNorm {
        kind,
        perm: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        size: (!dir).then_some(st.st_size as u64),
        nlink: (!dir).then_some(st.st_nlink),
        mtime: norm_mtime(st.st_mtime, st.st_mtime_nsec),
        rdev: matches!(kind, 'c' | 'b').then(|| (libc::major(st.st_rdev), libc::minor(st.st_rdev))),
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Unit,
    Count(usize),
    Data { len: usize, hash: u64 },
    Stat(StatNorm),
    Names(Vec<(String, u8)>),
    Bytes(Vec<u8>),
    XattrNames(Vec<String>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fail {
    pub stage: &'static str,
    pub errno: i32,
}

pub type Outcome = Result<Value, Fail>;

pub fn show_stat(s: &StatNorm) -> String {
    let mut out = format!("{}{:04o} {}:{}", s.kind, s.perm, s.uid, s.gid);
    if let Some(size) = s.size {
        out.push_str(&format!(" size={size}"));
    }
    if let Some(nl) = s.nlink {
        out.push_str(&format!(" nlink={nl}"));
    }
    if let Some((ma, mi)) = s.rdev {
        out.push_str(&format!(" rdev={ma},{mi}"));
    }
    out.push_str(&format!(" mtime={:?}", s.mtime));
    out
}

pub fn show(o: &Outcome) -> String {
    match o {
        Ok(Value::Stat(s)) => format!("Ok({})", show_stat(s)),
        Ok(Value::Bytes(b)) => format!("Ok({:?})", String::from_utf8_lossy(b)),
        Ok(Value::Names(n)) => {
            let parts: Vec<String> = n.iter().map(|(name, t)| format!("{name}:{t}")).collect();
            format!("Ok([{}])", parts.join(" "))
        }
        Ok(v) => format!("Ok({v:?})"),
        Err(f) => format!("Err({}: {})", f.stage, sys::errno_name(f.errno)),
    }
}

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.stage, sys::errno_name(self.errno))
    }
}

pub fn fnv64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn payload(len: usize, fill: u8) -> Vec<u8> {
    (0..len)
        .map(|i| fill.wrapping_add((i % 251) as u8))
        .collect()
}

/// Which op mix to draw from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Profile {
    /// Every op kind, renames among them.
    #[default]
    Default,
    /// Issue 4: directory renames of every kind, hard links across copy-up,
    /// metadata-only changes, mixed with the default ops.
    Renames,
}

/// What the generator looks at: the kernel's merged root, and its layers
/// (to tell lower, merged, upper-only and opaque dirs apart). Only the
/// kernel's side is read, so both sides get the same sequence.
pub struct Oracle<'a> {
    pub merged: &'a Path,
    pub upper: &'a Path,
    pub lowers: &'a [PathBuf],
}

/// The pool of paths ops are drawn from; grows with every name an op uses.
pub struct OpGen {
    rng: Rng,
    pool: Vec<String>,
    seen: BTreeSet<String>,
    fresh: u32,
    profile: Profile,
    /// Follow-up ops of a scenario, run before anything new is drawn.
    pending: VecDeque<Op>,
    /// Dirs moved by a rename: (original name, current name).
    renamed: Vec<(String, String)>,
}

fn join(parent: &str, name: &str) -> String {
    if parent == "." {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    }
}

fn parent_of(p: &str) -> String {
    match p.rsplit_once('/') {
        Some((parent, _)) => parent.to_string(),
        None => ".".to_string(),
    }
}

/// `p` is `dir` or below it.
fn is_under(p: &str, dir: &str) -> bool {
    dir == "." || p == dir || p.strip_prefix(dir).is_some_and(|r| r.starts_with('/'))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DirClass {
    /// Only in lower layers.
    Lower,
    /// In the upper and in a lower layer.
    Merged,
    /// Only in the upper layer (or its lower name is elsewhere).
    UpperOnly,
    /// Neither could be told (e.g. behind a symlink in a layer).
    Unknown,
}

struct DirInfo {
    path: String,
    class: DirClass,
    opaque: bool,
    in_opaque: bool,
    empty: bool,
}

fn is_dir_at(p: &Path) -> bool {
    sys::lstat(p).is_ok_and(|s| s.st_mode & libc::S_IFMT == libc::S_IFDIR)
}

/// Where a merged path's lower entries are looked up: the same path,
/// except below a directory the kernel redirected (renamed with
/// redirect_dir=on), whose `trusted.overlay.redirect` is followed.
fn lower_path(o: &Oracle, p: &str) -> String {
    let mut lower = ".".to_string();
    let mut merged = ".".to_string();
    for comp in p.split('/') {
        merged = join(&merged, comp);
        lower = match sys::lgetxattr(&o.upper.join(&merged), "trusted.overlay.redirect") {
            Ok(r) if r.first() == Some(&b'/') => String::from_utf8_lossy(&r[1..]).into_owned(),
            // Relative: the old name in the same parent.
            Ok(r) if !r.is_empty() => join(&lower, &String::from_utf8_lossy(&r)),
            _ => join(&lower, comp),
        };
    }
    lower
}

/// The live dirs (not the root) of the oracle, classified by its layers.
fn classify_dirs(live: &[(String, char)], o: &Oracle) -> Vec<DirInfo> {
    let mut out: Vec<DirInfo> = live
        .iter()
        .filter(|(p, k)| *k == 'd' && p != ".")
        .map(|(p, _)| {
            let up = o.upper.join(p);
            let in_upper = is_dir_at(&up);
            let lp = lower_path(o, p);
            let in_lower = o.lowers.iter().any(|l| is_dir_at(&l.join(&lp)));
            let opaque =
                in_upper && sys::lgetxattr(&up, "trusted.overlay.opaque").is_ok_and(|v| v == b"y");
            let class = match (in_upper, in_lower) {
                (false, true) => DirClass::Lower,
                (true, true) => DirClass::Merged,
                (true, false) => DirClass::UpperOnly,
                (false, false) => DirClass::Unknown,
            };
            let prefix = format!("{p}/");
            DirInfo {
                path: p.clone(),
                class,
                opaque,
                in_opaque: false,
                empty: !live.iter().any(|(q, _)| q.starts_with(&prefix)),
            }
        })
        .collect();
    let opaque: Vec<String> = out
        .iter()
        .filter(|d| d.opaque)
        .map(|d| d.path.clone())
        .collect();
    for d in &mut out {
        d.in_opaque = opaque.iter().any(|o| d.path != *o && is_under(&d.path, o));
    }
    out
}

/// Regular files of the merged view that are only in a lower layer, with
/// the (dev, ino) of the topmost lower file (hard links share it).
fn lower_only_files(live: &[(String, char)], o: &Oracle) -> Vec<(String, (u64, u64))> {
    let mut out = Vec::new();
    for (p, k) in live {
        if *k != '-' || sys::lstat(&o.upper.join(p)).is_ok() {
            continue;
        }
        let lp = lower_path(o, p);
        for l in o.lowers {
            if let Ok(st) = sys::lstat(&l.join(&lp)) {
                if st.st_mode & libc::S_IFMT == libc::S_IFREG {
                    out.push((p.clone(), (st.st_dev, st.st_ino)));
                }
                break;
            }
        }
    }
    out
}

impl OpGen {
    pub fn new(seed: u64, spec: &TreeSpec) -> OpGen {
        let mut pool = vec![".".to_string()];
        pool.extend(spec.all_paths());
        let seen = pool.iter().cloned().collect();
        OpGen {
            rng: Rng::new(seed ^ 0x0b5e_55ed_0000_0001),
            pool,
            seen,
            fresh: 0,
            profile: Profile::Default,
            pending: VecDeque::new(),
            renamed: Vec::new(),
        }
    }

    pub fn with_profile(seed: u64, spec: &TreeSpec, profile: Profile) -> OpGen {
        OpGen {
            profile,
            ..OpGen::new(seed, spec)
        }
    }

    fn add(&mut self, p: &str) {
        if self.seen.insert(p.to_string()) {
            self.pool.push(p.to_string());
        }
    }

    fn pool_path(&mut self) -> String {
        self.rng.pick(&self.pool).clone()
    }

    /// A path from the oracle's current tree, preferring the given types;
    /// sometimes a pool path (deleted, whited out or never created).
    fn existing(&mut self, live: &[(String, char)], kinds: &[char]) -> String {
        let preferred: Vec<&String> = live
            .iter()
            .filter(|(_, k)| kinds.contains(k))
            .map(|(p, _)| p)
            .collect();
        match self.rng.below(10) {
            0..=5 if !preferred.is_empty() => (*self.rng.pick(&preferred)).clone(),
            0..=7 if !live.is_empty() => self.rng.pick(live).0.clone(),
            _ => self.pool_path(),
        }
    }

    fn fresh_name(&mut self, live: &[(String, char)]) -> String {
        let parent = if self.rng.chance(1, 5) {
            self.pool_path()
        } else {
            self.existing(live, &['d'])
        };
        self.fresh_in(&parent)
    }

    /// A name never used before, in `parent`.
    fn fresh_in(&mut self, parent: &str) -> String {
        self.fresh += 1;
        let p = join(parent, &format!("n{}", self.fresh));
        self.add(&p);
        p
    }

    /// A new name with probability `new_num / 10`, else an existing path.
    fn path(&mut self, live: &[(String, char)], new_num: u64, kinds: &[char]) -> String {
        if self.rng.chance(new_num, 10) {
            self.fresh_name(live)
        } else {
            self.existing(live, kinds)
        }
    }

    /// Half the time a name the oracle's file really has, else a fixed one.
    fn xattr_name(&mut self, oracle: Option<&Path>, path: &str) -> String {
        if self.rng.chance(1, 2) {
            if let Some(root) = oracle {
                let names = sys::llistxattr(&root.join(path)).unwrap_or_default();
                if !names.is_empty() {
                    return self.rng.pick(&names).clone();
                }
            }
        }
        self.rng.pick(XATTR_NAMES).to_string()
    }

    fn time(&mut self) -> Time {
        match self.rng.weighted(&[6, 2, 1]) {
            0 => {
                let (s, n) = random_mtime(&mut self.rng);
                Time::At(s, n)
            }
            1 => Time::Now,
            _ => Time::Omit,
        }
    }

    /// `oracle` is the kernel's side: ops aim mostly at what exists there,
    /// and the kernel is deterministic, so the sequence is too.
    pub fn next_op(&mut self, oracle: Option<&Oracle>) -> Op {
        if let Some(op) = self.pending.pop_front() {
            return op;
        }
        let live = match oracle {
            Some(o) => super::tree::list(o.merged),
            None => Vec::new(),
        };
        let live = &live[..];
        if self.profile == Profile::Renames {
            if let Some(o) = oracle {
                let op = match self.rng.weighted(&[30, 25, 12, 33]) {
                    0 => self.dir_rename(live, o),
                    1 => self.hardlink(live, o),
                    2 => self.metacopy(live, o),
                    _ => None,
                };
                if let Some(op) = op {
                    return op;
                }
            }
        }
        self.random_op(live, oracle.map(|o| o.merged))
    }

    /// One op of the default mix.
    fn random_op(&mut self, live: &[(String, char)], oracle: Option<&Path>) -> Op {
        let r = &mut self.rng;
        let which = r.weighted(&[
            12, 5, 5, 8, 7, 6, 5, 12, 4, 4, 3, 2, 1, 5, 4, 4, 5, 3, 3, 3, 6, 6, 2,
        ]);
        match which {
            0 => {
                let path = self.path(live, 3, &['-']);
                let r = &mut self.rng;
                let len = match r.weighted(&[1, 5, 2]) {
                    0 => 0,
                    1 => r.range(1, 200) as usize,
                    _ => r.range(2000, 9000) as usize,
                };
                Op::Write {
                    path,
                    off: if r.chance(1, 4) { r.below(5000) } else { 0 },
                    len,
                    fill: r.below(256) as u8,
                    trunc: r.chance(1, 3),
                    excl: r.chance(1, 8),
                    mode: super::layers::random_file_mode(r),
                }
            }
            1 => {
                let path = self.path(live, 1, &['-']);
                let r = &mut self.rng;
                Op::Append {
                    path,
                    len: r.range(1, 3000) as usize,
                    fill: r.below(256) as u8,
                }
            }
            2 => {
                let path = self.path(live, 1, &['-']);
                let r = &mut self.rng;
                let len = *r.pick(&[0, 1, 10, 100, 4096, 10_000]);
                Op::Truncate { path, len }
            }
            3 => Op::Read {
                path: self.path(live, 1, &['-']),
            },
            4 => Op::Unlink {
                path: self.path(live, 1, &['-', 'l', 'p']),
            },
            5 => {
                let path = self.path(live, 6, &['d']);
                Op::Mkdir {
                    path,
                    mode: super::layers::random_dir_mode(&mut self.rng),
                }
            }
            6 => Op::Rmdir {
                path: self.path(live, 1, &['d']),
            },
            7 => {
                let (flags, new_num) = match self.rng.weighted(&[6, 2, 2]) {
                    0 => (0, 3),
                    1 => (libc::RENAME_NOREPLACE, 4),
                    _ => (libc::RENAME_EXCHANGE, 0),
                };
                let from = self.path(live, 1, &[]);
                let to = self.path(live, new_num, &[]);
                Op::Rename { from, to, flags }
            }
            8 => Op::Link {
                from: self.path(live, 1, &['-', 'l', 'p']),
                to: self.path(live, 7, &[]),
            },
            9 => {
                let path = self.path(live, 7, &[]);
                let own = path.rsplit('/').next().unwrap_or("x").to_string();
                Op::Symlink {
                    target: random_target(&mut self.rng, &own),
                    path,
                }
            }
            10 => Op::Readlink {
                path: self.path(live, 1, &['l']),
            },
            11 => {
                let path = self.path(live, 7, &[]);
                let mode = *self.rng.pick(&[0o644, 0o600, 0o666]);
                Op::Mkfifo { path, mode }
            }
            12 => Op::MknodWhiteout {
                path: self.path(live, 6, &[]),
            },
            13 => {
                let path = self.path(live, 1, &[]);
                let mode = if self.rng.chance(1, 2) {
                    super::layers::random_file_mode(&mut self.rng)
                } else {
                    super::layers::random_dir_mode(&mut self.rng)
                };
                Op::Chmod { path, mode }
            }
            14 => {
                let path = self.path(live, 1, &[]);
                let r = &mut self.rng;
                let ids = [0, 1000, 2000, u32::MAX];
                Op::Chown {
                    path,
                    uid: *r.pick(&ids),
                    gid: *r.pick(&ids),
                    nofollow: r.chance(2, 3),
                }
            }
            15 => {
                let path = self.path(live, 1, &[]);
                Op::Utimens {
                    path,
                    atime: self.time(),
                    mtime: self.time(),
                    nofollow: self.rng.chance(2, 3),
                }
            }
            16 => {
                let path = self.path(live, 1, &[]);
                let name = self.xattr_name(oracle, &path);
                let r = &mut self.rng;
                let len = r.below(20) as usize;
                Op::SetXattr {
                    path,
                    name,
                    value: if r.chance(1, 5) {
                        b"y".to_vec()
                    } else {
                        r.bytes(len)
                    },
                    flags: *r.pick(&[0, 0, libc::XATTR_CREATE, libc::XATTR_REPLACE]),
                }
            }
            17 => {
                let path = self.path(live, 1, &[]);
                let name = self.xattr_name(oracle, &path);
                Op::RemoveXattr { path, name }
            }
            18 => {
                let path = self.path(live, 1, &[]);
                let name = self.xattr_name(oracle, &path);
                Op::GetXattr { path, name }
            }
            19 => Op::ListXattr {
                path: self.path(live, 1, &[]),
            },
            20 => Op::Stat {
                path: self.path(live, 1, &[]),
                follow: self.rng.chance(1, 3),
            },
            22 => {
                let dir = self.existing(live, &['d']);
                let to = self.rng.chance(3, 4).then(|| self.fresh_in(&dir));
                let r = &mut self.rng;
                Op::Tmpfile {
                    dir,
                    to,
                    len: r.below(3000) as usize,
                    fill: r.below(256) as u8,
                    excl: r.chance(1, 6),
                }
            }
            _ => Op::Readdir {
                path: self.path(live, 0, &['d']),
            },
        }
    }

    /// A small data or metadata change that copies `path` up.
    fn copy_up_op(&mut self, path: &str) -> Op {
        let path = path.to_string();
        let r = &mut self.rng;
        match r.below(7) {
            0 => Op::Chmod {
                mode: super::layers::random_file_mode(r),
                path,
            },
            1 => Op::Write {
                off: r.below(100),
                len: r.range(1, 50) as usize,
                fill: r.below(256) as u8,
                trunc: false,
                excl: false,
                mode: 0o644,
                path,
            },
            2 => Op::Chown {
                uid: 1000,
                gid: 2000,
                nofollow: true,
                path,
            },
            3 => Op::SetXattr {
                name: "user.k1".to_string(),
                value: r.bytes(5),
                flags: 0,
                path,
            },
            4 => {
                let (s, n) = random_mtime(r);
                Op::Utimens {
                    atime: Time::At(s, n),
                    mtime: Time::At(s, n),
                    nofollow: true,
                    path,
                }
            }
            5 => Op::Truncate {
                len: *r.pick(&[0, 3, 100]),
                path,
            },
            _ => Op::Append {
                len: r.range(1, 40) as usize,
                fill: r.below(256) as u8,
                path,
            },
        }
    }

    /// A metadata-only change (what metacopy=on copies up without data).
    fn meta_op(&mut self, path: &str) -> Op {
        let path = path.to_string();
        let r = &mut self.rng;
        match r.below(4) {
            0 => Op::Chmod {
                mode: super::layers::random_file_mode(r),
                path,
            },
            1 => Op::Chown {
                uid: 2000,
                gid: 1000,
                nofollow: true,
                path,
            },
            2 => {
                let (s, n) = random_mtime(r);
                Op::Utimens {
                    atime: Time::Omit,
                    mtime: Time::At(s, n),
                    nofollow: true,
                    path,
                }
            }
            _ => Op::SetXattr {
                name: "user.new".to_string(),
                value: r.bytes(4),
                flags: 0,
                path,
            },
        }
    }

    fn stat(path: &str) -> Op {
        Op::Stat {
            path: path.to_string(),
            follow: false,
        }
    }

    /// Renames a directory of some kind (lower, merged, upper-only, opaque,
    /// inside an opaque dir, renamed before) to a new name, into or out of an
    /// opaque dir, over an empty dir, back to its original name, ...; then
    /// looks inside it (redirects must be followed) and sometimes renames it
    /// again or back.
    fn dir_rename(&mut self, live: &[(String, char)], o: &Oracle) -> Option<Op> {
        let dirs = classify_dirs(live, o);
        self.renamed
            .retain(|(_, cur)| dirs.iter().any(|d| d.path == *cur));
        let group = |f: &dyn Fn(&DirInfo) -> bool| -> Vec<usize> {
            (0..dirs.len()).filter(|&i| f(&dirs[i])).collect()
        };
        let renamed = &self.renamed;
        let groups: Vec<Vec<usize>> = [
            group(&|d| d.class == DirClass::Lower),
            group(&|d| d.class == DirClass::Merged),
            group(&|d| d.class == DirClass::UpperOnly),
            group(&|d| d.opaque),
            group(&|d| d.in_opaque),
            group(&|d| renamed.iter().any(|(_, c)| *c == d.path)),
        ]
        .into_iter()
        .filter(|g| !g.is_empty())
        .collect();
        if groups.is_empty() {
            return None;
        }
        let g = self.rng.pick(&groups).clone();
        let src = dirs[*self.rng.pick(&g)].path.clone();
        let orig = self
            .renamed
            .iter()
            .find(|(_, c)| *c == src)
            .map(|(o, _)| o.clone());
        let unrelated = |p: &str| !is_under(p, &src) && !is_under(&src, p);
        let other_dirs: Vec<String> = dirs
            .iter()
            .filter(|d| unrelated(&d.path))
            .map(|d| d.path.clone())
            .collect();
        let mut parents = other_dirs.clone();
        parents.push(".".to_string());
        let (to, flags) = match self.rng.weighted(&[5, 3, 2, 3, 4, 3, 2, 1, 1]) {
            1 => {
                let opaque: Vec<&String> = dirs
                    .iter()
                    .filter(|d| d.opaque && unrelated(&d.path))
                    .map(|d| &d.path)
                    .collect();
                let parent = if opaque.is_empty() {
                    ".".to_string()
                } else {
                    (*self.rng.pick(&opaque)).clone()
                };
                (self.fresh_in(&parent), 0)
            }
            2 => (self.fresh_in("."), 0),
            3 => {
                let parent = parent_of(&src);
                (self.fresh_in(&parent), libc::RENAME_NOREPLACE)
            }
            4 => {
                let empty: Vec<&String> = dirs
                    .iter()
                    .filter(|d| d.empty && unrelated(&d.path))
                    .map(|d| &d.path)
                    .collect();
                if empty.is_empty() {
                    (self.fresh_in("."), 0)
                } else {
                    ((*self.rng.pick(&empty)).clone(), 0)
                }
            }
            5 => match &orig {
                Some(orig) => (orig.clone(), 0),
                None => {
                    let parent = parent_of(&src);
                    (self.fresh_in(&parent), 0)
                }
            },
            6 if !other_dirs.is_empty() => {
                (self.rng.pick(&other_dirs).clone(), libc::RENAME_EXCHANGE)
            }
            7 => {
                // Over a non-empty dir or a non-dir: ENOTEMPTY / ENOTDIR.
                let busy: Vec<&String> = live
                    .iter()
                    .filter(|(p, k)| {
                        p != "."
                            && unrelated(p)
                            && (*k != 'd' || dirs.iter().any(|d| d.path == *p && !d.empty))
                    })
                    .map(|(p, _)| p)
                    .collect();
                if busy.is_empty() {
                    (self.fresh_in(&src), 0)
                } else {
                    ((*self.rng.pick(&busy)).clone(), 0)
                }
            }
            8 => (self.fresh_in(&src), 0),
            _ => {
                let parent = self.rng.pick(&parents).clone();
                let flags = if self.rng.chance(1, 3) {
                    libc::RENAME_NOREPLACE
                } else {
                    0
                };
                (self.fresh_in(&parent), flags)
            }
        };

        // Follow-ups: look through the new name, change something below
        // it (a copy-up under a redirected dir), maybe move it again.
        let prefix = format!("{src}/");
        let below: Vec<(String, char)> = live
            .iter()
            .filter_map(|(p, k)| p.strip_prefix(&prefix).map(|s| (s.to_string(), *k)))
            .collect();
        self.pending.push_back(Op::Readdir { path: to.clone() });
        if !below.is_empty() && self.rng.chance(2, 3) {
            let (rel, kind) = self.rng.pick(&below).clone();
            let child = join(&to, &rel);
            self.pending.push_back(Self::stat(&child));
            if kind == '-' {
                let op = self.copy_up_op(&child);
                self.pending.push_back(op);
                self.pending.push_back(Op::Read { path: child });
            } else if kind == 'd' {
                self.pending.push_back(Op::Readdir { path: child });
            }
        }
        if self.rng.chance(1, 4) {
            let mode = super::layers::random_dir_mode(&mut self.rng);
            let p = self.fresh_in(&to);
            self.pending.push_back(Op::Mkdir { path: p, mode });
        }
        let mut cur = to.clone();
        if flags != libc::RENAME_EXCHANGE {
            match self.rng.below(8) {
                0 | 1 => {
                    let parent = self.rng.pick(&parents).clone();
                    let to2 = self.fresh_in(&parent);
                    self.pending.push_back(Op::Rename {
                        from: to.clone(),
                        to: to2.clone(),
                        flags: 0,
                    });
                    self.pending.push_back(Op::Readdir { path: to2.clone() });
                    cur = to2;
                }
                2 => {
                    self.pending.push_back(Op::Rename {
                        from: to.clone(),
                        to: src.clone(),
                        flags: 0,
                    });
                    self.pending.push_back(Op::Readdir { path: src.clone() });
                    cur = src.clone();
                }
                _ => {}
            }
            let first = orig.unwrap_or_else(|| src.clone());
            if cur != first {
                self.renamed.push((first, cur));
            }
        }
        Some(Op::Rename {
            from: src,
            to,
            flags,
        })
    }

    /// Two names of one lower file (an existing lower hard link, or a new
    /// link to a lower file): copy up one name, write through the other,
    /// look at both (nlink), then unlink one.
    fn hardlink(&mut self, live: &[(String, char)], o: &Oracle) -> Option<Op> {
        let files = lower_only_files(live, o);
        let mut groups: BTreeMap<(u64, u64), Vec<String>> = BTreeMap::new();
        for (p, id) in &files {
            groups.entry(*id).or_default().push(p.clone());
        }
        let linked: Vec<Vec<String>> = groups.into_values().filter(|v| v.len() > 1).collect();
        let mut first = None;
        let (mut n1, mut n2) = if !linked.is_empty() && self.rng.chance(1, 2) {
            let g = self.rng.pick(&linked).clone();
            let i = self.rng.below(g.len() as u64) as usize;
            let j = (i + 1 + self.rng.below(g.len() as u64 - 1) as usize) % g.len();
            (g[i].clone(), g[j].clone())
        } else if !files.is_empty() {
            let f = self.rng.pick(&files).0.clone();
            let parent = if self.rng.chance(1, 2) {
                parent_of(&f)
            } else {
                self.existing(live, &['d'])
            };
            let to = self.fresh_in(&parent);
            first = Some(Op::Link {
                from: f.clone(),
                to: to.clone(),
            });
            (f, to)
        } else {
            return None;
        };
        if self.rng.chance(1, 2) {
            std::mem::swap(&mut n1, &mut n2);
        }
        let q = |g: &mut OpGen, op: Op| g.pending.push_back(op);
        q(self, Self::stat(&n2));
        let op = self.copy_up_op(&n1);
        q(self, op);
        q(self, Self::stat(&n1));
        q(self, Self::stat(&n2));
        let (len, fill) = (self.rng.range(1, 60) as usize, self.rng.below(256) as u8);
        q(
            self,
            Op::Append {
                path: n2.clone(),
                len,
                fill,
            },
        );
        q(self, Op::Read { path: n1.clone() });
        if self.rng.chance(1, 3) {
            let to = self.fresh_in(&parent_of(&n2));
            q(
                self,
                Op::Link {
                    from: n2.clone(),
                    to,
                },
            );
            q(self, Self::stat(&n1));
        }
        if self.rng.chance(1, 3) {
            let parent = self.existing(live, &['d']);
            let to = self.fresh_in(&parent);
            q(
                self,
                Op::Rename {
                    from: n1.clone(),
                    to: to.clone(),
                    flags: 0,
                },
            );
            n1 = to;
        }
        let (gone, kept) = if self.rng.chance(1, 2) {
            (n1, n2)
        } else {
            (n2, n1)
        };
        q(self, Op::Unlink { path: gone });
        q(self, Self::stat(&kept));
        q(self, Op::Read { path: kept });
        Some(first.unwrap_or_else(|| self.pending.pop_front().expect("queued ops")))
    }

    /// A metadata-only change to a lower file, maybe a rename of it, then
    /// reads and a data write (metacopy=on copies the data only then).
    fn metacopy(&mut self, live: &[(String, char)], o: &Oracle) -> Option<Op> {
        let files = lower_only_files(live, o);
        if files.is_empty() {
            return None;
        }
        let mut f = self.rng.pick(&files).0.clone();
        let first = self.meta_op(&f);
        self.pending.push_back(Self::stat(&f));
        if self.rng.chance(1, 2) {
            let parent = self.existing(live, &['d']);
            let to = self.fresh_in(&parent);
            self.pending.push_back(Op::Rename {
                from: f.clone(),
                to: to.clone(),
                flags: 0,
            });
            f = to;
        }
        self.pending.push_back(Op::Read { path: f.clone() });
        if self.rng.chance(1, 2) {
            let op = self.meta_op(&f);
            self.pending.push_back(op);
        }
        if self.rng.chance(2, 3) {
            let (len, fill) = (self.rng.range(1, 60) as usize, self.rng.below(256) as u8);
            self.pending.push_back(Op::Append {
                path: f.clone(),
                len,
                fill,
            });
        }
        self.pending.push_back(Op::Read { path: f.clone() });
        self.pending.push_back(Op::ListXattr { path: f });
        Some(first)
    }
}

/// The variant name, e.g. "Rename" (for ROVL_DIFF_SKIP).
pub fn kind_name(op: &Op) -> String {
    let d = format!("{op:?}");
    d.split([' ', '{']).next().unwrap_or("").to_string()
}

fn st<T>(stage: &'static str, r: Sys<T>) -> Result<T, Fail> {
    r.map_err(|errno| Fail { stage, errno })
}

fn timespec(t: Time) -> libc::timespec {
    match t {
        Time::At(s, n) => libc::timespec {
            tv_sec: s as libc::time_t,
            tv_nsec: n as libc::c_long,
        },
        Time::Now => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Time::Omit => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
    }
}

/// Runs `op` against the merged view rooted at `root`.
pub fn apply(op: &Op, root: &Path) -> Outcome {
    let p = |s: &str| root.join(s);
    match op {
        Op::Write {
            path,
            off,
            len,
            fill,
            trunc,
            excl,
            mode,
        } => {
            // O_NONBLOCK: opening a FIFO for writing must not wait for a reader.
            let mut flags = libc::O_WRONLY | libc::O_CREAT | libc::O_NONBLOCK;
            if *trunc {
                flags |= libc::O_TRUNC;
            }
            if *excl {
                flags |= libc::O_EXCL;
            }
            let fd = st("open", sys::open(&p(path), flags, *mode))?;
            let n = st("pwrite", fd.pwrite(&payload(*len, *fill), *off))?;
            st("close", fd.close())?;
            Ok(Value::Count(n))
        }
        Op::Append { path, len, fill } => {
            let fd = st(
                "open",
                sys::open(
                    &p(path),
                    libc::O_WRONLY | libc::O_APPEND | libc::O_NONBLOCK,
                    0,
                ),
            )?;
            let n = st("write", fd.write(&payload(*len, *fill)))?;
            st("close", fd.close())?;
            Ok(Value::Count(n))
        }
        Op::Truncate { path, len } => {
            st("truncate", sys::truncate(&p(path), *len)).map(|_| Value::Unit)
        }
        Op::Read { path } => {
            let fd = st(
                "open",
                sys::open(&p(path), libc::O_RDONLY | libc::O_NONBLOCK, 0),
            )?;
            let data = st("read", fd.read_all(1 << 20))?;
            st("close", fd.close())?;
            Ok(Value::Data {
                len: data.len(),
                hash: fnv64(&data),
            })
        }
        Op::Unlink { path } => st("unlink", sys::unlink(&p(path))).map(|_| Value::Unit),
        Op::Mkdir { path, mode } => st("mkdir", sys::mkdir(&p(path), *mode)).map(|_| Value::Unit),
        Op::Rmdir { path } => st("rmdir", sys::rmdir(&p(path))).map(|_| Value::Unit),
        Op::Rename { from, to, flags } => {
            st("rename", sys::renameat2(&p(from), &p(to), *flags)).map(|_| Value::Unit)
        }
        Op::Link { from, to } => st("link", sys::link(&p(from), &p(to))).map(|_| Value::Unit),
        Op::Symlink { target, path } => {
            st("symlink", sys::symlink(target.as_bytes(), &p(path))).map(|_| Value::Unit)
        }
        Op::Readlink { path } => st("readlink", sys::readlink(&p(path))).map(Value::Bytes),
        Op::Mkfifo { path, mode } => {
            st("mknod", sys::mknod(&p(path), libc::S_IFIFO | *mode, 0)).map(|_| Value::Unit)
        }
        Op::MknodWhiteout { path } => {
            st("mknod", sys::mknod(&p(path), libc::S_IFCHR, 0)).map(|_| Value::Unit)
        }
        Op::Chmod { path, mode } => st("chmod", sys::chmod(&p(path), *mode)).map(|_| Value::Unit),
        Op::Chown {
            path,
            uid,
            gid,
            nofollow,
        } => st("chown", sys::chown(&p(path), *uid, *gid, *nofollow)).map(|_| Value::Unit),
        Op::Utimens {
            path,
            atime,
            mtime,
            nofollow,
        } => st(
            "utimensat",
            sys::utimens(&p(path), [timespec(*atime), timespec(*mtime)], *nofollow),
        )
        .map(|_| Value::Unit),
        Op::SetXattr {
            path,
            name,
            value,
            flags,
        } => st("setxattr", sys::lsetxattr(&p(path), name, value, *flags)).map(|_| Value::Unit),
        Op::RemoveXattr { path, name } => {
            st("removexattr", sys::lremovexattr(&p(path), name)).map(|_| Value::Unit)
        }
        Op::GetXattr { path, name } => {
            st("getxattr", sys::lgetxattr(&p(path), name)).map(Value::Bytes)
        }
        Op::ListXattr { path } => st("listxattr", sys::llistxattr(&p(path))).map(Value::XattrNames),
        Op::Stat { path, follow } => {
            let r = if *follow {
                sys::stat(&p(path))
            } else {
                sys::lstat(&p(path))
            };
            st("stat", r).map(|s| Value::Stat(norm_stat(&s)))
        }
        Op::Readdir { path } => st("readdir", sys::readdir(&p(path))).map(Value::Names),
        Op::Tmpfile {
            dir,
            to,
            len,
            fill,
            excl,
        } => {
            let excl = if *excl { libc::O_EXCL } else { 0 };
            let fd = st(
                "open",
                sys::open(&p(dir), libc::O_TMPFILE | libc::O_RDWR | excl, 0o640),
            )?;
            st("write", fd.write(&vec![*fill; *len]))?;
            if let Some(to) = to {
                st("linkat", sys::link_fd(&fd, &p(to)))?;
            }
            st("close", fd.close()).map(|_| Value::Unit)
        }
    }
}

/// A path's st_ino before and after one op, on one side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InoObs {
    /// `path`, or `from -> to` when the op moved or linked it.
    pub label: String,
    pub before: u64,
    pub after: u64,
}

fn op_paths(op: &Op) -> Vec<&str> {
    match op {
        Op::Rename { from, to, .. } | Op::Link { from, to } => vec![from, to],
        Op::Write { path, .. }
        | Op::Append { path, .. }
        | Op::Truncate { path, .. }
        | Op::Read { path }
        | Op::Unlink { path }
        | Op::Mkdir { path, .. }
        | Op::Rmdir { path }
        | Op::Symlink { path, .. }
        | Op::Readlink { path }
        | Op::Mkfifo { path, .. }
        | Op::MknodWhiteout { path }
        | Op::Chmod { path, .. }
        | Op::Chown { path, .. }
        | Op::Utimens { path, .. }
        | Op::SetXattr { path, .. }
        | Op::RemoveXattr { path, .. }
        | Op::GetXattr { path, .. }
        | Op::ListXattr { path }
        | Op::Stat { path, .. }
        | Op::Readdir { path } => vec![path],
        Op::Tmpfile { dir, .. } => vec![dir],
    }
}

/// (name before, name after) of every file whose identity the op keeps:
/// copy-up must not change st_ino, a rename moves it, a link shares it.
fn identity_pairs(op: &Op, ok: bool) -> Vec<(&str, &str)> {
    match (op, ok) {
        (Op::Rename { from, to, flags }, true) if *flags == libc::RENAME_EXCHANGE => {
            vec![(from, to), (to, from)]
        }
        (Op::Rename { from, to, .. }, true) => vec![(from, to)],
        (Op::Link { from, to }, true) => vec![(from, from), (from, to)],
        (Op::Unlink { .. } | Op::Rmdir { .. }, true) => Vec::new(),
        _ => op_paths(op).into_iter().map(|p| (p, p)).collect(),
    }
}

fn ino_of(root: &Path, p: &str) -> Option<u64> {
    sys::lstat(&root.join(p)).ok().map(|s| s.st_ino)
}

/// `apply`, plus (with `check_ino`) the st_ino of the op's files before
/// and after it.
pub fn apply_observed(op: &Op, root: &Path, check_ino: bool) -> (Outcome, Vec<InoObs>) {
    if !check_ino {
        return (apply(op, root), Vec::new());
    }
    let before: BTreeMap<&str, u64> = op_paths(op)
        .into_iter()
        .filter_map(|p| ino_of(root, p).map(|i| (p, i)))
        .collect();
    let out = apply(op, root);
    let obs = identity_pairs(op, out.is_ok())
        .into_iter()
        .filter_map(|(b, a)| {
            let before = *before.get(b)?;
            let after = ino_of(root, a)?;
            let label = if a == b {
                b.to_string()
            } else {
                format!("{b} -> {a}")
            };
            Some(InoObs {
                label,
                before,
                after,
            })
        })
        .collect();
    (out, obs)
}
