//! Integration-test harness: layer trees, rovl and kernel overlay mounts
//! with unmount guards, and small libc wrappers that report raw errnos.
//!
//! Every test binary includes this with `mod common;` and uses a subset.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a mount may take to appear, and a daemon to exit after unmount.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(10);
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(20);

pub fn rovl_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_rovl"))
}

fn ci() -> bool {
    std::env::var("CI").map(|v| v == "true").unwrap_or(false)
}

/// Reports a missing prerequisite: a failure under CI=true, a skip otherwise.
pub fn missing(reason: &str) -> bool {
    if ci() {
        panic!("prerequisite missing (CI=true): {reason}");
    }
    eprintln!("SKIPPED: {reason}");
    false
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn require_root_fuse() -> bool {
    if !is_root() {
        return missing("rovl tests need root (euid 0)");
    }
    if !Path::new("/dev/fuse").exists() {
        return missing("/dev/fuse does not exist");
    }
    true
}

pub fn require_kernel_overlay() -> bool {
    if !is_root() {
        return missing("kernel overlay tests need root (euid 0)");
    }
    let fss = fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !fss
        .lines()
        .any(|l| l.split_whitespace().last() == Some("overlay"))
    {
        return missing("kernel overlayfs is not available (not in /proc/filesystems)");
    }
    true
}

const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// Holders of `UringOn` in this test process, and the setting before the first.
static URING: Mutex<(usize, Option<String>)> = Mutex::new((0, None));

/// FUSE-over-io_uring switched on (`enable_uring`, kernel 6.14+) while any
/// holder in this test process lives; put back as it was after the last.
/// Mounts other tests make meanwhile may use it too: both transports must
/// behave the same.
pub struct UringOn(());

impl UringOn {
    pub fn new() -> Option<UringOn> {
        let mut g = URING.lock().unwrap_or_else(|e| e.into_inner());
        if g.0 == 0 {
            let was = match fs::read_to_string(ENABLE_URING) {
                Ok(s) => s.trim().to_string(),
                Err(_) => {
                    drop(g);
                    missing(&format!(
                        "FUSE over io_uring: {ENABLE_URING} is missing (kernel 6.14+ with CONFIG_FUSE_IO_URING)"
                    ));
                    return None;
                }
            };
            if was != "Y" {
                if let Err(e) = fs::write(ENABLE_URING, "Y") {
                    drop(g);
                    missing(&format!(
                        "FUSE over io_uring: cannot write {ENABLE_URING}: {e}"
                    ));
                    return None;
                }
            }
            g.1 = Some(was);
        }
        g.0 += 1;
        Some(UringOn(()))
    }
}

impl Drop for UringOn {
    fn drop(&mut self) {
        let mut g = URING.lock().unwrap_or_else(|e| e.into_inner());
        g.0 -= 1;
        if g.0 == 0 {
            if let Some(was) = g.1.take().filter(|w| w != "Y") {
                let _ = fs::write(ENABLE_URING, was);
            }
        }
    }
}

/// The path of an installed program, or a skip (a failure under CI=true).
pub fn require_program(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        missing(&format!("{name} is not installed (apt-get install {name})"));
    }
    found
}

// ---------------------------------------------------------------------------
// Test users

/// A user made for one test, with subordinate ids, removed with its
/// processes (rootless podman leaves a pause process behind) on drop.
pub struct TestUser {
    pub name: String,
    pub uid: u32,
}

impl TestUser {
    pub fn new() -> Option<TestUser> {
        // Unique per test binary and call.
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("rovlt{}x{n}", std::process::id());
        let ok = Command::new("useradd")
            .args(["--no-create-home", "--shell", "/bin/sh", &name])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            missing(&format!(
                "useradd {name} failed: rootless tests need a user"
            ));
            return None;
        }
        let out = Command::new("id").args(["-u", &name]).output().unwrap();
        let uid = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        let user = TestUser { name, uid };
        let subuid = std::fs::read_to_string("/etc/subuid").unwrap_or_default();
        assert!(
            subuid
                .lines()
                .any(|l| l.starts_with(&format!("{}:", user.name))),
            "useradd gave {} no /etc/subuid range",
            user.name
        );
        Some(user)
    }

    /// Ends every process of this user: all were started by this test.
    pub fn kill_processes(&self) {
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let owner = std::fs::metadata(e.path()).map(|m| {
                use std::os::unix::fs::MetadataExt;
                m.uid()
            });
            if owner.is_ok_and(|u| u == self.uid) {
                // SAFETY: kill has no memory preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        self.kill_processes();
        // rovl's runtime dir for a user without XDG_RUNTIME_DIR: a daemon
        // ended above leaves its mount record there, which the next test
        // user, given the same uid, would find.
        let _ = std::fs::remove_dir_all(format!("/tmp/rovl-{}", self.uid));
        for _ in 0..50 {
            let st = Command::new("userdel").arg(&self.name).status();
            if st.is_ok_and(|s| s.success()) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
            self.kill_processes();
        }
        eprintln!("could not remove test user {}", self.name);
    }
}

// ---------------------------------------------------------------------------
// Layers

/// A unique temp dir under /tmp with `l0..l{n-1}`, `upper`, `work`, `merged`.
/// `lowers[0]` is the topmost lower layer (kernel order).
pub struct Layers {
    pub dir: tempfile::TempDir,
    pub lowers: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub merged: PathBuf,
}

impl Layers {
    pub fn new(n_lowers: usize) -> Layers {
        let dir = tempfile::Builder::new()
            .prefix("rovl-test-")
            .tempdir_in("/tmp")
            .expect("create temp dir under /tmp");
        // Canonical, so paths compare equal to /proc/self/mountinfo entries.
        let root = fs::canonicalize(dir.path()).expect("canonicalize temp dir");
        let lowers: Vec<PathBuf> = (0..n_lowers).map(|i| root.join(format!("l{i}"))).collect();
        for l in &lowers {
            fs::create_dir(l).expect("create lower dir");
        }
        let upper = root.join("upper");
        let work = root.join("work");
        let merged = root.join("merged");
        for d in [&upper, &work, &merged] {
            fs::create_dir(d).expect("create layer dir");
        }
        Layers {
            dir,
            lowers,
            upper,
            work,
            merged,
        }
    }

    /// The canonical root of the temp dir.
    pub fn root(&self) -> PathBuf {
        self.merged.parent().unwrap().to_path_buf()
    }

    pub fn lowerdir_opt(&self) -> String {
        let l: Vec<String> = self
            .lowers
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        format!("lowerdir={}", l.join(":"))
    }

    pub fn opts(&self) -> String {
        format!(
            "{},upperdir={},workdir={}",
            self.lowerdir_opt(),
            self.upper.display(),
            self.work.display()
        )
    }

    pub fn opts_ro(&self) -> String {
        self.lowerdir_opt()
    }

    pub fn lower(&self, i: usize) -> &Path {
        &self.lowers[i]
    }

    /// Path of `rel` in the merged dir.
    pub fn m(&self, rel: &str) -> PathBuf {
        self.merged.join(rel)
    }

    /// Path of `rel` in the upper dir.
    pub fn u(&self, rel: &str) -> PathBuf {
        self.upper.join(rel)
    }

    /// Path of `rel` in lower layer `i`.
    pub fn l(&self, i: usize, rel: &str) -> PathBuf {
        self.lowers[i].join(rel)
    }
}

impl Drop for Layers {
    fn drop(&mut self) {
        // Never let TempDir's recursive delete walk into a live mount:
        // detach anything still mounted below the temp dir first.
        let root = self.root();
        let mut below: Vec<PathBuf> = mount_points()
            .into_iter()
            .filter(|m| m.starts_with(&root))
            .collect();
        below.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        for m in below {
            let _ = umount2(&m, libc::MNT_DETACH);
        }
    }
}

// ---------------------------------------------------------------------------
// Mount table

pub use rovl::mountinfo::MountInfo;

pub fn mountinfo() -> Vec<MountInfo> {
    rovl::mountinfo::read().unwrap_or_default()
}

pub fn mount_points() -> Vec<PathBuf> {
    mountinfo().into_iter().map(|m| m.mount_point).collect()
}

/// The topmost mount at `p` (the last one listed), if any.
pub fn mount_at(p: &Path) -> Option<MountInfo> {
    let p = canonical_no_follow_last(p);
    mountinfo().into_iter().rev().find(|m| m.mount_point == p)
}

pub fn is_mounted(p: &Path) -> bool {
    mount_at(p).is_some()
}

/// Canonicalizes the parent only, so a hung FUSE mount at `p` is never stat'ed.
fn canonical_no_follow_last(p: &Path) -> PathBuf {
    match (p.parent(), p.file_name()) {
        (Some(parent), Some(name)) if !parent.as_os_str().is_empty() => fs::canonicalize(parent)
            .map(|c| c.join(name))
            .unwrap_or_else(|_| p.to_path_buf()),
        _ => fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()),
    }
}

/// `umount2`, retrying briefly on EBUSY: a child another test thread is
/// forking can hold our just-closed files until it execs.
pub fn umount2(p: &Path, flags: libc::c_int) -> io::Result<()> {
    let c = cstr(p);
    let mut tries = 100;
    loop {
        // SAFETY: c is a valid NUL-terminated path.
        let r = unsafe { libc::umount2(c.as_ptr(), flags) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        tries -= 1;
        if e.raw_os_error() != Some(libc::EBUSY) || tries == 0 {
            return Err(e);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Unmounts `p`, retrying while busy, lazily detaching as a last resort.
/// Returns Ok once nothing is mounted there any more.
pub fn unmount_path(p: &Path) -> io::Result<()> {
    rovl::mountinfo::unmount_retry(p)
}

// ---------------------------------------------------------------------------
// Processes

pub use child::wait_bounded;

/// Sends `sig` to a process we started.
pub fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions; the PID is our child's.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

/// A temp file used as a child's stderr, so the child never blocks on a pipe.
fn stderr_file() -> tempfile::NamedTempFile {
    tempfile::Builder::new()
        .prefix("rovl-stderr-")
        .tempfile_in("/tmp")
        .expect("create stderr temp file")
}

/// A `rovl` command with RUST_LOG cleared so stderr holds only real errors.
pub fn rovl_cmd() -> Command {
    let mut c = Command::new(rovl_bin());
    c.env_remove("RUST_LOG").stdin(Stdio::null());
    c
}

/// Result of running `rovl` to completion (bounded).
pub struct Run {
    pub status: ExitStatus,
    /// False if the process had to be killed after the time limit.
    pub exited: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `rovl ARGS` with stdout/stderr in temp files (a daemon that keeps them
/// open cannot block us); kills it by PID after `EXIT_TIMEOUT`.
pub fn run_rovl<S: AsRef<OsStr>>(args: &[S]) -> Run {
    let out = stderr_file();
    let err = stderr_file();
    let mut child = rovl_cmd()
        .args(args)
        .stdout(out.reopen().expect("reopen"))
        .stderr(err.reopen().expect("reopen"))
        .spawn()
        .expect("spawn rovl");
    let (status, exited) = wait_bounded(&mut child, EXIT_TIMEOUT);
    Run {
        status,
        exited,
        stdout: fs::read_to_string(out.path()).unwrap_or_default(),
        stderr: fs::read_to_string(err.path()).unwrap_or_default(),
    }
}

/// `rovl stats --json MNT`: the daemon's counters.
pub fn rovl_stats(mnt: &Path) -> serde_json::Value {
    let r = run_rovl(&[OsStr::new("stats"), OsStr::new("--json"), mnt.as_os_str()]);
    assert!(r.status.success(), "rovl stats: {}", r.stderr);
    serde_json::from_str(&r.stdout).expect("rovl stats JSON")
}

// ---------------------------------------------------------------------------
// Mount guards

/// `rovl mount -f -o OPTS MNT` as a child process; unmounted on drop.
pub struct RovlMount {
    pub child: Child,
    pub mountpoint: PathBuf,
    stderr: tempfile::NamedTempFile,
    done: bool,
    /// Shared with the watchdog: true once the child may be reaped, so the
    /// watchdog never signals a reused PID.
    reaping: Arc<Mutex<bool>>,
}

/// How long one rovl mount may live before the watchdog kills the daemon,
/// turning a hung filesystem into a failing test instead of a stuck run.
fn watchdog_limit() -> Duration {
    let secs = std::env::var("ROVL_TEST_WATCHDOG_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    Duration::from_secs(secs)
}

fn start_watchdog(pid: u32, reaping: Arc<Mutex<bool>>) {
    let limit = watchdog_limit();
    std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(200));
            if *reaping.lock().unwrap_or_else(|e| e.into_inner()) {
                return;
            }
        }
        let r = reaping.lock().unwrap_or_else(|e| e.into_inner());
        if !*r {
            eprintln!("watchdog: rovl (pid {pid}) still mounted after {limit:?}, killing it");
            // SAFETY: the child is not reaped yet (flag false under lock),
            // so the PID is still ours.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
    });
}

/// Whether `m` is the FUSE mount at `p`. When a mount was there before (a
/// dead one, which the new daemon replaces; mount ids are reused), only
/// once the mountpoint answers.
fn fuse_mount_up(m: &MountInfo, p: &Path, was_mounted: bool) -> bool {
    m.fstype.starts_with("fuse") && (!was_mounted || fs::metadata(p).is_ok())
}

impl RovlMount {
    pub fn start(opts: &str, mnt: &Path) -> io::Result<RovlMount> {
        Self::start_args(&["mount", "-f", "-o", opts], mnt)
    }

    /// Like `start`, with the arguments before MNT given (must run in the
    /// foreground, e.g. `["mount", "-f", "-o", OPTS]`).
    pub fn start_args(args: &[&str], mnt: &Path) -> io::Result<RovlMount> {
        Self::start_program(&rovl_bin(), args, mnt)
    }

    /// Like `start_args` for any FUSE program that stays in the foreground
    /// (used to check the harness itself with fuse-overlayfs).
    pub fn start_program(program: &Path, args: &[&str], mnt: &Path) -> io::Result<RovlMount> {
        Self::start_logged(program, args, mnt, None)
    }

    /// Like `start_program`, with the daemon's `RUST_LOG` set (its stderr
    /// then shows what it logs).
    pub fn start_logged(
        program: &Path,
        args: &[&str],
        mnt: &Path,
        rust_log: Option<&str>,
    ) -> io::Result<RovlMount> {
        let mountpoint = canonical_no_follow_last(mnt);
        let was_mounted = is_mounted(&mountpoint);
        let stderr = stderr_file();
        let mut cmd = Command::new(program);
        match rust_log {
            Some(l) => cmd.env("RUST_LOG", l),
            None => cmd.env_remove("RUST_LOG"),
        };
        let child = cmd
            .stdin(Stdio::null())
            .args(args)
            .arg(&mountpoint)
            .stdout(Stdio::null())
            .stderr(stderr.reopen()?)
            .spawn()?;
        let reaping = Arc::new(Mutex::new(false));
        start_watchdog(child.id(), reaping.clone());
        let mut m = RovlMount {
            child,
            mountpoint,
            stderr,
            done: false,
            reaping,
        };
        let up = |i: &MountInfo| fuse_mount_up(i, &m.mountpoint, was_mounted);
        let why = match child::wait_mounted(&mut m.child, &m.mountpoint, MOUNT_TIMEOUT, up) {
            child::Mounted::Up(_) => return Ok(m),
            child::Mounted::Exited(st) => format!("rovl exited before mounting ({st})"),
            child::Mounted::TimedOut => {
                m.stop_watchdog();
                // It may mount just as it is killed: `stop` unmounts too.
                let (_, st, _) = child::stop(&mut m.child, &m.mountpoint, Duration::ZERO);
                format!("rovl did not mount within {MOUNT_TIMEOUT:?} (killed, {st})")
            }
        };
        m.stop_watchdog();
        m.done = true;
        Err(io::Error::other(format!(
            "{why}; stderr: {}",
            m.stderr_text().trim_end()
        )))
    }

    /// What the daemon wrote on stderr so far.
    pub fn stderr_text(&self) -> String {
        fs::read_to_string(self.stderr.path()).unwrap_or_default()
    }

    fn stop_watchdog(&self) {
        *self.reaping.lock().unwrap_or_else(|e| e.into_inner()) = true;
    }

    fn finish(&mut self) -> Option<ExitStatus> {
        if self.done {
            return None;
        }
        self.stop_watchdog();
        self.done = true;
        Some(child::stop(&mut self.child, &self.mountpoint, EXIT_TIMEOUT).1)
    }

    /// Unmounts and waits for the daemon (killed by PID if it does not exit).
    pub fn unmount(mut self) -> ExitStatus {
        let st = match self.finish() {
            Some(st) => st,
            None => wait_bounded(&mut self.child, EXIT_TIMEOUT).0,
        };
        if !st.success() {
            // Shown with the failing test's output.
            eprintln!("rovl exited with {st}; its stderr:\n{}", self.stderr_text());
        }
        st
    }

    /// Waits (bounded) for the daemon to exit by itself, e.g. after
    /// `rovl umount` or SIGTERM; kills it if it does not. Then makes sure
    /// nothing is left mounted. Returns (status, exited on its own).
    pub fn wait_exit(mut self) -> (ExitStatus, bool) {
        self.stop_watchdog();
        let r = wait_bounded(&mut self.child, EXIT_TIMEOUT);
        self.done = true;
        if is_mounted(&self.mountpoint) {
            let _ = unmount_path(&self.mountpoint);
        }
        r
    }
}

impl Drop for RovlMount {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// `mount -t overlay overlay -o OPTS MNT`; unmounted on drop.
pub struct KernelMount {
    pub mountpoint: PathBuf,
}

impl KernelMount {
    pub fn start(opts: &str, mnt: &Path) -> io::Result<KernelMount> {
        let mountpoint = canonical_no_follow_last(mnt);
        kernel_mount(opts, &mountpoint)?;
        Ok(KernelMount { mountpoint })
    }

    pub fn unmount(self) {
        // Drop does it.
    }
}

/// mount(2) of an overlay; the raw error (errno) on failure.
pub fn kernel_mount(opts: &str, mnt: &Path) -> io::Result<()> {
    let src = CString::new("overlay").unwrap();
    let target = cstr(mnt);
    let data = CString::new(opts).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: all pointers are valid NUL-terminated strings for the call.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            src.as_ptr(),
            0,
            data.as_ptr() as *const libc::c_void,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Drop for KernelMount {
    fn drop(&mut self) {
        let _ = unmount_path(&self.mountpoint);
    }
}

/// Unmounts whatever is still mounted at `0` when dropped (daemon-mode
/// mounts, whose PID the test does not own).
pub struct PathGuard(pub PathBuf);

impl Drop for PathGuard {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = unmount_path(&self.0);
        }
    }
}

/// A tmpfs mounted at `p` (created if needed); unmounted on drop.
pub struct TmpfsMount {
    pub mountpoint: PathBuf,
}

impl TmpfsMount {
    pub fn start(p: &Path) -> io::Result<TmpfsMount> {
        Self::start_sized(p, "16m")
    }

    /// A tmpfs of `size` (tmpfs syntax: `4m`), e.g. to run out of space.
    pub fn start_sized(p: &Path, size: &str) -> io::Result<TmpfsMount> {
        fs::create_dir_all(p)?;
        let mountpoint = fs::canonicalize(p)?;
        let src = CString::new("tmpfs").unwrap();
        let target = cstr(&mountpoint);
        let data = CString::new(format!("size={size}")).unwrap();
        // SAFETY: valid NUL-terminated strings.
        let r = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                src.as_ptr(),
                0,
                data.as_ptr() as *const libc::c_void,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(TmpfsMount { mountpoint })
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = unmount_path(&self.mountpoint);
    }
}

/// Which implementation a shared scenario runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Kernel,
    Rovl,
}

/// Either kind of mount guard.
pub enum AnyMount {
    Kernel(KernelMount),
    Rovl(RovlMount),
}

impl AnyMount {
    pub fn start(b: Backend, opts: &str, mnt: &Path) -> io::Result<AnyMount> {
        Ok(match b {
            Backend::Kernel => AnyMount::Kernel(KernelMount::start(opts, mnt)?),
            Backend::Rovl => AnyMount::Rovl(RovlMount::start(opts, mnt)?),
        })
    }

    pub fn mountpoint(&self) -> &Path {
        match self {
            AnyMount::Kernel(k) => &k.mountpoint,
            AnyMount::Rovl(r) => &r.mountpoint,
        }
    }

    /// Unmounts now; for rovl also asserts the daemon exited 0.
    pub fn unmount(self) {
        match self {
            AnyMount::Kernel(k) => drop(k),
            AnyMount::Rovl(r) => {
                let st = r.unmount();
                assert!(st.success(), "rovl exited with {st}");
            }
        }
    }
}

/// Mounts `layers` (upper+work) with backend `b`, panicking with the reason on failure.
pub fn mount(b: Backend, layers: &Layers) -> AnyMount {
    AnyMount::start(b, &layers.opts(), &layers.merged)
        .unwrap_or_else(|e| panic!("{b:?} mount failed: {e}"))
}

/// Mounts `layers` with backend `b` and `extra` options added.
pub fn mount_opts(b: Backend, layers: &Layers, extra: &str) -> AnyMount {
    AnyMount::start(b, &format!("{},{extra}", layers.opts()), &layers.merged)
        .unwrap_or_else(|e| panic!("{b:?} mount failed: {e}"))
}

/// Mounts `layers` read-only (lowerdir only) with backend `b`.
pub fn mount_ro(b: Backend, layers: &Layers) -> AnyMount {
    AnyMount::start(b, &layers.opts_ro(), &layers.merged)
        .unwrap_or_else(|e| panic!("{b:?} read-only mount failed: {e}"))
}

/// Declares, for each `fn NAME(b: common::Backend)` in the test file, a module
/// `NAME` with tests `kernel` and `rovl` running it on each backend (skipping
/// when the prerequisite is missing).
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn kernel() {
                    if !$crate::common::require_kernel_overlay() {
                        return;
                    }
                    super::$name($crate::common::Backend::Kernel)
                }
                #[test]
                fn rovl() {
                    if !$crate::common::require_root_fuse() {
                        return;
                    }
                    super::$name($crate::common::Backend::Rovl)
                }
            }
        )*
    };
}

// ---------------------------------------------------------------------------
// File helpers (all panic with the path on unexpected failure)

pub mod child;
pub mod sys;

pub use sys::cpath as cstr;

/// A raw-errno result as an `io::Result`.
fn io<T>(r: sys::Sys<T>) -> io::Result<T> {
    r.map_err(io::Error::from_raw_os_error)
}

/// The errno of a failed result; None if it succeeded.
pub fn errno<T>(r: io::Result<T>) -> Option<i32> {
    match r {
        Ok(_) => None,
        Err(e) => Some(e.raw_os_error().unwrap_or(-1)),
    }
}

/// Writes `data` to `p`, creating parent dirs.
pub fn write(p: impl AsRef<Path>, data: impl AsRef<[u8]>) {
    let p = p.as_ref();
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent).unwrap_or_else(|e| panic!("mkdir -p {parent:?}: {e}"));
    }
    fs::write(p, data).unwrap_or_else(|e| panic!("write {p:?}: {e}"));
}

pub fn read(p: impl AsRef<Path>) -> Vec<u8> {
    let p = p.as_ref();
    fs::read(p).unwrap_or_else(|e| panic!("read {p:?}: {e}"))
}

pub fn read_string(p: impl AsRef<Path>) -> String {
    String::from_utf8(read(p)).expect("utf-8 content")
}

pub fn mkdir(p: impl AsRef<Path>) {
    let p = p.as_ref();
    fs::create_dir_all(p).unwrap_or_else(|e| panic!("mkdir -p {p:?}: {e}"));
}

pub fn symlink(target: impl AsRef<Path>, p: impl AsRef<Path>) {
    let p = p.as_ref();
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    std::os::unix::fs::symlink(target.as_ref(), p).unwrap_or_else(|e| panic!("symlink {p:?}: {e}"));
}

pub fn try_lstat(p: impl AsRef<Path>) -> io::Result<libc::stat> {
    io(sys::lstat(p.as_ref()))
}

pub fn lstat(p: impl AsRef<Path>) -> libc::stat {
    let p = p.as_ref();
    try_lstat(p).unwrap_or_else(|e| panic!("lstat {p:?}: {e}"))
}

pub fn exists(p: impl AsRef<Path>) -> bool {
    try_lstat(p).is_ok()
}

pub fn file_type_bits(st: &libc::stat) -> libc::mode_t {
    st.st_mode & libc::S_IFMT
}

/// Is `p` a kernel-format whiteout (char device 0/0)?
pub fn is_whiteout(p: impl AsRef<Path>) -> bool {
    match try_lstat(p) {
        Ok(st) => file_type_bits(&st) == libc::S_IFCHR && st.st_rdev == 0,
        Err(_) => false,
    }
}

pub fn try_mknod(p: impl AsRef<Path>, mode: libc::mode_t, dev: libc::dev_t) -> io::Result<()> {
    io(sys::mknod(p.as_ref(), mode, dev))
}

pub fn mknod(p: impl AsRef<Path>, mode: libc::mode_t, dev: libc::dev_t) {
    let p = p.as_ref();
    try_mknod(p, mode, dev).unwrap_or_else(|e| panic!("mknod {p:?}: {e}"));
    // Exact permission bits, whatever the umask.
    chmod(p, mode & 0o7777);
}

/// Creates a kernel-format whiteout (c 0 0, mode 0000) at `p` (in a layer).
pub fn mknod_whiteout(p: impl AsRef<Path>) {
    let p = p.as_ref();
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    mknod(p, libc::S_IFCHR, 0);
    chmod(p, 0);
}

/// Marks a layer directory opaque (`trusted.overlay.opaque=y`).
pub fn set_opaque(dir: impl AsRef<Path>) {
    setxattr(dir, "trusted.overlay.opaque", b"y");
}

pub fn is_opaque(dir: impl AsRef<Path>) -> bool {
    getxattr(dir, "trusted.overlay.opaque").as_deref() == Some(b"y")
}

pub fn chmod(p: impl AsRef<Path>, mode: u32) {
    let p = p.as_ref();
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {p:?}: {e}"));
}

pub fn try_lchown(p: impl AsRef<Path>, uid: u32, gid: u32) -> io::Result<()> {
    io(sys::chown(p.as_ref(), uid, gid, true))
}

pub fn lchown(p: impl AsRef<Path>, uid: u32, gid: u32) {
    let p = p.as_ref();
    try_lchown(p, uid, gid).unwrap_or_else(|e| panic!("lchown {p:?}: {e}"));
}

/// Sets atime and mtime (seconds, nanoseconds) without following symlinks.
pub fn try_set_times(p: impl AsRef<Path>, atime: (i64, i64), mtime: (i64, i64)) -> io::Result<()> {
    let ts = |(tv_sec, tv_nsec)| libc::timespec { tv_sec, tv_nsec };
    io(sys::utimens(p.as_ref(), [ts(atime), ts(mtime)], true))
}

pub fn set_times(p: impl AsRef<Path>, atime: (i64, i64), mtime: (i64, i64)) {
    let p = p.as_ref();
    try_set_times(p, atime, mtime).unwrap_or_else(|e| panic!("utimensat {p:?}: {e}"));
}

pub fn mtime(st: &libc::stat) -> (i64, i64) {
    (st.st_mtime, st.st_mtime_nsec)
}

pub fn atime(st: &libc::stat) -> (i64, i64) {
    (st.st_atime, st.st_atime_nsec)
}

pub fn readlink(p: impl AsRef<Path>) -> PathBuf {
    let p = p.as_ref();
    fs::read_link(p).unwrap_or_else(|e| panic!("readlink {p:?}: {e}"))
}

// --- xattrs (l* variants: never follow symlinks)

pub fn try_getxattr(p: impl AsRef<Path>, name: &str) -> io::Result<Vec<u8>> {
    io(sys::lgetxattr(p.as_ref(), name))
}

/// The xattr's value, None if absent (ENODATA); panics on other errors.
pub fn getxattr(p: impl AsRef<Path>, name: &str) -> Option<Vec<u8>> {
    let p = p.as_ref();
    match try_getxattr(p, name) {
        Ok(v) => Some(v),
        Err(e) if e.raw_os_error() == Some(libc::ENODATA) => None,
        Err(e) => panic!("lgetxattr {p:?} {name}: {e}"),
    }
}

pub fn try_setxattr(p: impl AsRef<Path>, name: &str, value: &[u8], flags: i32) -> io::Result<()> {
    io(sys::lsetxattr(p.as_ref(), name, value, flags))
}

pub fn setxattr(p: impl AsRef<Path>, name: &str, value: &[u8]) {
    let p = p.as_ref();
    try_setxattr(p, name, value, 0).unwrap_or_else(|e| panic!("lsetxattr {p:?} {name}: {e}"));
}

pub fn try_removexattr(p: impl AsRef<Path>, name: &str) -> io::Result<()> {
    io(sys::lremovexattr(p.as_ref(), name))
}

pub fn try_listxattr(p: impl AsRef<Path>) -> io::Result<Vec<String>> {
    io(sys::llistxattr(p.as_ref()))
}

/// Sorted xattr names of `p`.
pub fn listxattr(p: impl AsRef<Path>) -> Vec<String> {
    let p = p.as_ref();
    try_listxattr(p).unwrap_or_else(|e| panic!("llistxattr {p:?}: {e}"))
}

// --- directories

/// A directory entry as readdir(3) returns it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dirent {
    pub name: String,
    pub d_type: u8,
    pub ino: u64,
}

/// All entries of `p` via opendir/readdir, including `.` and `..`, in the
/// order returned.
pub fn try_readdir_raw(p: impl AsRef<Path>) -> io::Result<Vec<Dirent>> {
    let v = io(sys::readdir_raw(p.as_ref()))?;
    Ok(v.into_iter()
        .map(|(name, d_type, ino)| Dirent { name, d_type, ino })
        .collect())
}

pub fn readdir_raw(p: impl AsRef<Path>) -> Vec<Dirent> {
    let p = p.as_ref();
    try_readdir_raw(p).unwrap_or_else(|e| panic!("readdir {p:?}: {e}"))
}

/// Sorted names of `p`, without `.` and `..`.
pub fn names(p: impl AsRef<Path>) -> Vec<String> {
    let p = p.as_ref();
    let mut v: Vec<String> = fs::read_dir(p)
        .unwrap_or_else(|e| panic!("read_dir {p:?}: {e}"))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

pub fn try_renameat2(from: impl AsRef<Path>, to: impl AsRef<Path>, flags: u32) -> io::Result<()> {
    io(sys::renameat2(from.as_ref(), to.as_ref(), flags))
}

// ---------------------------------------------------------------------------
// Tree snapshots

/// What a snapshot records for one entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub size: u64,
    pub mtime: (i64, i64),
    /// Content of regular files.
    pub data: Option<Vec<u8>>,
    pub link: Option<PathBuf>,
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

/// path (relative; "" is the root) -> Node, for the whole tree under `root`,
/// not following symlinks. atime is left out (reading changes it).
pub fn snapshot(root: impl AsRef<Path>) -> BTreeMap<PathBuf, Node> {
    let root = root.as_ref();
    let mut out = BTreeMap::new();
    snap_rec(root, Path::new(""), &mut out);
    out
}

fn snap_rec(root: &Path, rel: &Path, out: &mut BTreeMap<PathBuf, Node>) {
    let p = if rel.as_os_str().is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    };
    let md = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("lstat {p:?}: {e}"));
    let ft = md.file_type();
    let mut xattrs = BTreeMap::new();
    for n in try_listxattr(&p).unwrap_or_default() {
        if let Ok(v) = try_getxattr(&p, &n) {
            xattrs.insert(n, v);
        }
    }
    let node = Node {
        mode: md.mode(),
        uid: md.uid(),
        gid: md.gid(),
        rdev: md.rdev(),
        size: if ft.is_dir() { 0 } else { md.size() },
        mtime: (md.mtime(), md.mtime_nsec()),
        data: if ft.is_file() {
            fs::read(&p).ok()
        } else {
            None
        },
        link: if ft.is_symlink() {
            fs::read_link(&p).ok()
        } else {
            None
        },
        xattrs,
    };
    out.insert(rel.to_path_buf(), node);
    if ft.is_dir() {
        let mut kids: Vec<OsString> = fs::read_dir(&p)
            .unwrap_or_else(|e| panic!("read_dir {p:?}: {e}"))
            .map(|e| e.unwrap().file_name())
            .collect();
        kids.sort();
        for k in kids {
            snap_rec(root, &rel.join(k), out);
        }
    }
}

/// Panics listing the differences if two snapshots differ.
pub fn assert_same_tree(
    before: &BTreeMap<PathBuf, Node>,
    after: &BTreeMap<PathBuf, Node>,
    what: &str,
) {
    if before == after {
        return;
    }
    let mut diffs = Vec::new();
    for (k, v) in before {
        match after.get(k) {
            None => diffs.push(format!("removed: {k:?}")),
            Some(w) if w != v => diffs.push(format!("changed: {k:?}: {v:?} -> {w:?}")),
            _ => {}
        }
    }
    for k in after.keys() {
        if !before.contains_key(k) {
            diffs.push(format!("added: {k:?}"));
        }
    }
    panic!("{what} changed:\n{}", diffs.join("\n"));
}

/// Makes a char/block device number.
pub fn makedev(major: u32, minor: u32) -> libc::dev_t {
    libc::makedev(major, minor)
}

/// Entries of W/work (the kernel's scratch dir); empty after a clean copy-up.
pub fn work_entries(layers: &Layers) -> Vec<String> {
    let w = layers.work.join("work");
    if !w.exists() {
        return Vec::new();
    }
    names(w)
}

/// Entries of W/work other than whiteouts: the kernel keeps one shared
/// whiteout there (`#N`, hard-linked to make new whiteouts), anything else
/// left behind is a leak.
pub fn work_leftovers(layers: &Layers) -> Vec<String> {
    let w = layers.work.join("work");
    work_entries(layers)
        .into_iter()
        .filter(|n| !is_whiteout(w.join(n)))
        .collect()
}

/// `d_ino` of `name` in a listing of `dir` (readdir, as `ls -i` sees it).
pub fn d_ino(dir: &Path, name: &str) -> u64 {
    use std::os::unix::fs::DirEntryExt;
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .find(|e| e.file_name() == name)
        .map(|e| e.ino())
        .unwrap_or_else(|| panic!("{name} not listed in {}", dir.display()))
}

/// Appends `data` to an existing file.
pub fn append(p: impl AsRef<Path>, data: &str) {
    use std::io::Write;
    let mut f = fs::OpenOptions::new().append(true).open(p).unwrap();
    f.write_all(data.as_bytes()).unwrap();
}
