//! Random operations over merged-view paths and their normalized outcomes.
//!
//! Ops are generated from a path pool, never from what a mount answers, so
//! both mounts get exactly the same sequence even after they diverge.

use super::layers::{random_mtime, random_target, TreeSpec};
use super::rng::Rng;
use super::sys::{self, Sys};
use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;
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

/// The pool of paths ops are drawn from; grows with every name an op uses.
pub struct OpGen {
    rng: Rng,
    pool: Vec<String>,
    seen: BTreeSet<String>,
    fresh: u32,
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
        self.fresh += 1;
        let parent = if self.rng.chance(1, 5) {
            self.pool_path()
        } else {
            self.existing(live, &['d'])
        };
        let name = format!("n{}", self.fresh);
        let p = if parent == "." {
            name
        } else {
            format!("{parent}/{name}")
        };
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

    /// `oracle` is the kernel's merged root: ops aim mostly at what exists
    /// there, and the kernel is deterministic, so the sequence is too.
    pub fn next_op(&mut self, oracle: Option<&Path>) -> Op {
        let live = match oracle {
            Some(root) => super::tree::list(root),
            None => Vec::new(),
        };
        let live = &live[..];
        let r = &mut self.rng;
        let which = r.weighted(&[
            12, 5, 5, 8, 7, 6, 5, 12, 4, 4, 3, 2, 1, 5, 4, 4, 5, 3, 3, 3, 6, 6,
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
            _ => Op::Readdir {
                path: self.path(live, 0, &['d']),
            },
        }
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
    }
}
