//! FUSE over io_uring (issue 13): with the kernel's `enable_uring` on, rovl
//! serves requests through one ring per CPU; `io_uring=off` keeps
//! `/dev/fuse`. A workload whose requests and replies fill the ring's
//! buffers (large reads, writes, directories and xattrs, data through rovl
//! with `passthrough=off`) runs on rovl and on kernel overlayfs over
//! identical layers: outcomes, merged trees and upper dirs must match.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The tests of this file one at a time: `ring_policy_follows_the_load`
/// needs the machine idle but for its own requests.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const SERVING: &str = "serving FUSE requests through io_uring";

fn mount_logged(l: &Layers, extra: &str) -> RovlMount {
    let opts = format!("{},{extra}", l.opts());
    RovlMount::start_logged(
        &rovl_bin(),
        &["mount", "-f", "-o", &opts],
        &l.merged,
        Some("fuser=info"),
    )
    .expect("mount rovl")
}

/// The daemon's threads: (tid, name).
fn tasks(m: &RovlMount) -> Vec<(i32, String)> {
    let dir = format!("/proc/{}/task", m.child.id());
    fs::read_dir(dir)
        .expect("read the daemon's tasks")
        .filter_map(|t| {
            let t = t.ok()?;
            let comm = fs::read_to_string(t.path().join("comm")).ok()?;
            Some((
                t.file_name().to_str()?.parse().ok()?,
                comm.trim().to_string(),
            ))
        })
        .collect()
}

/// Names of the daemon's threads.
fn threads(m: &RovlMount) -> Vec<String> {
    let mut v: Vec<String> = tasks(m).into_iter().map(|(_, n)| n).collect();
    v.sort();
    v
}

fn possible_cpus() -> usize {
    let s = fs::read_to_string("/sys/devices/system/cpu/possible").unwrap();
    s.trim()
        .split(',')
        .map(|r| {
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            b.parse::<usize>().unwrap() + 1 - a.parse::<usize>().unwrap()
        })
        .sum()
}

/// Deterministic bytes (no two 4 KiB pages alike).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn lower_content(l: &Layers) {
    let d = l.l(0, "many");
    fs::create_dir(&d).unwrap();
    for i in 0..3000 {
        write(d.join(format!("entry-with-a-longish-name-{i:05}")), "");
    }
    write(l.l(0, "big"), pattern(3 << 20, 1));
    write(l.l(0, "small"), "lower\n");
    write(l.l(0, "gone"), "x");
    write(l.l(0, "dir/inner"), "in\n");
    write(l.l(0, "olddir/f"), "f\n");
}

fn outcome<T>(what: &str, r: std::io::Result<T>) -> String {
    match r {
        Ok(_) => format!("{what}: ok"),
        Err(e) => format!("{what}: errno {}", e.raw_os_error().unwrap_or(-1)),
    }
}

/// The operations, each with its outcome; data read back is checked here.
fn workload(m: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut names: Vec<String> = fs::read_dir(m.join("many"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    out.push(format!(
        "many: {} entries, last {:?}",
        names.len(),
        names.last()
    ));

    // Reads larger than a request: several READs through the payload.
    let mut big = Vec::new();
    fs::File::open(m.join("big"))
        .unwrap()
        .read_to_end(&mut big)
        .unwrap();
    assert!(big == pattern(3 << 20, 1), "big: data read back differs");

    // 1 MiB writes and a write at an offset, read back.
    let data = pattern(2 << 20, 2);
    let mut f = fs::OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .mode(0o640)
        .open(m.join("new"))
        .unwrap();
    for c in data.chunks(1 << 20) {
        f.write_all(c).unwrap();
    }
    f.seek(SeekFrom::Start(12345)).unwrap();
    f.write_all(b"in the middle").unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut back = Vec::new();
    f.read_to_end(&mut back).unwrap();
    let mut want = data;
    want[12345..12345 + 13].copy_from_slice(b"in the middle");
    assert!(back == want, "new: data read back differs");
    drop(f);

    let mut a = fs::OpenOptions::new()
        .append(true)
        .open(m.join("small"))
        .unwrap();
    a.write_all(b"appended\n").unwrap();
    drop(a);
    out.push(outcome("unlink gone", fs::remove_file(m.join("gone"))));
    out.push(outcome(
        "unlink gone again",
        fs::remove_file(m.join("gone")),
    ));
    out.push(outcome("rmdir dir", fs::remove_dir(m.join("dir"))));
    out.push(outcome(
        "unlink dir/inner",
        fs::remove_file(m.join("dir/inner")),
    ));
    out.push(outcome("rmdir dir", fs::remove_dir(m.join("dir"))));
    out.push(outcome("mkdir dir", fs::create_dir(m.join("dir"))));
    out.push(outcome(
        "rename olddir",
        fs::rename(m.join("olddir"), m.join("newdir")),
    ));
    out.push(outcome(
        "symlink",
        std::os::unix::fs::symlink("small", m.join("link")),
    ));
    out.push(outcome(
        "hard link",
        fs::hard_link(m.join("small"), m.join("small2")),
    ));
    let long = "n".repeat(255);
    out.push(outcome(
        "create long name",
        fs::write(m.join(&long), "long"),
    ));
    out.push(outcome(
        "mkfifo",
        try_mknod(m.join("fifo"), libc::S_IFIFO | 0o600, 0),
    ));
    // An xattr value as large as ext4 keeps, set and read back; list; remove.
    let value = pattern(3000, 3);
    out.push(outcome(
        "setxattr",
        try_setxattr(m.join("new"), "user.big", &value, 0),
    ));
    assert!(
        getxattr(m.join("new"), "user.big") == Some(value),
        "user.big read back differs"
    );
    out.push(format!("listxattr: {:?}", listxattr(m.join("new"))));
    out.push(outcome(
        "removexattr",
        try_removexattr(m.join("new"), "user.big"),
    ));
    out.push(outcome(
        "truncate",
        fs::OpenOptions::new()
            .write(true)
            .open(m.join("big"))
            .and_then(|f| f.set_len(4096)),
    ));
    out.push(outcome("missing", fs::metadata(m.join("no/such"))));
    out
}

/// What a tree holds: per path, type, mode, size, content (files) or
/// target (links), and the rdev of devices (whiteouts in an upper dir).
fn snapshot(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let md = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let ft = md.file_type();
            let what = if ft.is_dir() {
                stack.push(p.clone());
                "dir".to_string()
            } else if ft.is_symlink() {
                format!("link -> {}", fs::read_link(&p).unwrap().display())
            } else if ft.is_file() {
                let data = fs::read(&p).unwrap();
                let sum = data
                    .iter()
                    .fold(0u64, |h, &b| h.wrapping_mul(31).wrapping_add(b as u64));
                format!("file {} sum {sum:x}", data.len())
            } else if ft.is_char_device() {
                format!("chr {}", md.rdev())
            } else {
                "other".to_string()
            };
            out.insert(rel, format!("{what} mode {:o}", md.mode() & 0o7777));
        }
    }
    out
}

/// Says whether `m` serves through rings; call after a request was answered.
/// The daemon logs the line once every ring has registered, which may come
/// just after a ring answered a first request: wait for it (bounded).
fn assert_uring(m: &RovlMount) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !m.stderr_text().contains(SERVING) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        m.stderr_text().contains(SERVING),
        "rovl did not serve through io_uring; stderr:\n{}",
        m.stderr_text()
    );
    let rings = threads(m)
        .iter()
        .filter(|t| t.starts_with("fuser-ring-"))
        .count();
    assert_eq!(rings, possible_cpus(), "one ring thread per CPU");
    assert_eq!(transport(m), "io_uring", "rovl stats");
}

/// The transport `rovl stats` reports.
fn transport(m: &RovlMount) -> String {
    rovl_stats(&m.mountpoint)["transport"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn serves_through_io_uring_as_the_kernel_overlay_behaves() {
    let _serial = serial();
    if !require_root_fuse() || !require_kernel_overlay() {
        return;
    }
    let Some(_on) = UringOn::new() else { return };

    let k = Layers::new(1);
    lower_content(&k);
    // rovl's redirect_dir default is on, the kernel's build default off.
    let km = KernelMount::start(&format!("{},redirect_dir=on", k.opts()), &k.merged)
        .expect("kernel overlay mount");
    let k_out = workload(&k.merged);
    let k_merged = snapshot(&k.merged);
    km.unmount();

    let r = Layers::new(1);
    lower_content(&r);
    let m = mount_logged(&r, "passthrough=off,redirect_dir=on");
    let r_out = workload(&r.merged);
    let r_merged = snapshot(&r.merged);
    // The rings are up before the first request is read.
    assert_uring(&m);
    let st = m.unmount();
    // The daemon ends once the kernel has given every ring entry back.
    assert!(st.success(), "rovl exited with {st}");

    assert_eq!(r_out, k_out, "outcomes differ from the kernel overlay's");
    assert_eq!(r_merged, k_merged, "merged trees differ");
    assert_eq!(snapshot(&r.upper), snapshot(&k.upper), "upper dirs differ");
}

/// Requests from several threads at once: each CPU's queue and several
/// entries of one queue are in use together.
#[test]
fn parallel_callers() {
    let _serial = serial();
    if !require_root_fuse() {
        return;
    }
    let Some(_on) = UringOn::new() else { return };
    let l = Layers::new(1);
    for i in 0..4 {
        write(l.l(0, &format!("t{i}/seed")), format!("{i}"));
    }
    let m = mount_logged(&l, "passthrough=off");
    assert_eq!(read_string(l.m("t0/seed")), "0");
    assert_uring(&m);
    std::thread::scope(|s| {
        for i in 0..4 {
            let dir = l.m(&format!("t{i}"));
            s.spawn(move || {
                for j in 0..300 {
                    let p = dir.join(format!("f{j}"));
                    let data = pattern(1000 + j * 37, (i * 1000 + j) as u64);
                    fs::write(&p, &data).unwrap();
                    assert!(
                        fs::read(&p).unwrap() == data,
                        "{}: data differs",
                        p.display()
                    );
                    assert_eq!(
                        errno(fs::metadata(dir.join(format!("no{j}")))),
                        Some(libc::ENOENT)
                    );
                }
                assert_eq!(fs::read_dir(&dir).unwrap().count(), 301);
            });
        }
    });
    for i in 0..4 {
        assert_eq!(
            fs::read_dir(l.u(&format!("t{i}"))).unwrap().count(),
            300,
            "t{i} in the upper dir"
        );
    }
    assert!(m.unmount().success());
}

#[test]
fn io_uring_off_keeps_dev_fuse() {
    let _serial = serial();
    if !require_root_fuse() {
        return;
    }
    let Some(_on) = UringOn::new() else { return };
    let l = Layers::new(1);
    write(l.l(0, "f"), "lower\n");
    let m = mount_logged(&l, "io_uring=off");
    assert_eq!(read_string(l.m("f")), "lower\n");
    assert!(!m.stderr_text().contains(SERVING), "{}", m.stderr_text());
    assert_eq!(transport(&m), "/dev/fuse", "rovl stats");
    assert!(
        !threads(&m).iter().any(|t| t.starts_with("fuser-ring-")),
        "{:?}",
        threads(&m)
    );
    assert!(m.unmount().success());
}

/// Ring threads by CPU: (cpu, tid).
fn ring_threads(m: &RovlMount) -> Vec<(usize, i32)> {
    let mut v: Vec<(usize, i32)> = tasks(m)
        .into_iter()
        .filter_map(|(tid, n)| Some((n.strip_prefix("fuser-ring-")?.parse().ok()?, tid)))
        .collect();
    v.sort();
    v
}

/// Runs `f` on a thread of its own bound to `cpu`: its requests go to that
/// CPU's ring.
fn on_cpu<T: Send>(cpu: usize, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: a zeroed cpu_set_t is empty; CPU_SET and
            // sched_setaffinity only touch it and this thread.
            unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                assert_eq!(
                    libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
                    0,
                    "bind to CPU {cpu}"
                );
            }
            f()
        })
        .join()
        .unwrap()
    })
}

/// Sends requests from every CPU until each ring thread has `policy`
/// (bounded); says which do not.
fn wait_for_policy(m: &RovlMount, policy: i32, probe: &Path) -> Vec<(usize, i32)> {
    static NAMES: AtomicUsize = AtomicUsize::new(0);
    let rings = ring_threads(m);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for &(cpu, _) in &rings {
            on_cpu(cpu, || {
                for _ in 0..20 {
                    // A name never asked for: the kernel caches misses.
                    let n = NAMES.fetch_add(1, Ordering::Relaxed);
                    let p = probe.join(format!("no{n}"));
                    assert_eq!(errno(fs::metadata(p)), Some(libc::ENOENT));
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
        }
        // SAFETY: reads a thread's policy; no memory is passed.
        let off: Vec<_> = rings
            .iter()
            .copied()
            .filter(|&(_, tid)| unsafe { libc::sched_getscheduler(tid) } != policy)
            .collect();
        if off.is_empty() || Instant::now() > deadline {
            return off;
        }
    }
}

/// A ring thread runs with the idle policy while the machine has an idle
/// CPU, so that the caller its reply wakes stays on its CPU, and is a
/// normal thread again once every CPU is busy, where an idle-policy thread
/// would wait for the CPU behind other tasks.
#[test]
fn ring_policy_follows_the_load() {
    let _serial = serial();
    if !require_root_fuse() {
        return;
    }
    let Some(_on) = UringOn::new() else { return };
    let l = Layers::new(1);
    write(l.l(0, "d/f"), "x");
    let m = mount_logged(&l, "");
    assert_eq!(read_string(l.m("d/f")), "x");
    assert_uring(&m);
    let d = l.m("d");

    let busy = wait_for_policy(&m, libc::SCHED_IDLE, &d);
    assert!(
        busy.is_empty(),
        "rings not idle-policy on an idle machine: {busy:?}"
    );

    // A busy loop on every CPU.
    let stop = AtomicBool::new(false);
    let off = std::thread::scope(|s| {
        for (cpu, _) in ring_threads(&m) {
            let stop = &stop;
            s.spawn(move || {
                on_cpu(cpu, || {
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            });
        }
        // The loops end even when the wait panics: the scope joins them.
        struct Stop<'a>(&'a AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = Stop(&stop);
        wait_for_policy(&m, libc::SCHED_OTHER, &d)
    });
    assert!(
        off.is_empty(),
        "rings still idle-policy under load: {off:?}"
    );
    assert!(m.unmount().success());
}
