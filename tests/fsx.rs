//! A seeded model checker in the spirit of xfstests' fsx: random reads,
//! writes, mmap reads and writes, truncates, fallocate (plain, keep-size,
//! punch, zero) and copy_file_range on one file, each checked against an
//! in-memory model, then checked again after a remount. It runs on a new
//! file and on a lower file that is copied up mid-run (after a metadata
//! change, so metacopy=on reads through a metadata-only copy first), with
//! each option set, on the kernel and on rovl.
//!
//! Env: ROVL_FSX_OPS (default 3000; the long run is 100000),
//! ROVL_FSX_SEED (default 1).

mod common;

use common::*;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

const MAXLEN: usize = 256 * 1024;
const MAXOP: usize = 64 * 1024;
const PAGE: usize = 4096;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// xorshift64*: the sequence of a seed never changes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    MapRead,
    MapWrite,
    Truncate,
    Falloc,
    FallocKeep,
    Punch,
    Zero,
    CopyRange,
    Reopen,
}

const KINDS: [Kind; 11] = [
    Kind::Read,
    Kind::Write,
    Kind::MapRead,
    Kind::MapWrite,
    Kind::Truncate,
    Kind::Falloc,
    Kind::FallocKeep,
    Kind::Punch,
    Kind::Zero,
    Kind::CopyRange,
    Kind::Reopen,
];

struct Fsx {
    rng: Rng,
    file: File,
    path: std::path::PathBuf,
    model: Vec<u8>,
    /// Operations the filesystem refuses (EOPNOTSUPP), on both sides alike.
    unsupported: Vec<Kind>,
    log: Vec<String>,
}

fn os_err() -> std::io::Error {
    std::io::Error::last_os_error()
}

impl Fsx {
    fn fail(&self, what: String) -> ! {
        let tail: Vec<&String> = self.log.iter().rev().take(12).collect();
        panic!(
            "fsx {:?}: {what}\nlast operations (newest first): {tail:#?}",
            self.path
        );
    }

    fn check_size(&self) {
        let size = self.file.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
        if size != self.model.len() as u64 {
            self.fail(format!("size {size}, expected {}", self.model.len()));
        }
    }

    fn check_all(&self, when: &str) {
        let mut buf = vec![0u8; self.model.len()];
        let n = self
            .file
            .read_at(&mut buf, 0)
            .unwrap_or_else(|e| self.fail(format!("{when}: read: {e}")));
        if n != buf.len() || buf != self.model {
            let at = buf.iter().zip(&self.model).position(|(a, b)| a != b);
            self.fail(format!(
                "{when}: content differs (read {n} of {}, first difference at {at:?})",
                self.model.len()
            ));
        }
    }

    fn range(&mut self, within: usize) -> (usize, usize) {
        let off = self.rng.below(within);
        let len = 1 + self.rng.below(MAXOP.min(within - off));
        (off, len)
    }

    fn step(&mut self, kinds: &[Kind]) {
        let kind = kinds[self.rng.below(kinds.len())];
        if self.unsupported.contains(&kind) {
            return;
        }
        let size = self.model.len();
        let fd = self.file.as_raw_fd();
        match kind {
            Kind::Read => {
                let (off, len) = self.range(MAXLEN);
                self.log.push(format!("read {off}+{len}"));
                let mut buf = vec![0u8; len];
                let n = self
                    .file
                    .read_at(&mut buf, off as u64)
                    .unwrap_or_else(|e| self.fail(format!("read: {e}")));
                let want = &self.model[off.min(size)..(off + len).min(size)];
                if &buf[..n] != want {
                    self.fail(format!("read {off}+{len}: got {n} bytes, other data"));
                }
            }
            Kind::Write => {
                let (off, len) = self.range(MAXLEN);
                self.log.push(format!("write {off}+{len}"));
                let data = self.rng.bytes(len);
                self.file
                    .write_all_at(&data, off as u64)
                    .unwrap_or_else(|e| self.fail(format!("write: {e}")));
                if self.model.len() < off + len {
                    self.model.resize(off + len, 0);
                }
                self.model[off..off + len].copy_from_slice(&data);
            }
            Kind::MapRead | Kind::MapWrite => {
                if size == 0 {
                    return;
                }
                let (off, len) = self.range(size);
                let start = off / PAGE * PAGE;
                let maplen = off + len - start;
                let write = kind == Kind::MapWrite;
                self.log.push(format!("{kind:?} {off}+{len}"));
                let prot = if write {
                    libc::PROT_READ | libc::PROT_WRITE
                } else {
                    libc::PROT_READ
                };
                // SAFETY: a fresh shared mapping of our own fd within its
                // size; every access stays inside [0, maplen).
                unsafe {
                    let p = libc::mmap(
                        std::ptr::null_mut(),
                        maplen,
                        prot,
                        libc::MAP_SHARED,
                        fd,
                        start as libc::off_t,
                    );
                    if p == libc::MAP_FAILED {
                        self.fail(format!("mmap: {}", os_err()));
                    }
                    let m = std::slice::from_raw_parts_mut(p.cast::<u8>(), maplen);
                    let r = &mut m[off - start..];
                    if write {
                        let data = self.rng.bytes(len);
                        r.copy_from_slice(&data);
                        self.model[off..off + len].copy_from_slice(&data);
                        if libc::msync(p, maplen, libc::MS_SYNC) != 0 {
                            self.fail(format!("msync: {}", os_err()));
                        }
                    } else if r != &self.model[off..off + len] {
                        self.fail(format!("mapread {off}+{len}: other data"));
                    }
                    libc::munmap(p, maplen);
                }
            }
            Kind::Truncate => {
                let to = self.rng.below(MAXLEN);
                self.log.push(format!("truncate {to}"));
                self.file
                    .set_len(to as u64)
                    .unwrap_or_else(|e| self.fail(format!("truncate: {e}")));
                self.model.resize(to, 0);
            }
            Kind::Falloc | Kind::FallocKeep | Kind::Punch | Kind::Zero => {
                let (off, len) = self.range(MAXLEN);
                let mode = match kind {
                    Kind::Falloc => 0,
                    Kind::FallocKeep => libc::FALLOC_FL_KEEP_SIZE,
                    Kind::Punch => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    _ => libc::FALLOC_FL_ZERO_RANGE,
                };
                self.log.push(format!("{kind:?} {off}+{len}"));
                // SAFETY: plain syscall on our fd.
                let rc =
                    unsafe { libc::fallocate(fd, mode, off as libc::off_t, len as libc::off_t) };
                if rc != 0 {
                    let e = os_err();
                    if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                        self.unsupported.push(kind);
                        return;
                    }
                    self.fail(format!("{kind:?}: {e}"));
                }
                let end = off + len;
                if matches!(kind, Kind::Punch | Kind::Zero) {
                    let stop = end.min(self.model.len());
                    if off < stop {
                        self.model[off..stop].fill(0);
                    }
                }
                if matches!(kind, Kind::Falloc | Kind::Zero) && self.model.len() < end {
                    self.model.resize(end, 0);
                }
            }
            Kind::CopyRange => {
                if size == 0 {
                    return;
                }
                let (src, len) = self.range(size);
                let dst = self.rng.below(MAXLEN - len);
                if src < dst + len && dst < src + len {
                    return; // overlapping ranges of one file: EINVAL by design
                }
                self.log.push(format!("copy_range {src}+{len} -> {dst}"));
                let (mut so, mut dof) = (src as libc::loff_t, dst as libc::loff_t);
                // SAFETY: offsets are valid out-params; the fd is ours.
                let n = unsafe { libc::copy_file_range(fd, &mut so, fd, &mut dof, len, 0) };
                if n < 0 {
                    let e = os_err();
                    if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EXDEV)) {
                        self.unsupported.push(kind);
                        return;
                    }
                    self.fail(format!("copy_file_range: {e}"));
                }
                let n = n as usize;
                let data = self.model[src..src + n].to_vec();
                if self.model.len() < dst + n {
                    self.model.resize(dst + n, 0);
                }
                self.model[dst..dst + n].copy_from_slice(&data);
            }
            Kind::Reopen => {
                self.log.push("reopen".into());
                self.file = open_rw(&self.path);
            }
        }
        self.check_size();
    }
}

fn open_rw(p: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(p)
        .unwrap_or_else(|e| panic!("open {p:?}: {e}"))
}

/// Runs the checker on `name` in a mount of `l` with `opts`; a lower file
/// is first only read (and chmodded), then opened for writing.
fn run(b: Backend, opts: &str, lower: bool) {
    let nops = env_num("ROVL_FSX_OPS", 3000) as usize;
    let seed = env_num("ROVL_FSX_SEED", 1);
    let l = Layers::new(1);
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut model = Vec::new();
    if lower {
        let len = MAXLEN / 2 + rng.below(MAXLEN / 2);
        model = rng.bytes(len);
        write(l.l(0, "f"), &model);
    }
    let m = mount_opts(b, &l, opts);
    let path = l.m("f");
    let read_only = [Kind::Read, Kind::MapRead];
    let mut fsx = Fsx {
        rng,
        file: if lower {
            File::open(&path).expect("open lower file")
        } else {
            open_rw(&path)
        },
        path: path.clone(),
        model,
        unsupported: Vec::new(),
        log: Vec::new(),
    };
    for i in 0..nops {
        if lower && i == nops / 6 {
            // A metadata change: with metacopy=on a metadata-only copy.
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o640))
                .expect("chmod");
        }
        if lower && i == nops / 3 {
            fsx.log.push("open for writing (copy-up)".into());
            fsx.file = open_rw(&path);
        }
        let kinds: &[Kind] = if lower && i < nops / 3 {
            &read_only
        } else {
            &KINDS
        };
        fsx.step(kinds);
        if i % 256 == 255 {
            fsx.check_all(&format!("after op {i}"));
        }
    }
    fsx.check_all("at the end");
    if !fsx.unsupported.is_empty() {
        eprintln!(
            "fsx {b:?} {opts}: refused (EOPNOTSUPP): {:?}",
            fsx.unsupported
        );
    }
    drop(fsx.file);
    m.unmount();
    let _m = mount_opts(b, &l, opts);
    let got = read(&path);
    assert!(
        got == fsx.model,
        "fsx {path:?} after a remount: {} bytes, expected {} (other data: {})",
        got.len(),
        fsx.model.len(),
        got.len() == fsx.model.len()
    );
}

macro_rules! fsx_tests {
    ($($name:ident: $opts:expr, $kernel:expr;)*) => {
        $(
            mod $name {
                use super::*;
                #[test]
                fn new_file_rovl() {
                    if require_root_fuse() {
                        run(Backend::Rovl, $opts, false);
                    }
                }
                #[test]
                fn lower_file_rovl() {
                    if require_root_fuse() {
                        run(Backend::Rovl, $opts, true);
                    }
                }
                #[test]
                fn new_file_kernel() {
                    if $kernel && require_kernel_overlay() {
                        run(Backend::Kernel, $opts, false);
                    }
                }
                #[test]
                fn lower_file_kernel() {
                    if $kernel && require_kernel_overlay() {
                        run(Backend::Kernel, $opts, true);
                    }
                }
            }
        )*
    };
}

fsx_tests! {
    default_opts: "index=off,metacopy=off", true;
    index_on: "index=on", true;
    metacopy_on: "metacopy=on,redirect_dir=on", true;
    // FUSE passthrough is rovl's alone (`all` is the default).
    passthrough_upper: "passthrough=upper", false;
}

/// Over FUSE over io_uring, with data through rovl's rings (not passed
/// through): large reads and writes fill the entries' payload buffers.
mod io_uring {
    use super::*;

    fn run_on_rings(lower: bool) {
        if !require_root_fuse() {
            return;
        }
        if let Some(_on) = UringOn::new() {
            run(Backend::Rovl, "passthrough=off", lower);
        }
    }

    #[test]
    fn new_file_rovl() {
        run_on_rings(false);
    }

    #[test]
    fn lower_file_rovl() {
        run_on_rings(true);
    }
}
