//! Timing shell commands: the wall time of whole processes, from spawn to
//! exit, with a watchdog so a hung filesystem cannot hang the benchmark.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Reads seconds from a tool's stdout.
pub type ReportFn = fn(&str) -> Result<f64, String>;

/// One process of a job.
pub struct Proc {
    pub argv: Vec<OsString>,
    pub cwd: Option<PathBuf>,
    /// Lines it must print (stdout is then read and counted); otherwise stdout is discarded.
    pub lines: Option<usize>,
    /// Exit codes that count as success.
    pub ok_codes: &'static [i32],
    /// Reads the time the tool itself reports from its stdout (fio, whose
    /// fixed start-up cost would otherwise dominate).
    pub reported: Option<ReportFn>,
}

impl Proc {
    pub fn new<I, S>(argv: I) -> Proc
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Proc {
            argv: argv
                .into_iter()
                .map(|a| a.as_ref().to_os_string())
                .collect(),
            cwd: None,
            lines: None,
            ok_codes: &[0],
            reported: None,
        }
    }

    /// A shell script; `args` become `$1...`.
    pub fn sh<S: AsRef<OsStr>>(script: &str, args: impl IntoIterator<Item = S>) -> Proc {
        let mut p = Proc::new(["sh", "-c", script, "sh"]);
        p.argv
            .extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        p
    }

    pub fn lines(mut self, n: usize) -> Proc {
        self.lines = Some(n);
        self
    }

    pub fn cwd(mut self, d: PathBuf) -> Proc {
        self.cwd = Some(d);
        self
    }

    pub fn ok_codes(mut self, c: &'static [i32]) -> Proc {
        self.ok_codes = c;
        self
    }

    pub fn reported(mut self, f: ReportFn) -> Proc {
        self.reported = Some(f);
        self
    }

    fn describe(&self) -> String {
        let s: Vec<String> = self
            .argv
            .iter()
            .take(6)
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let more = if self.argv.len() > 6 { " ..." } else { "" };
        format!("`{}{more}`", s.join(" "))
    }
}

/// What a job took.
pub struct Timing {
    /// From the first spawn to the last exit.
    pub wall: Duration,
    /// Seconds the tool reported, when it reports them.
    pub reported: Option<f64>,
}

/// What a process printed, as far as we look at it.
enum Output {
    Lines(usize),
    Text(String),
}

enum Watch {
    Pids(Vec<libc::pid_t>),
    Done,
}

/// Runs the processes of a job concurrently; returns the wall time until
/// the last one exits. Fails on a bad exit code, a wrong line count or a timeout.
/// `own_session`: each process leads a new session, as a container's or
/// another terminal's processes do, so that with autogroups (or cgroups)
/// it is scheduled apart from the daemon.
pub fn run(
    procs: &[Proc],
    timeout: Duration,
    scratch: &Path,
    own_session: bool,
) -> Result<Timing, String> {
    // Everything that is not the job is set up before the clock starts.
    let mut errs = Vec::new();
    for i in 0..procs.len() {
        let p = scratch.join(format!("stderr.{i}"));
        errs.push((
            File::create(&p).map_err(|e| format!("{}: {e}", p.display()))?,
            p,
        ));
    }
    let (tx, rx) = mpsc::channel();
    let dog = thread::spawn(move || watchdog(rx, timeout));

    let start = Instant::now();
    let mut children: Vec<Child> = Vec::new();
    let mut spawn_err = None;
    for (p, (err, _)) in procs.iter().zip(&errs) {
        let mut c = Command::new(&p.argv[0]);
        c.args(&p.argv[1..])
            .stdin(Stdio::null())
            .stderr(match err.try_clone() {
                Ok(f) => Stdio::from(f),
                Err(_) => Stdio::null(),
            });
        c.stdout(if p.lines.is_some() || p.reported.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        if let Some(d) = &p.cwd {
            c.current_dir(d);
        }
        if own_session {
            use std::os::unix::process::CommandExt;
            // SAFETY: setsid is async-signal-safe and touches no memory.
            unsafe {
                c.pre_exec(|| {
                    libc::setsid();
                    Ok(())
                });
            }
        }
        match c.spawn() {
            Ok(ch) => children.push(ch),
            Err(e) => {
                spawn_err = Some(format!("spawning {}: {e}", p.describe()));
                break;
            }
        }
    }
    let _ = tx.send(Watch::Pids(
        children.iter().map(|c| c.id() as libc::pid_t).collect(),
    ));
    if spawn_err.is_some() {
        // Stop what did start.
        let _ = tx.send(Watch::Done);
        for c in &mut children {
            let _ = c.kill();
        }
    }
    let mut outputs = Vec::new();
    for (c, p) in children.iter_mut().zip(procs) {
        outputs.push(c.stdout.take().map(|out| {
            if p.reported.is_some() {
                read_text(out).map(Output::Text)
            } else {
                count_lines(out).map(Output::Lines)
            }
        }));
    }
    for c in &children {
        wait_exited(c.id());
    }
    let elapsed = start.elapsed();
    let _ = tx.send(Watch::Done);
    let timed_out = dog.join().unwrap_or(false);

    // Reap only now: until then no PID can be reused under the watchdog.
    let mut result = Ok(Timing {
        wall: elapsed,
        reported: None,
    });
    for (i, c) in children.iter_mut().enumerate() {
        let p = &procs[i];
        let status = c.wait().map_err(|e| e.to_string());
        let problem = match (&status, &outputs[i]) {
            _ if timed_out => Some(format!("timed out after {timeout:?}")),
            (Err(e), _) => Some(format!("wait: {e}")),
            (Ok(st), _) if !st.code().is_some_and(|c| p.ok_codes.contains(&c)) => {
                Some(format!("exited with {st}"))
            }
            (_, Some(Err(e))) => Some(format!("reading stdout: {e}")),
            (_, Some(Ok(Output::Lines(n)))) if Some(*n) != p.lines => Some(format!(
                "printed {n} lines, expected {}",
                p.lines.unwrap_or(0)
            )),
            (_, Some(Ok(Output::Text(t)))) => match p.reported.map(|f| f(t)) {
                Some(Ok(secs)) => {
                    if let Ok(tm) = &mut result {
                        tm.reported = Some(secs);
                    }
                    None
                }
                Some(Err(e)) => Some(format!("reading its report: {e}")),
                None => None,
            },
            _ => None,
        };
        if let (Some(msg), Ok(_)) = (problem, &result) {
            let err = fs::read_to_string(&errs[i].1).unwrap_or_default();
            let tail: String = err.lines().take(3).collect::<Vec<_>>().join(" | ");
            result = Err(format!("{} {msg}; stderr: {tail}", p.describe()));
        }
    }
    match spawn_err {
        Some(e) => Err(e),
        None => result,
    }
}

/// Kills the job's processes if `Done` does not come in time. Returns whether it did.
fn watchdog(rx: mpsc::Receiver<Watch>, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let pids = match rx.recv() {
        Ok(Watch::Pids(p)) => p,
        _ => return false,
    };
    let left = deadline.saturating_duration_since(Instant::now());
    match rx.recv_timeout(left) {
        Err(mpsc::RecvTimeoutError::Timeout) => {
            for pid in pids {
                // SAFETY: our own children, not yet reaped (see `run`).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            true
        }
        _ => false,
    }
}

fn count_lines(mut r: impl Read) -> io::Result<usize> {
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0;
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(n),
            Ok(k) => n += buf[..k].iter().filter(|&&b| b == b'\n').count(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn read_text(mut r: impl Read) -> io::Result<String> {
    let mut s = String::new();
    r.read_to_string(&mut s)?;
    Ok(s)
}

/// Waits until `pid` has exited, leaving it a zombie (not reaped).
fn wait_exited(pid: u32) {
    loop {
        // SAFETY: siginfo_t is plain data; waitid fills it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if r == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return;
        }
    }
}

/// Syncs, then drops the page cache, dentries and inodes (FUSE daemons get FORGETs).
pub fn drop_caches() -> Result<(), String> {
    // SAFETY: no arguments.
    unsafe { libc::sync() };
    fs::write("/proc/sys/vm/drop_caches", "3").map_err(|e| format!("drop_caches: {e}"))
}

/// CPU ticks (user + system, all threads) a process has used.
fn cpu_ticks(pid: u32) -> Result<u64, String> {
    let st = fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    // Fields after the parenthesised name; utime and stime are the 14th and 15th overall.
    let rest = st.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    match (num(11), num(12)) {
        (Some(u), Some(s)) => Ok(u + s),
        _ => Err(format!("/proc/{pid}/stat: no utime/stime")),
    }
}

/// Waits (at most `max`) until a daemon has gone idle after a cache drop,
/// so the FORGETs are handled before its RSS is read: no CPU used and RSS
/// steady within 1% over one poll. Returns `VmHWM` and `VmRSS` in KiB, and
/// how long it waited (`max` or more: it never went idle).
pub fn settled_rss_kib(pid: u32, max: Duration) -> Result<((u64, u64), Duration), String> {
    let start = Instant::now();
    let poll = Duration::from_millis(250);
    let deadline = Instant::now() + max;
    let mut last = (cpu_ticks(pid)?, rss_kib(pid)?);
    loop {
        thread::sleep(poll);
        let now = (cpu_ticks(pid)?, rss_kib(pid)?);
        let idle = now.0 == last.0 && now.1 .1.abs_diff(last.1 .1) <= (last.1 .1 / 100).max(64);
        if idle || Instant::now() > deadline {
            return Ok((now.1, start.elapsed()));
        }
        last = now;
    }
}

/// `VmHWM` and `VmRSS` of a process, in KiB.
pub fn rss_kib(pid: u32) -> Result<(u64, u64), String> {
    let st = fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    let field = |name: &str| {
        st.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .ok_or_else(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmHWM:")?, field("VmRSS:")?))
}
