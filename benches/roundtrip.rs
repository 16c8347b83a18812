//! One FUSE round trip, measured (issue 13): what a request costs on rovl,
//! on a minimal fuser filesystem (the floor of rovl's library and session
//! loop), on libfuse's `passthrough_hp`, and on the fuse-overlayfs
//! versions, against kernel overlayfs, in one interleaved run.
//!
//! `cargo bench --bench roundtrip` (as root). Each subject is mounted fresh
//! per round; on each mount three loops run, first unpinned (the scheduler
//! places every thread, as users get it) and then pinned (this thread and
//! every daemon thread on CPU 0, no cross-CPU wake-ups):
//! - `getxattr`: `fgetxattr` of a missing xattr on an open file, which the
//!   kernel never caches (one GETXATTR each),
//! - `stat-new`: `fstatat` of a name never used before (one LOOKUP each),
//! - `open-close`: `openat` + `close` of an existing file (OPEN, and
//!   FLUSH/RELEASE as the filesystem asks).
//!
//! A tight loop from one process is the best case: real callers (`tar`,
//! `ls`, an interpreter) see several times these figures unpinned here,
//! because their requests wake the daemon on the other, idle vCPU
//! (docs/benchmarks.md, "One round trip").
//!
//! Printed: the median time per call over the rounds, in µs, and the ratio
//! to the best FUSE subject of each column. Environment:
//! - `ROVL_BENCH_ROUNDS` (default 5), `ROVL_BENCH_CALLS` (default 20000),
//! - `ROVL_BIN` (default the binary cargo built),
//! - `ROVL_BENCH_PASSTHROUGH_HP` (default /opt/libfuse/bin/passthrough_hp;
//!   see docs/benchmarks.md for how to build it),
//! - `ROVL_BENCH_FUSE_OVERLAYFS` (default /usr/bin/fuse-overlayfs),
//!   `ROVL_BENCH_FOVL2` (default /opt/fuse-overlayfs-2/bin/fuse-overlayfs),
//! - `ROVL_BENCH_URING=1`: turn on FUSE-over-io_uring
//!   (`/sys/module/fuse/parameters/enable_uring`) for the run, and back.

#[path = "../tests/common/child.rs"]
mod child;
#[path = "uring_switch.rs"]
mod uring_switch;

use std::ffi::CString;
use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, UNIX_EPOCH};
use uring_switch::Uring;

const WAIT: Duration = Duration::from_secs(10);

#[derive(Clone)]
enum Kind {
    Kernel,
    /// rovl with these options added.
    Rovl(String),
    /// This bench, re-run as `--serve-minimal MNT [io_uring]`.
    FuserMinimal(bool),
    /// libfuse's example, with these arguments, over the lower dir.
    PassthroughHp(PathBuf, Vec<&'static str>),
    FuseOverlayfs(PathBuf),
}

#[derive(Clone)]
struct Subject {
    name: String,
    kind: Kind,
}

#[derive(Clone, Copy, PartialEq)]
enum Loop {
    Getxattr,
    StatNew,
    OpenClose,
}

const LOOPS: [(Loop, &str); 3] = [
    (Loop::Getxattr, "getxattr"),
    (Loop::StatNew, "stat-new"),
    (Loop::OpenClose, "open-close"),
];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--serve-minimal") {
        let uring = args.get(i + 2).is_some_and(|a| a == "io_uring");
        return minimal::serve(Path::new(&args[i + 1]), uring);
    }
    // `cargo test --all-targets` runs benches without `--bench`.
    if !args.iter().any(|a| a == "--bench") {
        println!("roundtrip: run with `cargo bench --bench roundtrip`; nothing to do here");
        return;
    }
    if rovl::sys::uid() != 0 {
        eprintln!("roundtrip: skipped: needs root (mounts)");
        return;
    }
    let rounds: usize = env_num("ROVL_BENCH_ROUNDS", 5);
    let calls: usize = env_num("ROVL_BENCH_CALLS", 20_000);
    let uring = Uring::setup();
    let subjects = subjects(uring.on());
    let root = tempdir();
    let lower = root.join("lower");
    fs::create_dir_all(lower.join("d")).unwrap();
    fs::write(lower.join("d/f"), b"data").unwrap();
    let mnt = root.join("mnt");
    fs::create_dir(&mnt).unwrap();

    // results[subject][loop][pinned] = per-call times of each round.
    let mut results = vec![[[vec![], vec![]], [vec![], vec![]], [vec![], vec![]]]; subjects.len()];
    for round in 0..rounds {
        for k in 0..subjects.len() {
            let s = (k + round) % subjects.len();
            let run = root.join(format!("run-{round}-{s}"));
            let m = match mount(&subjects[s], &lower, &run, &mnt) {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("roundtrip: {}: {e}", subjects[s].name);
                    continue;
                }
            };
            for (pinned, slot) in [(false, 0), (true, 1)] {
                if pinned {
                    m.pin(Some(0));
                }
                for (l, (lp, _)) in LOOPS.iter().enumerate() {
                    match time_loop(*lp, &mnt.join("d"), calls) {
                        Ok(t) => results[s][l][slot].push(t),
                        Err(e) => eprintln!("roundtrip: {}: {e}", subjects[s].name),
                    }
                }
            }
            m.pin(None);
            drop(m);
            let _ = fs::remove_dir_all(&run);
        }
    }
    report(&subjects, &mut results, calls, rounds);
    let _ = rovl::mountinfo::unmount_retry(&mnt);
    let _ = fs::remove_dir_all(&root);
}

fn env_num(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The subjects at hand; each missing one is named with how to get it.
fn subjects(uring: bool) -> Vec<Subject> {
    let sub = |name: &str, kind| Subject {
        name: name.into(),
        kind,
    };
    let mut v = vec![
        sub("kernel", Kind::Kernel),
        sub("rovl", Kind::Rovl(String::new())),
        sub(
            "rovl threads=1",
            Kind::Rovl("threads=1,io_uring=off".into()),
        ),
        sub("fuser minimal", Kind::FuserMinimal(false)),
    ];
    // rovl's default is io_uring where the kernel offers it.
    if uring {
        v.insert(
            2,
            sub("rovl io_uring=off", Kind::Rovl("io_uring=off".into())),
        );
        v.push(sub("fuser minimal io_uring", Kind::FuserMinimal(true)));
    }
    let hp = env_path(
        "ROVL_BENCH_PASSTHROUGH_HP",
        "/opt/libfuse/bin/passthrough_hp",
    );
    if hp.exists() {
        v.push(sub(
            "passthrough_hp 1 thread",
            Kind::PassthroughHp(hp.clone(), vec!["--single"]),
        ));
        v.push(sub(
            "passthrough_hp",
            Kind::PassthroughHp(hp.clone(), vec![]),
        ));
        if uring {
            v.push(sub(
                "passthrough_hp io_uring",
                Kind::PassthroughHp(hp, vec!["-o", "io_uring"]),
            ));
        } else {
            eprintln!(
                "roundtrip: passthrough_hp io_uring: skipped: FUSE-over-io_uring is off \
                 (ROVL_BENCH_URING=1 turns it on for the run)"
            );
        }
    } else {
        eprintln!(
            "roundtrip: passthrough_hp: skipped: {} is missing (build libfuse 3.18 as \
             docs/benchmarks.md says)",
            hp.display()
        );
    }
    let fovl1 = env_path("ROVL_BENCH_FUSE_OVERLAYFS", "/usr/bin/fuse-overlayfs");
    let fovl2 = env_path(
        "ROVL_BENCH_FOVL2",
        "/opt/fuse-overlayfs-2/bin/fuse-overlayfs",
    );
    for (name, bin, get) in [
        (
            "fuse-overlayfs 1.x",
            fovl1,
            "apt-get install fuse-overlayfs",
        ),
        (
            "fuse-overlayfs 2.0",
            fovl2,
            "cargo install fuse-overlayfs --version 2.0.0 --root /opt/fuse-overlayfs-2",
        ),
    ] {
        if bin.exists() {
            v.push(sub(name, Kind::FuseOverlayfs(bin)));
        } else {
            eprintln!(
                "roundtrip: {name}: skipped: {} is missing ({get})",
                bin.display()
            );
        }
    }
    v
}

fn env_path(key: &str, default: &str) -> PathBuf {
    PathBuf::from(std::env::var(key).unwrap_or_else(|_| default.into()))
}

fn tempdir() -> PathBuf {
    let nanos = UNIX_EPOCH.elapsed().unwrap().as_nanos();
    let d = std::env::temp_dir().join(format!("rovl-rt.{}.{nanos}", std::process::id()));
    fs::create_dir(&d).unwrap();
    d
}

/// A mounted subject; dropping it unmounts and reaps its daemon.
struct Mount {
    mnt: PathBuf,
    daemon: Option<Child>,
}

impl Mount {
    /// Sets the CPU mask of every daemon thread and of this thread: one
    /// CPU, or all of them.
    fn pin(&self, cpu: Option<usize>) {
        let mut tids = vec![0];
        if let Some(d) = &self.daemon {
            if let Ok(tasks) = fs::read_dir(format!("/proc/{}/task", d.id())) {
                tids.extend(
                    tasks
                        .flatten()
                        .filter_map(|t| t.file_name().to_str()?.parse::<i32>().ok()),
                );
            }
        }
        // SAFETY: cpu_set_t is plain data, set up by the CPU_* helpers.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            let n = std::thread::available_parallelism().map_or(1, |n| n.get());
            for c in 0..n {
                if cpu.is_none_or(|p| p == c) {
                    libc::CPU_SET(c, &mut set);
                }
            }
            for t in tids {
                libc::sched_setaffinity(t, std::mem::size_of_val(&set), &set);
            }
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        match &mut self.daemon {
            Some(c) => {
                let (r, _, exited) = child::stop(c, &self.mnt, WAIT);
                if let Err(e) = r {
                    eprintln!("roundtrip: umount {}: {e}", self.mnt.display());
                }
                if !exited {
                    eprintln!("roundtrip: daemon did not exit after unmount; killed");
                }
            }
            None => {
                let _ = rovl::mountinfo::unmount_retry(&self.mnt);
            }
        }
    }
}

fn mount(s: &Subject, lower: &Path, run: &Path, mnt: &Path) -> Result<Mount, String> {
    let (upper, work) = (run.join("upper"), run.join("work"));
    for d in [&upper, &work] {
        fs::create_dir_all(d).map_err(|e| format!("creating {}: {e}", d.display()))?;
    }
    let ovl = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    let mut cmd = match &s.kind {
        Kind::Kernel => {
            let st = Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o", &ovl])
                .arg(mnt)
                .status()
                .map_err(|e| e.to_string())?;
            if !st.success() {
                return Err(format!("mount -t overlay: {st}"));
            }
            return Ok(Mount {
                mnt: mnt.into(),
                daemon: None,
            });
        }
        Kind::Rovl(extra) => {
            let bin = std::env::var("ROVL_BIN").unwrap_or(env!("CARGO_BIN_EXE_rovl").into());
            let mut c = Command::new(bin);
            let opts = if extra.is_empty() {
                ovl
            } else {
                format!("{ovl},{extra}")
            };
            c.args(["mount", "-f", "-o", &opts]).arg(mnt);
            c
        }
        Kind::FuserMinimal(uring) => {
            let mut c = Command::new(std::env::current_exe().map_err(|e| e.to_string())?);
            c.arg("--serve-minimal").arg(mnt);
            if *uring {
                c.arg("io_uring");
            }
            c
        }
        Kind::PassthroughHp(bin, args) => {
            let mut c = Command::new(bin);
            c.arg("--foreground").args(args).arg(lower).arg(mnt);
            c
        }
        Kind::FuseOverlayfs(bin) => {
            let mut c = Command::new(bin);
            c.args(["-f", "-o", &ovl]).arg(mnt);
            c
        }
    };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("spawning {cmd:?}: {e}"))?;
    match child::wait_mounted(&mut child, mnt, WAIT, |_| true) {
        child::Mounted::Up(_) => Ok(Mount {
            mnt: mnt.into(),
            daemon: Some(child),
        }),
        child::Mounted::Exited(st) => Err(format!("exited ({st}) before mounting")),
        child::Mounted::TimedOut => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!("not mounted after {WAIT:?}"))
        }
    }
}

fn cstr(s: &[u8]) -> CString {
    CString::new(s).unwrap()
}

fn open(dir: &Path, flags: i32) -> Result<OwnedFd, String> {
    let p = cstr(dir.as_os_str().as_bytes());
    // SAFETY: a valid C string; the fd returned is ours alone.
    let fd = unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(format!(
            "open {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: just opened, owned here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Runs `n` calls of one loop in `dir` (which holds the file `f`) after a
/// warm-up; the time per call.
fn time_loop(l: Loop, dir: &Path, n: usize) -> Result<Duration, String> {
    let dfd = open(dir, libc::O_RDONLY | libc::O_DIRECTORY)?;
    // Held only for its loop: an open file would keep the open-close loop
    // from ever opening `f` first (rovl registers a backing file then).
    let ffd = match l {
        Loop::Getxattr => Some(open(&dir.join("f"), libc::O_RDONLY)?),
        _ => None,
    };
    let f = c"f";
    let xname = c"user.rovl.roundtrip";
    let stamp = UNIX_EPOCH.elapsed().unwrap().as_nanos();
    // Fresh names, made before the clock starts, for the LOOKUP loop only.
    let names: Vec<CString> = match l {
        Loop::StatNew => (0..n + n / 10)
            .map(|i| cstr(format!("n{stamp}.{i}").as_bytes()))
            .collect(),
        _ => Vec::new(),
    };
    let one = |i: usize| -> Result<(), String> {
        // SAFETY: valid fds and C strings; results checked.
        unsafe {
            match l {
                Loop::Getxattr => {
                    let fd = ffd.as_ref().map_or(-1, |f| f.as_raw_fd());
                    let r = libc::fgetxattr(fd, xname.as_ptr(), std::ptr::null_mut(), 0);
                    let e = std::io::Error::last_os_error().raw_os_error();
                    if r >= 0 || !matches!(e, Some(libc::ENODATA) | Some(libc::ENOTSUP)) {
                        return Err(format!("getxattr: {r} {e:?}"));
                    }
                }
                Loop::StatNew => {
                    let mut st: libc::stat = std::mem::zeroed();
                    let r = libc::fstatat(
                        dfd.as_raw_fd(),
                        names[i].as_ptr(),
                        &mut st,
                        libc::AT_SYMLINK_NOFOLLOW,
                    );
                    if r == 0
                        || std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOENT)
                    {
                        return Err("stat of a new name did not fail with ENOENT".into());
                    }
                }
                Loop::OpenClose => {
                    let fd = libc::openat(
                        dfd.as_raw_fd(),
                        f.as_ptr(),
                        libc::O_RDONLY | libc::O_CLOEXEC,
                    );
                    if fd < 0 {
                        return Err(format!("open: {}", std::io::Error::last_os_error()));
                    }
                    libc::close(fd);
                }
            }
        }
        Ok(())
    };
    let warm = n / 10;
    for i in 0..warm {
        one(n + i)?;
    }
    let start = Instant::now();
    for i in 0..n {
        one(i)?;
    }
    Ok(start.elapsed() / n as u32)
}

fn median(v: &mut [Duration]) -> Option<Duration> {
    if v.is_empty() {
        return None;
    }
    v.sort();
    Some(v[v.len() / 2])
}

fn report(
    subjects: &[Subject],
    results: &mut [[[Vec<Duration>; 2]; 3]],
    calls: usize,
    rounds: usize,
) {
    println!("\nround trip: median µs per call ({calls} calls, {rounds} rounds); (x) = ratio to the best FUSE subject");
    let mut med = vec![[[None; 2]; 3]; subjects.len()];
    for (s, r) in results.iter_mut().enumerate() {
        for l in 0..3 {
            for p in 0..2 {
                med[s][l][p] = median(&mut r[l][p]);
            }
        }
    }
    let mut best = [[None::<Duration>; 2]; 3];
    for (s, m) in med.iter().enumerate() {
        if matches!(subjects[s].kind, Kind::Kernel) {
            continue;
        }
        for l in 0..3 {
            for p in 0..2 {
                if let Some(t) = m[l][p] {
                    best[l][p] = Some(best[l][p].map_or(t, |b: Duration| b.min(t)));
                }
            }
        }
    }
    print!("{:<26}", "");
    for (_, name) in LOOPS {
        print!("{:>22}{:>22}", name, format!("{name} pinned"));
    }
    println!();
    for (s, m) in med.iter().enumerate() {
        print!("{:<26}", subjects[s].name);
        for l in 0..3 {
            for p in 0..2 {
                let cell = match (m[l][p], best[l][p]) {
                    (Some(t), Some(b)) => format!(
                        "{:.2} ({:.2})",
                        t.as_nanos() as f64 / 1000.0,
                        t.as_secs_f64() / b.as_secs_f64()
                    ),
                    (Some(t), None) => format!("{:.2}", t.as_nanos() as f64 / 1000.0),
                    _ => "-".into(),
                };
                print!("{cell:>22}");
            }
        }
        println!();
    }
}

/// The smallest filesystem fuser serves: a root with `d/f`, no xattrs, run
/// with rovl's session settings. Its round trip is the floor of fuser's
/// loop on this machine.
mod minimal {
    use fuser::{
        Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, LockOwner,
        MountOption, OpenFlags, ReplyAttr, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyXattr, Request,
    };
    use std::ffi::OsStr;
    use std::path::Path;
    use std::time::{Duration, UNIX_EPOCH};

    const TTL: Duration = Duration::from_secs(86400);

    /// Asks for FUSE-over-io_uring when true.
    struct Minimal(bool);

    fn attr(ino: u64) -> FileAttr {
        let dir = ino != 3;
        FileAttr {
            ino: INodeNo(ino),
            size: if dir { 0 } else { 4 },
            blocks: 0,
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: if dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm: if dir { 0o755 } else { 0o644 },
            nlink: if dir { 2 } else { 1 },
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    impl fuser::Filesystem for Minimal {
        fn init(&mut self, _: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
            if self.0 {
                let _ = config.add_capabilities(fuser::InitFlags::FUSE_OVER_IO_URING);
            }
            Ok(())
        }

        fn lookup(&self, _: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
            match (parent.0, name.as_encoded_bytes()) {
                (1, b"d") => reply.entry(&TTL, &attr(2), Generation(0)),
                (2, b"f") => reply.entry(&TTL, &attr(3), Generation(0)),
                _ => reply.error(Errno::ENOENT),
            }
        }

        fn getattr(&self, _: &Request, ino: INodeNo, _: Option<FileHandle>, reply: ReplyAttr) {
            reply.attr(&TTL, &attr(ino.0))
        }

        fn getxattr(&self, _: &Request, _: INodeNo, _: &OsStr, _: u32, reply: ReplyXattr) {
            reply.error(Errno::ENODATA)
        }

        fn open(&self, _: &Request, _: INodeNo, _: OpenFlags, _: bool, reply: ReplyOpen) {
            reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE)
        }

        fn opendir(&self, _: &Request, _: INodeNo, _: OpenFlags, reply: ReplyOpen) {
            reply.opened(FileHandle(0), FopenFlags::empty())
        }

        fn flush(&self, _: &Request, _: INodeNo, _: FileHandle, _: LockOwner, reply: ReplyEmpty) {
            reply.ok()
        }

        fn release(
            &self,
            _: &Request,
            _: INodeNo,
            _: FileHandle,
            _: OpenFlags,
            _: Option<LockOwner>,
            _: bool,
            reply: ReplyEmpty,
        ) {
            reply.ok()
        }
    }

    pub fn serve(mnt: &Path, uring: bool) {
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            MountOption::FSName("rt-minimal".into()),
            MountOption::DefaultPermissions,
        ];
        config.acl = fuser::SessionACL::All;
        config.n_threads = Some(rovl::session::default_threads());
        config.clone_fd = true;
        if let Err(e) = fuser::mount(Minimal(uring), mnt, &config) {
            eprintln!("minimal: {e}");
            std::process::exit(1);
        }
    }
}
