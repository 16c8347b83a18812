//! rovl against kernel overlayfs, fuse-overlayfs, plain tmpfs and the FUSE
//! floor (`compare/floor.rs`: the tree served from memory through rovl's
//! session, no layer work) (issue 3).
//!
//! `cargo bench --bench compare` (as root). It mounts a tmpfs under a fresh
//! /tmp/rovl-bench.* dir, gives every subject its own identical copy of each
//! data set there, and runs each workload on each subject in turn, round by
//! round (the order rotating), so noise hits all alike. Every measurement
//! uses a fresh mount with a fresh upper dir; "cold" ones also drop the
//! kernel's caches, "warm" ones run the command once untimed first. The time
//! is the wall time of the whole command (`find`, `ls`, `tar`, ...), except
//! for fio, whose own I/O time is taken (its start-up alone costs ~0.3 s).
//!
//! rovl is the binary cargo builds for this bench (bench profile = release);
//! `ROVL_BIN` overrides it. Environment:
//! - `ROVL_BENCH_SCALE` (default 0.5, about 5 minutes here; 1 = the sizes: 20k-file tree,
//!   100k-entry dir, 16k-file tarball, 32 x 8 MiB copy-up, 1 GiB dd, 200k and 1M walks),
//! - `ROVL_BENCH_ROUNDS` (default 5), `ROVL_BENCH_ONLY=name,prefix,...` (`rss` = memory only),
//! - `ROVL_BENCH_MEM_SIZES=200000,1M,...`: entries of the memory walks, one workload
//!   each, not scaled (default 200k and 1M times the scale),
//! - `ROVL_BENCH_FUSE_OVERLAYFS=path:path` (default /usr/bin/fuse-overlayfs, 1.10 from apt),
//! - `ROVL_BENCH_FOVL2=path` (default /opt/fuse-overlayfs-2/bin/fuse-overlayfs, 2.0 from
//!   `cargo install fuse-overlayfs --root /opt/fuse-overlayfs-2`; empty to leave it out),
//! - `ROVL_BENCH_ROVL_VARIANTS=opts;opts` (default `passthrough=all`): more rovl subjects,
//!   each with these mount options added; empty for none,
//! - `ROVL_BENCH_JSON` (default `<target>/bench-compare.json`),
//! - `ROVL_BENCH_TIMEOUT` seconds per command (default 120),
//! - `ROVL_BENCH_URING=1`: FUSE-over-io_uring on for the run (rovl then uses
//!   it by default; add the variant `io_uring=off` to measure `/dev/fuse` too),
//! - `ROVL_BENCH_SESSION=own`: each workload process in a session of its own,
//!   apart from the daemons (as callers in containers or other terminals are;
//!   default `shared`: children of the bench, like the daemons).

#[path = "../tests/common/child.rs"]
mod child;
#[path = "compare/data.rs"]
mod data;
#[path = "compare/floor.rs"]
mod floor;
#[path = "compare/report.rs"]
mod report;
#[path = "compare/runner.rs"]
mod runner;
#[path = "compare/subject.rs"]
mod subject;
#[path = "uring_switch.rs"]
mod uring_switch;

use data::{DataSet, Dest, Sizes, STAT_LOWERS, TREE_SUB, TREE_TOP};
use report::{Sample, Status, SubjectResult, WorkloadResult};
use runner::Proc;
use std::borrow::Cow;
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use subject::{Kind, Source, Subject};

const DEFAULT_SCALE: f64 = 0.5;
const DEFAULT_ROUNDS: usize = 5;
/// Longest wait for a daemon to go idle (FORGETs handled) after a cache drop.
const FORGET_SETTLE_MAX: Duration = Duration::from_secs(30);
/// Entries of a memory walk that the per-command timeout is meant for; larger walks get more.
const MEM_TIMEOUT_ENTRIES: usize = 200_000;
const FOVL2_DEFAULT: &str = "/opt/fuse-overlayfs-2/bin/fuse-overlayfs";

// ---------------------------------------------------------------------------
// Workloads

#[derive(Clone, Copy, PartialEq, Eq)]
enum Cache {
    /// Fresh mount, one untimed run, then the timed one.
    Warm,
    /// Fresh mount, caches dropped.
    Cold,
    /// Fresh mount over a fresh copy: the workload writes.
    Fresh,
}

/// What a job needs to know.
struct Ctx<'a> {
    mnt: &'a Path,
    ds: DataSet,
    sizes: &'a Sizes,
    tarball: &'a Path,
}

impl Ctx<'_> {
    fn at(&self, rel: &str) -> String {
        self.mnt.join(rel).display().to_string()
    }
}

#[derive(Clone)]
struct Workload {
    name: Cow<'static, str>,
    about: &'static str,
    data: DataSet,
    cache: Cache,
    job: fn(&Ctx) -> Vec<Proc>,
    /// A tool the job runs that may be missing.
    needs: Option<&'static str>,
    /// Reads the daemon's RSS after the job and a cache drop (daemons only).
    memory: bool,
    /// Creates or changes files: more than the FUSE floor serves.
    writes: bool,
}

const fn w(
    name: &'static str,
    about: &'static str,
    data: DataSet,
    cache: Cache,
    job: fn(&Ctx) -> Vec<Proc>,
) -> Workload {
    Workload {
        name: Cow::Borrowed(name),
        about,
        data,
        cache,
        job,
        needs: None,
        memory: false,
        writes: false,
    }
}

const fn needs(mut wl: Workload, tool: &'static str) -> Workload {
    wl.needs = Some(tool);
    wl
}

const fn memory(mut wl: Workload) -> Workload {
    wl.memory = true;
    wl
}

const fn writes(mut wl: Workload) -> Workload {
    wl.writes = true;
    wl
}

const WORKLOADS: &[Workload] = &[
    w(
        "find-stat-warm",
        "find -printf %s (stats every entry) of the tree",
        DataSet::Tree,
        Cache::Warm,
        find_stat,
    ),
    w(
        "find-stat-cold",
        "find -printf %s of the tree on a fresh mount",
        DataSet::Tree,
        Cache::Cold,
        find_stat,
    ),
    w(
        "ls-lR-warm",
        "ls -lR of the tree",
        DataSet::Tree,
        Cache::Warm,
        ls_lr,
    ),
    w(
        "read-small-cold",
        "cat every small file of the tree",
        DataSet::Tree,
        Cache::Cold,
        read_small,
    ),
    w(
        "parallel-4-cold",
        "4 processes, each find+cat of a quarter of the tree",
        DataSet::Tree,
        Cache::Cold,
        parallel4,
    ),
    w(
        "ls-f-cold",
        "ls -f of the large merged dir",
        DataSet::Big,
        Cache::Cold,
        ls_f,
    ),
    w(
        "ls-l-cold",
        "ls -l of the large merged dir",
        DataSet::Big,
        Cache::Cold,
        ls_l,
    ),
    w(
        "ls-l-warm",
        "ls -l of the large merged dir",
        DataSet::Big,
        Cache::Warm,
        ls_l,
    ),
    w(
        "stat50-present-cold",
        "stat of every present name",
        DataSet::Stat50,
        Cache::Cold,
        stat_present,
    ),
    w(
        "stat50-present-warm",
        "stat of every present name",
        DataSet::Stat50,
        Cache::Warm,
        stat_present,
    ),
    w(
        "stat50-missing-cold",
        "stat of as many missing names",
        DataSet::Stat50,
        Cache::Cold,
        stat_missing,
    ),
    w(
        "stat50-missing-warm",
        "stat of as many missing names",
        DataSet::Stat50,
        Cache::Warm,
        stat_missing,
    ),
    needs(
        w(
            "git-status-warm",
            "git status in a repo in a lower",
            DataSet::Git,
            Cache::Warm,
            git_status,
        ),
        "git",
    ),
    needs(
        w(
            "git-status-cold",
            "git status in a repo in a lower",
            DataSet::Git,
            Cache::Cold,
            git_status,
        ),
        "git",
    ),
    writes(w(
        "tar-extract",
        "tar -xf of the tarball into a lower dir",
        DataSet::Scratch,
        Cache::Fresh,
        tar_extract,
    )),
    writes(w(
        "dd-write-fsync",
        "dd bs=1M conv=fsync of a new file",
        DataSet::Scratch,
        Cache::Fresh,
        dd_write,
    )),
    writes(needs(
        w(
            "fio-seqwrite-1m",
            "fio 1M sequential write of a new file, end_fsync",
            DataSet::Scratch,
            Cache::Fresh,
            fio_seqwrite,
        ),
        "fio",
    )),
    w(
        "rm-rf-lower",
        "rm -rf of a lower tree",
        DataSet::Remove,
        Cache::Fresh,
        rm_rf,
    ),
    writes(w(
        "copyup-append",
        "append 1 byte to each lower file",
        DataSet::CopyUp,
        Cache::Fresh,
        copyup_append,
    )),
    writes(w(
        "copyup-chmod",
        "chmod of every lower file",
        DataSet::CopyUp,
        Cache::Fresh,
        copyup_chmod,
    )),
    w(
        "dd-read-cold",
        "dd bs=1M of the lower file to /dev/null",
        DataSet::Data,
        Cache::Cold,
        dd_read,
    ),
    needs(
        w(
            "fio-randread-4k",
            "fio 4k random read of a quarter of the lower file",
            DataSet::Data,
            Cache::Cold,
            fio_randread,
        ),
        "fio",
    ),
    needs(
        w(
            "fio-seqread-1m",
            "fio 1M sequential read of the lower file",
            DataSet::Data,
            Cache::Cold,
            fio_seqread,
        ),
        "fio",
    ),
    // A template: one workload per entry count of `ROVL_BENCH_MEM_SIZES`.
    memory(w(
        "rss-after-walk",
        "daemon VmHWM/VmRSS after find -printf %s of a large tree and a cache drop",
        DataSet::Rss(0),
        Cache::Cold,
        rss_walk,
    )),
];

/// `1000000` -> `1M`, `200000` -> `200k`.
fn count_label(n: usize) -> String {
    if n >= 1_000_000 && n.is_multiple_of(1_000_000) {
        format!("{}M", n / 1_000_000)
    } else if n >= 1_000 && n.is_multiple_of(1_000) {
        format!("{}k", n / 1_000)
    } else {
        n.to_string()
    }
}

/// The workloads, the memory template expanded to one per walk size.
fn all_workloads(mem_sizes: &[usize]) -> Vec<Workload> {
    let mut out = Vec::new();
    for wl in WORKLOADS {
        if wl.memory {
            for &n in mem_sizes {
                let mut m = wl.clone();
                m.name = Cow::Owned(format!("{}-{}", wl.name, count_label(n)));
                m.data = DataSet::Rss(n);
                out.push(m);
            }
        } else {
            out.push(wl.clone());
        }
    }
    out
}

impl Workload {
    /// Memory walks larger than the usual one get proportionally longer.
    fn timeout(&self, base: Duration) -> Duration {
        match self.data {
            DataSet::Rss(n) if self.memory => {
                base.max(base.mul_f64(n as f64 / MEM_TIMEOUT_ENTRIES as f64))
            }
            _ => base,
        }
    }
}

fn tree_counts(s: &Sizes) -> (usize, usize) {
    let dirs = 1 + TREE_TOP + TREE_TOP * TREE_SUB;
    (dirs, TREE_TOP * TREE_SUB * s.tree_per_leaf())
}

fn find_stat(c: &Ctx) -> Vec<Proc> {
    let (dirs, files) = tree_counts(c.sizes);
    vec![Proc::new([
        "find".into(),
        c.at("tree"),
        "-printf".into(),
        "%y %s %m\\n".into(),
    ])
    .lines(dirs + files)]
}

fn ls_lr(c: &Ctx) -> Vec<Proc> {
    let (dirs, files) = tree_counts(c.sizes);
    // Per dir: a heading, "total", its entries; blank lines between dirs.
    let lines = 2 * dirs + (dirs - 1 + files) + (dirs - 1);
    vec![Proc::new(["ls".into(), "-lR".into(), c.at("tree")]).lines(lines)]
}

fn read_small(c: &Ctx) -> Vec<Proc> {
    vec![Proc::new([
        "find".into(),
        c.at("tree"),
        "-type".into(),
        "f".into(),
        "-exec".into(),
        "cat".into(),
        "{}".into(),
        "+".into(),
    ])]
}

fn parallel4(c: &Ctx) -> Vec<Proc> {
    (0..4)
        .map(|k| {
            let dirs = (0..TREE_TOP)
                .filter(|t| t % 4 == k)
                .map(|t| c.at(&format!("tree/t{t:02}")));
            Proc::sh("find \"$@\" -type f -exec cat {} + >/dev/null", dirs)
        })
        .collect()
}

fn ls_f(c: &Ctx) -> Vec<Proc> {
    vec![Proc::new(["ls".into(), "-f".into(), c.at("big")]).lines(c.sizes.big_entries + 2)]
}

fn ls_l(c: &Ctx) -> Vec<Proc> {
    vec![Proc::new(["ls".into(), "-l".into(), c.at("big")]).lines(c.sizes.big_entries + 1)]
}

fn stat_names(c: &Ctx, names: Vec<String>) -> Proc {
    Proc::new(
        ["stat".to_string(), "-c".into(), "%i".into()]
            .into_iter()
            .chain(names),
    )
    .cwd(c.mnt.join("d"))
}

fn stat_present(c: &Ctx) -> Vec<Proc> {
    let names = data::stat50_present(c.sizes);
    let n = names.len();
    vec![stat_names(c, names).lines(n)]
}

fn stat_missing(c: &Ctx) -> Vec<Proc> {
    vec![stat_names(c, data::stat50_missing(c.sizes))
        .lines(0)
        .ok_codes(&[1])]
}

fn git_status(c: &Ctx) -> Vec<Proc> {
    let repo = c.at("repo");
    vec![Proc::new([
        "git",
        "-C",
        &repo,
        "--no-optional-locks",
        "status",
        "--porcelain",
    ])
    .lines(0)]
}

fn tar_extract(c: &Ctx) -> Vec<Proc> {
    vec![Proc::new([
        "tar".into(),
        "-xf".into(),
        c.tarball.display().to_string(),
        "-C".into(),
        c.at("x"),
    ])]
}

fn dd_write(c: &Ctx) -> Vec<Proc> {
    let of = format!("of={}", c.at("x/dd.bin"));
    let count = format!("count={}", c.sizes.data_mib);
    vec![Proc::new([
        "dd",
        "if=/dev/zero",
        &of,
        "bs=1M",
        &count,
        "conv=fsync",
        "status=none",
    ])]
}

fn dd_read(c: &Ctx) -> Vec<Proc> {
    let inf = format!("if={}", c.at("data/big.bin"));
    vec![Proc::new([
        "dd",
        &inf,
        "of=/dev/null",
        "bs=1M",
        "status=none",
    ])]
}

fn fio(c: &Ctx, file: &str, args: &[&str]) -> Vec<Proc> {
    let mut argv = vec![
        "fio".to_string(),
        "--name=bench".into(),
        format!("--filename={}", c.at(file)),
        format!("--size={}M", c.sizes.data_mib),
        "--ioengine=psync".into(),
        "--fallocate=none".into(),
        "--randrepeat=1".into(),
        "--minimal".into(),
    ];
    argv.extend(args.iter().map(|a| a.to_string()));
    vec![Proc::new(argv).reported(fio_secs)]
}

/// The I/O time fio reports (KiB moved / KiB/s, reads plus writes), from
/// its terse v3 line: fields 6-7 are read KiB and KiB/s, 47-48 the same for writes.
fn fio_secs(out: &str) -> Result<f64, String> {
    let line = out
        .lines()
        .find(|l| l.starts_with("3;"))
        .ok_or("no terse v3 line")?;
    let f: Vec<&str> = line.split(';').collect();
    let num = |i: usize| {
        f.get(i - 1)
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or(format!("field {i}"))
    };
    let mut secs = 0.0;
    for (kib, bw) in [(6, 7), (47, 48)] {
        if num(kib)? > 0.0 {
            secs += num(kib)? / num(bw)?.max(1.0);
        }
    }
    if secs > 0.0 {
        Ok(secs)
    } else {
        Err("no I/O reported".into())
    }
}

fn fio_randread(c: &Ctx) -> Vec<Proc> {
    let io = format!("--io_size={}M", (c.sizes.data_mib / 4).max(1));
    fio(
        c,
        "data/big.bin",
        &["--readonly", "--rw=randread", "--bs=4k", &io],
    )
}

fn fio_seqread(c: &Ctx) -> Vec<Proc> {
    fio(c, "data/big.bin", &["--readonly", "--rw=read", "--bs=1M"])
}

fn fio_seqwrite(c: &Ctx) -> Vec<Proc> {
    fio(c, "x/fio.out", &["--rw=write", "--bs=1M", "--end_fsync=1"])
}

fn rm_rf(c: &Ctx) -> Vec<Proc> {
    vec![Proc::new(["rm".into(), "-rf".into(), c.at("victim")])]
}

fn cu_files(c: &Ctx) -> Vec<String> {
    (0..c.sizes.cu_files)
        .map(|i| c.at(&format!("cu/f{i:02}")))
        .collect()
}

fn copyup_append(c: &Ctx) -> Vec<Proc> {
    vec![Proc::sh("for f; do printf x >> \"$f\"; done", cu_files(c))]
}

fn copyup_chmod(c: &Ctx) -> Vec<Proc> {
    vec![Proc::new(
        ["chmod".to_string(), "0600".into()]
            .into_iter()
            .chain(cu_files(c)),
    )]
}

fn rss_walk(c: &Ctx) -> Vec<Proc> {
    let DataSet::Rss(n) = c.ds else {
        return Vec::new();
    };
    let (dirs, files) = data::rss_counts(n);
    let lines = 1 + dirs + files;
    vec![Proc::new(["find".into(), c.at("rss"), "-printf".into(), "%s\\n".into()]).lines(lines)]
}

// ---------------------------------------------------------------------------
// Configuration

struct Config {
    scale: f64,
    rounds: usize,
    only: Option<Vec<String>>,
    json: PathBuf,
    rovl: PathBuf,
    /// fuse-overlayfs binaries, with how to install each.
    fuse_overlayfs: Vec<(PathBuf, &'static str)>,
    mem_sizes: Vec<usize>,
    workloads: Vec<Workload>,
    timeout: Duration,
    /// Workloads run in sessions of their own (`ROVL_BENCH_SESSION=own`).
    own_session: bool,
    /// Extra rovl subjects: mount options added to each.
    rovl_variants: Vec<String>,
}

/// `200000`, `200k` or `1M`.
fn parse_count(v: &str) -> Option<usize> {
    let v = v.trim();
    let (num, mul) = match v.as_bytes().last()? {
        b'k' | b'K' => (&v[..v.len() - 1], 1_000),
        b'm' | b'M' => (&v[..v.len() - 1], 1_000_000),
        _ => (v, 1),
    };
    num.parse::<usize>()
        .ok()?
        .checked_mul(mul)
        .filter(|&n| n > 0)
}

fn env_parse<T: std::str::FromStr>(name: &str, default: T) -> Result<T, String> {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().map_err(|_| format!("bad {name}={v}")),
        Err(_) => Ok(default),
    }
}

impl Config {
    fn from_env() -> Result<Config, String> {
        let scale: f64 = env_parse("ROVL_BENCH_SCALE", DEFAULT_SCALE)?;
        if !(scale > 0.0 && scale.is_finite()) {
            return Err(format!("ROVL_BENCH_SCALE must be positive, not {scale}"));
        }
        let rounds: usize = env_parse("ROVL_BENCH_ROUNDS", DEFAULT_ROUNDS)?;
        if rounds == 0 {
            return Err("ROVL_BENCH_ROUNDS must be at least 1".into());
        }
        let only = std::env::var("ROVL_BENCH_ONLY").ok().map(|v| {
            v.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
        });
        let mem_sizes = match std::env::var("ROVL_BENCH_MEM_SIZES") {
            Ok(v) => v
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| parse_count(s).ok_or(format!("bad ROVL_BENCH_MEM_SIZES entry {s:?}")))
                .collect::<Result<Vec<_>, _>>()?,
            Err(_) => data::mem_sizes(scale),
        };
        let workloads = all_workloads(&mem_sizes);
        if let Some(only) = &only {
            for pat in only {
                if !workloads.iter().any(|w| w.name.starts_with(pat.as_str())) {
                    let names: Vec<&str> = workloads.iter().map(|w| w.name.as_ref()).collect();
                    return Err(format!(
                        "ROVL_BENCH_ONLY: no workload {pat:?}; known: {}",
                        names.join(",")
                    ));
                }
            }
        }
        let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .unwrap_or(Path::new("."));
        let json = std::env::var_os("ROVL_BENCH_JSON")
            .map(PathBuf::from)
            .unwrap_or_else(|| target.join("bench-compare.json"));
        let rovl = std::env::var_os("ROVL_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_rovl")));
        const APT: &str = "apt-get install fuse-overlayfs";
        let mut fuse_overlayfs: Vec<(PathBuf, &'static str)> =
            match std::env::var("ROVL_BENCH_FUSE_OVERLAYFS") {
                Ok(v) => v
                    .split(':')
                    .filter(|s| !s.is_empty())
                    .map(|p| (PathBuf::from(p), APT))
                    .collect(),
                Err(_) => vec![(PathBuf::from("/usr/bin/fuse-overlayfs"), APT)],
            };
        let fovl2 = std::env::var("ROVL_BENCH_FOVL2").unwrap_or_else(|_| FOVL2_DEFAULT.into());
        if !fovl2.is_empty() {
            fuse_overlayfs.push((
                PathBuf::from(fovl2),
                "cargo install fuse-overlayfs --root /opt/fuse-overlayfs-2",
            ));
        }
        let timeout = Duration::from_secs(env_parse("ROVL_BENCH_TIMEOUT", 120u64)?);
        let own_session = match std::env::var("ROVL_BENCH_SESSION").as_deref() {
            Ok("own") => true,
            Ok("shared") | Err(_) => false,
            Ok(v) => return Err(format!("ROVL_BENCH_SESSION must be own or shared, not {v}")),
        };
        let rovl_variants = std::env::var("ROVL_BENCH_ROVL_VARIANTS")
            .unwrap_or_else(|_| "passthrough=all".into())
            .split(';')
            .filter(|v| !v.is_empty())
            .map(String::from)
            .collect();
        Ok(Config {
            scale,
            rounds,
            only,
            json,
            rovl,
            fuse_overlayfs,
            mem_sizes,
            workloads,
            timeout,
            own_session,
            rovl_variants,
        })
    }

    fn selected(&self, w: &Workload) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|p| w.name.starts_with(p.as_str())))
    }
}

// ---------------------------------------------------------------------------
// Interruption: Ctrl-C stops after the current measurement, and every
// guard still unmounts on the way out.

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

fn stopped() -> bool {
    STOP.load(Ordering::SeqCst)
}

// ---------------------------------------------------------------------------
// The bench tmpfs

/// A tmpfs we mounted; unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path) -> Result<Tmpfs, String> {
        fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        data::run_quiet(
            Command::new("mount")
                // No inode cap: the 1M-entry memory trees, one copy per daemon, exceed the default.
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    "size=75%,nr_inodes=0,mode=0755",
                    "rovl-bench",
                ])
                .arg(dir),
        )?;
        let guard = Tmpfs(dir.to_path_buf());
        match subject::mounted_type(dir).as_deref() {
            Some("tmpfs") => Ok(guard),
            other => Err(format!(
                "{}: expected a tmpfs, found {other:?}",
                dir.display()
            )),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Err(e) = subject::umount_retry(&self.0) {
            eprintln!("compare: unmounting {}: {e}", self.0.display());
        }
    }
}

// ---------------------------------------------------------------------------
// Subjects

fn tool_version(bin: &Path, marker: &str) -> Option<String> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    text.lines()
        .find_map(|l| l.split_once(marker).map(|(_, v)| v.trim().to_string()))
}

/// Every subject that could run here; `notes` gets the ones that cannot.
fn discover(cfg: &Config, fsdir: &Path, mnts: &Path, notes: &mut Vec<String>) -> Vec<Subject> {
    let mut kinds: Vec<(String, Kind)> = vec![("kernel".into(), Kind::Kernel)];
    for (bin, install) in &cfg.fuse_overlayfs {
        if !bin.exists() {
            notes.push(format!(
                "fuse-overlayfs: {} not installed ({install}); skipped",
                bin.display()
            ));
            continue;
        }
        let mut name = match tool_version(bin, "fuse-overlayfs: version") {
            Some(v) => format!("fuse-overlayfs-{v}"),
            None => format!("fuse-overlayfs({})", bin.display()),
        };
        if kinds.iter().any(|(n, _)| *n == name) {
            name = format!("{name}#{}", kinds.len());
        }
        kinds.push((name, Kind::FuseOverlayfs(bin.clone())));
    }
    if cfg.rovl.exists() {
        kinds.push(("rovl".into(), Kind::Rovl(cfg.rovl.clone(), String::new())));
        for v in &cfg.rovl_variants {
            kinds.push((
                format!("rovl({v})"),
                Kind::Rovl(cfg.rovl.clone(), v.clone()),
            ));
        }
    } else {
        notes.push(format!(
            "rovl: {} missing (cargo build --release); skipped",
            cfg.rovl.display()
        ));
    }
    kinds.push(("tmpfs".into(), Kind::Tmpfs));
    match std::env::current_exe() {
        Ok(me) => kinds.push(("fuse floor".into(), Kind::FuseFloor(me))),
        Err(e) => notes.push(format!("fuse floor: this bench's path: {e}; skipped")),
    }
    let mut out = Vec::new();
    for (i, (name, kind)) in kinds.into_iter().enumerate() {
        let mnt = mnts.join(format!("m{i}"));
        let made = fs::create_dir_all(&mnt).and_then(|_| mnt.canonicalize());
        match made {
            Ok(mnt) => out.push(Subject {
                data: fsdir.join(format!("s{i}")),
                name,
                kind,
                mnt,
            }),
            Err(e) => notes.push(format!("{name}: mountpoint: {e}; skipped")),
        }
    }
    out
}

/// Mounts each subject once over a tiny data set; drops those that fail.
fn probe(subjects: Vec<Subject>, sizes: &Sizes, notes: &mut Vec<String>) -> Vec<Subject> {
    subjects
        .into_iter()
        .filter(|s| {
            let dir = s.data.join("probe");
            let r = ensure_data(s, &dir, DataSet::Scratch, sizes)
                .and_then(|()| mount_once(s, &dir, DataSet::Scratch, sizes, false, |_| Ok(())));
            let _ = fs::remove_dir_all(&dir);
            if let Err(e) = &r {
                notes.push(format!("{}: cannot mount: {e}; skipped", s.name));
            }
            r.is_ok()
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Measuring

/// Layer dirs of a data set for a subject, top first.
fn layer_dirs(dir: &Path, ds: DataSet) -> Vec<PathBuf> {
    (0..ds.lowers())
        .map(|i| dir.join(format!("l{i:02}")))
        .collect()
}

/// Generates a subject's persistent copy of a data set in `dir` unless it exists:
/// the layers, or for the floor the merged view.
fn ensure_data(s: &Subject, dir: &Path, ds: DataSet, sizes: &Sizes) -> Result<(), String> {
    let done = dir.join(".complete");
    if done.exists() {
        return Ok(());
    }
    let dest = if s.is_overlay() {
        let l = layer_dirs(dir, ds);
        for d in &l {
            fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        Dest::Layers(l)
    } else {
        Dest::Flat(dir.join("flat"))
    };
    ds.generate(sizes, &dest)?;
    fs::write(&done, b"").map_err(|e| e.to_string())
}

static RUN_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Mounts `ds` (already in `dir`) for `s` with a fresh upper (for the floor,
/// a fresh copy if `fresh`), checks the data shows, runs `f`, unmounts and
/// cleans up.
fn mount_once<T>(
    s: &Subject,
    dir: &Path,
    ds: DataSet,
    sizes: &Sizes,
    fresh: bool,
    f: impl FnOnce(&subject::Mount) -> Result<T, String>,
) -> Result<T, String> {
    let run = dir.join(format!("run-{}", RUN_ID.fetch_add(1, Ordering::Relaxed)));
    let result = (|| {
        fs::create_dir_all(&run).map_err(|e| format!("{}: {e}", run.display()))?;
        let lowers = layer_dirs(dir, ds);
        let flat = if fresh {
            run.join("flat")
        } else {
            dir.join("flat")
        };
        let src = if s.is_overlay() {
            Source::Overlay {
                lowers: &lowers,
                run: &run,
            }
        } else {
            if fresh {
                ds.generate(sizes, &Dest::Flat(flat.clone()))?;
            }
            Source::Flat {
                dir: &flat,
                run: &run,
            }
        };
        let m = s.mount(src)?;
        let root = m.mnt.join(ds.root_entry());
        fs::symlink_metadata(&root)
            .map_err(|e| format!("{} in the mount: {e}", ds.root_entry()))?;
        let out = f(&m)?;
        m.unmount()?;
        Ok(out)
    })();
    let _ = fs::remove_dir_all(&run);
    result
}

/// One measurement of `w` on `s`.
fn measure(
    s: &Subject,
    w: &Workload,
    sizes: &Sizes,
    tarball: &Path,
    cfg: &Config,
    scratch: &Path,
) -> Result<Sample, String> {
    let dir = s.data.join(w.data.dir_name());
    let timeout = w.timeout(cfg.timeout);
    mount_once(s, &dir, w.data, sizes, w.cache == Cache::Fresh, |m| {
        let ctx = Ctx {
            mnt: &m.mnt,
            ds: w.data,
            sizes,
            tarball,
        };
        let job = (w.job)(&ctx);
        match w.cache {
            Cache::Warm => {
                runner::run(&job, timeout, scratch, cfg.own_session)
                    .map_err(|e| format!("warm-up: {e}"))?;
            }
            Cache::Cold => runner::drop_caches()?,
            Cache::Fresh => {}
        }
        let t = runner::run(&job, timeout, scratch, cfg.own_session)?;
        let secs = t.reported.unwrap_or(t.wall.as_secs_f64());
        let rss = if w.memory {
            let pid = m.daemon_pid().ok_or("no daemon to measure")?;
            let (_, walked) = runner::rss_kib(pid)?;
            runner::drop_caches()?;
            let ((peak, now), settled) = runner::settled_rss_kib(pid, FORGET_SETTLE_MAX)?;
            if settled >= FORGET_SETTLE_MAX {
                eprintln!(
                    "compare: {} {}: daemon still busy {FORGET_SETTLE_MAX:?} after the cache drop",
                    s.name, w.name
                );
            }
            Some(report::Rss {
                peak,
                walked,
                now,
                settle_ms: settled.as_millis() as u64,
            })
        } else {
            None
        };
        Ok(Sample { secs, rss })
    })
}

fn have_tool(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn machine() -> Vec<(String, String)> {
    let read = |p: &str| fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let mem = read("/proc/meminfo")
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .nth(1)
        .unwrap_or("0")
        .parse::<u64>()
        .unwrap_or(0)
        >> 20;
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    vec![
        (
            "kernel".into(),
            read("/proc/sys/kernel/osrelease").trim().to_string(),
        ),
        ("cpu".into(), format!("{cpus} x {cpu}")),
        ("memory".into(), format!("{mem} GiB")),
    ]
}

fn run(cfg: &Config) -> Result<(), String> {
    let started = Instant::now();
    let tmp = tempfile::Builder::new()
        .prefix("rovl-bench.")
        .tempdir_in("/tmp")
        .map_err(|e| format!("temp dir: {e}"))?;
    let base = tmp.path().canonicalize().map_err(|e| e.to_string())?;
    let scratch = base.join("scratch");
    fs::create_dir_all(&scratch).map_err(|e| e.to_string())?;
    // Declared after `tmp`, so it is unmounted before the dir is removed.
    let tmpfs = Tmpfs::mount(&base.join("fs"))?;
    let sizes = Sizes::new(cfg.scale);
    let mut notes = Vec::new();
    let subjects = discover(cfg, &tmpfs.0, &base.join("mnt"), &mut notes);
    let subjects = probe(subjects, &sizes, &mut notes);

    let workloads: Vec<&Workload> = cfg.workloads.iter().filter(|w| cfg.selected(w)).collect();
    let info = machine();
    println!(
        "rovl compare: scale {} x {} rounds, {} workloads, data on tmpfs at {}",
        cfg.scale,
        cfg.rounds,
        workloads.len(),
        tmpfs.0.display()
    );
    for (k, v) in &info {
        println!("   {k}: {v}");
    }
    let names: Vec<String> = subjects.iter().map(|s| s.name.clone()).collect();
    println!("   subjects: {}", names.join(", "));
    println!(
        "   workloads run {}",
        if cfg.own_session {
            "in sessions of their own (ROVL_BENCH_SESSION=own)"
        } else {
            "in the bench's session, with the daemons"
        }
    );
    for n in &notes {
        println!("   note: {n}");
    }
    if !subjects.iter().any(|s| s.name == report::KERNEL) {
        println!("   note: no kernel overlayfs; ratios are not available");
    }

    let tarball = if workloads.iter().any(|w| w.name == "tar-extract") {
        let d = tmpfs.0.join("shared");
        fs::create_dir_all(&d).map_err(|e| e.to_string())?;
        data::make_tarball(&d, &sizes)?
    } else {
        PathBuf::new()
    };

    // Data sets are dropped once no later workload needs them.
    let mut uses: HashMap<DataSet, usize> = HashMap::new();
    for w in &workloads {
        *uses.entry(w.data).or_default() += 1;
    }

    let mut results: Vec<WorkloadResult> = Vec::new();
    for w in &workloads {
        if stopped() {
            break;
        }
        let mut res = WorkloadResult {
            name: w.name.to_string(),
            about: format!("{} [{}]", w.about, w.data.describe(&sizes)),
            entries: match w.data {
                DataSet::Rss(n) if w.memory => Some(n),
                _ => None,
            },
            skipped: None,
            subjects: Vec::new(),
        };
        if let Some(tool) = w.needs.filter(|t| !have_tool(t)) {
            res.skipped = Some(format!("{tool} is not installed"));
        } else {
            for s in &subjects {
                let status = if w.memory && !s.has_daemon() {
                    Status::Skipped("no daemon".into())
                } else if w.writes && matches!(s.kind, Kind::FuseFloor(_)) {
                    Status::Skipped("the FUSE floor serves reads and removals only".into())
                } else {
                    // The floor copies fresh data for every write workload.
                    let floor_fresh = !s.is_overlay() && w.cache == Cache::Fresh;
                    let dir = s.data.join(w.data.dir_name());
                    match if floor_fresh {
                        Ok(())
                    } else {
                        ensure_data(s, &dir, w.data, &sizes)
                    } {
                        Ok(()) => Status::Ok,
                        Err(e) => Status::Failed(e),
                    }
                };
                res.subjects.push(SubjectResult {
                    subject: s.name.clone(),
                    samples: Vec::new(),
                    status,
                });
            }
            'rounds: for round in 0..cfg.rounds {
                for k in 0..subjects.len() {
                    if stopped() {
                        break 'rounds;
                    }
                    let i = (round + k) % subjects.len();
                    if !matches!(res.subjects[i].status, Status::Ok) {
                        continue;
                    }
                    match measure(&subjects[i], w, &sizes, &tarball, cfg, &scratch) {
                        Ok(sample) => res.subjects[i].samples.push(sample),
                        Err(e) => res.subjects[i].status = Status::Failed(e),
                    }
                }
            }
        }
        report::print_workload(&res);
        results.push(res);
        let left = uses.get_mut(&w.data).map(|n| {
            *n -= 1;
            *n
        });
        if left == Some(0) {
            for s in &subjects {
                let _ = fs::remove_dir_all(s.data.join(w.data.dir_name()));
            }
        }
    }

    report::print_summary(&results, &names);
    report::print_memory(&results, &names);
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "\ntotal time {elapsed:.0} s{}",
        if stopped() { " (interrupted)" } else { "" }
    );
    let mut header: Vec<(String, String)> = info
        .iter()
        .map(|(k, v)| (k.clone(), report::js(v)))
        .collect();
    header.extend([
        ("scale".to_string(), format!("{}", cfg.scale)),
        ("rounds".into(), cfg.rounds.to_string()),
        (
            "subjects".into(),
            format!(
                "[{}]",
                names
                    .iter()
                    .map(|n| report::js(n))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        (
            "notes".into(),
            format!(
                "[{}]",
                notes
                    .iter()
                    .map(|n| report::js(n))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        ("stat50_lowers".into(), STAT_LOWERS.to_string()),
        (
            "mem_sizes".into(),
            format!(
                "[{}]",
                cfg.mem_sizes
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        ("total_s".into(), format!("{elapsed:.1}")),
        ("interrupted".into(), stopped().to_string()),
    ]);
    let json = report::to_json(&header, &results);
    if let Some(d) = cfg.json.parent() {
        let _ = fs::create_dir_all(d);
    }
    fs::write(&cfg.json, json).map_err(|e| format!("writing {}: {e}", cfg.json.display()))?;
    println!("wrote {}", cfg.json.display());
    drop(tmpfs);
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if let [_, arg, tree, mnt] = &args[..] {
        if arg == floor::ARG {
            return match floor::serve(Path::new(tree), Path::new(mnt)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("fuse floor: {e}");
                    ExitCode::FAILURE
                }
            };
        }
    }
    // `cargo test --all-targets` runs benches without `--bench`: not the place for a 10-minute run.
    if !std::env::args().any(|a| a == "--bench") {
        println!("compare: run with `cargo bench --bench compare`; nothing to do here");
        return ExitCode::SUCCESS;
    }
    // SAFETY: no arguments.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: compare needs root (mounts)");
        return ExitCode::SUCCESS;
    }
    let cfg = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("compare: {e}");
            return ExitCode::FAILURE;
        }
    };
    install_signal_handlers();
    let uring = uring_switch::Uring::setup();
    eprintln!(
        "compare: FUSE over io_uring is {} (ROVL_BENCH_URING=1 turns it on for the run)",
        if uring.on() { "on" } else { "off" }
    );
    match run(&cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("compare: {e}");
            ExitCode::FAILURE
        }
    }
}
