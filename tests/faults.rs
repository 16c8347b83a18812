//! Faults a user meets: the daemon killed (-9) in the middle of a copy-up,
//! a dir rename, an `rm -rf` and a tar extract; the upper running out of
//! space; layers changed under a live mount; eight processes of mixed
//! operations; hostile requests. The kernel is the oracle wherever it
//! defines the outcome.
//!
//! Env: ROVL_STRESS_SECS (default 3) for the timed runs, ROVL_TEST_LONG=1
//! for a dense 4.5 GiB copy-up.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::hash::{Hash, Hasher};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn stress_secs() -> Duration {
    let s = std::env::var("ROVL_STRESS_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    Duration::from_secs(s)
}

/// A tree as a user sees it: path -> type, mode, size, content or target.
type View = BTreeMap<String, String>;

fn view(root: &Path) -> View {
    fn rec(root: &Path, rel: &Path, out: &mut View) {
        let p = root.join(rel);
        let md = match std::fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) => {
                out.insert(rel.display().to_string(), format!("error {e}"));
                return;
            }
        };
        let ft = md.file_type();
        let what = if ft.is_dir() {
            "d".to_string()
        } else if ft.is_symlink() {
            format!("l {:?}", std::fs::read_link(&p).ok())
        } else if ft.is_file() {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            std::fs::read(&p).map_err(|e| e.to_string()).hash(&mut h);
            format!("f size={} data={:x}", md.len(), h.finish())
        } else {
            format!("other {:o}", md.mode() & libc::S_IFMT)
        };
        out.insert(
            rel.display().to_string(),
            format!("{what} mode={:o}", md.mode() & 0o7777),
        );
        if ft.is_dir() {
            let mut names: Vec<_> = std::fs::read_dir(&p)
                .map(|r| r.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
                .unwrap_or_default();
            names.sort();
            for n in names {
                rec(root, &rel.join(n), out);
            }
        }
    }
    let mut out = View::new();
    rec(root, Path::new("."), &mut out);
    out
}

fn assert_views_equal(what: &str, kernel: &View, rovl: &View) {
    let mut diffs = Vec::new();
    for k in kernel.keys().chain(rovl.keys()) {
        if kernel.get(k) != rovl.get(k) && !diffs.iter().any(|d: &String| d.starts_with(k)) {
            diffs.push(format!(
                "{k}: kernel={:?} rovl={:?}",
                kernel.get(k),
                rovl.get(k)
            ));
        }
    }
    assert!(
        diffs.is_empty(),
        "{what}: views differ:\n{}",
        diffs.join("\n")
    );
}

/// Entries of `W/work` (the kernel's and rovl's temp area).
fn work_entries(l: &Layers) -> Vec<String> {
    std::fs::read_dir(l.work.join("work"))
        .map(|r| {
            r.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ salt)
        .collect()
}

fn sh(script: &str) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

// ---------------------------------------------------------------------------
// kill -9 at crash points

/// Starts `worker` on a rovl mount of `l`, kills the daemon with SIGKILL
/// after `delay`, waits for the worker (its calls fail once the daemon is
/// gone) and clears the dead mount. Then: a remount leaves `W/work` empty,
/// and the kernel over the same dirs shows what rovl shows. Returns rovl's
/// view after the remount.
fn crash(l: &Layers, opts: &str, worker: &str, delay: Duration) -> View {
    let full = format!("{},{opts}", l.opts());
    let m = RovlMount::start(&full, &l.merged).expect("rovl mount");
    let mut w = sh(&worker.replace("$M", &l.merged.display().to_string()))
        .spawn()
        .expect("start worker");
    std::thread::sleep(delay);
    signal(&m.child, libc::SIGKILL);
    let (_, finished) = wait_bounded(&mut w, Duration::from_secs(60));
    assert!(finished, "the worker hung on a dead mount");
    m.wait_exit();
    eprintln!("killed after {delay:?}: W/work held {:?}", work_entries(l));

    let m = RovlMount::start(&full, &l.merged).expect("rovl remount after a crash");
    assert_eq!(
        work_entries(l),
        Vec::<String>::new(),
        "W/work keeps leftovers after a remount"
    );
    let rovl = view(&l.merged);
    let st = m.unmount();
    assert!(st.success(), "rovl exited with {st}");
    let k = KernelMount::start(&full, &l.merged).expect("kernel mount of rovl's dirs");
    let kernel = view(&l.merged);
    k.unmount();
    assert_views_equal("after a crash and a remount", &kernel, &rovl);
    rovl
}

fn delays() -> [Duration; 3] {
    [5, 40, 150].map(Duration::from_millis)
}

#[test]
fn kill9_during_copy_up_of_a_large_file() {
    if !require_root_fuse() || !require_kernel_overlay() {
        return;
    }
    let data = pattern(192 << 20, 7);
    for (i, d) in delays().into_iter().enumerate() {
        let l = Layers::new(1);
        write(l.l(0, "big"), &data);
        // An earlier half-done copy-up leaves nothing behind either.
        let worker = "echo appended >> $M/big";
        crash(&l, "index=off", worker, d);
        let up = l.u("big");
        if exists(&up) {
            let got = read(&up);
            assert!(
                got == data || got == [&data[..], b"appended\n"].concat(),
                "round {i}: upper/big is a partial copy ({} of {} bytes)",
                got.len(),
                data.len()
            );
        }
        assert!(read(l.l(0, "big")) == data, "the lower file changed");
    }
}

#[test]
fn kill9_during_rm_rf() {
    if !require_root_fuse() || !require_kernel_overlay() {
        return;
    }
    for d in delays() {
        let l = Layers::new(1);
        for i in 0..600 {
            write(
                l.l(0, &format!("tree/d{}/f{i}", i % 6)),
                format!("file {i}\n"),
            );
        }
        let after = crash(&l, "", "rm -rf $M/tree", d);
        for (p, v) in &after {
            if p.starts_with("./tree/") && v.starts_with("f ") {
                let name = p.trim_start_matches("./");
                assert_eq!(
                    read(l.l(0, name)).len(),
                    v.split("size=")
                        .nth(1)
                        .unwrap()
                        .split(' ')
                        .next()
                        .unwrap()
                        .parse::<usize>()
                        .unwrap(),
                    "{p}: other size than the lower file"
                );
            }
        }
        // Deleting copies nothing up: the upper holds dirs and whiteouts only.
        for e in walk_files(&l.upper) {
            assert!(
                is_whiteout(&e) || e.is_dir(),
                "{e:?} is in the upper after an interrupted rm -rf"
            );
        }
    }
}

fn walk_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

#[test]
fn kill9_during_dir_renames() {
    if !require_root_fuse() || !require_kernel_overlay() {
        return;
    }
    for d in delays() {
        let l = Layers::new(1);
        for i in 0..50 {
            write(l.l(0, &format!("a/s{}/f{i}", i % 5)), format!("{i}\n"));
        }
        let worker = "while mv $M/a $M/b && mv $M/b $M/a; do :; done";
        let after = crash(&l, "redirect_dir=on", worker, d);
        let a = after.keys().filter(|k| k.starts_with("./a/")).count();
        let b = after.keys().filter(|k| k.starts_with("./b/")).count();
        assert!(
            (a, b) == (55, 0) || (a, b) == (0, 55),
            "after the crash: {a} entries under a, {b} under b (one of them whole)"
        );
    }
}

#[test]
fn kill9_during_tar_extract() {
    if !require_root_fuse() || !require_kernel_overlay() {
        return;
    }
    let src = tempfile::tempdir_in("/tmp").unwrap();
    let mut files = BTreeMap::new();
    for i in 0..400 {
        let rel = format!("x/d{}/f{i}", i % 8);
        let data = pattern(100 + i * 37, i as u8);
        write(src.path().join(&rel), &data);
        files.insert(format!("./{rel}"), data);
    }
    let tar = src.path().join("t.tar");
    let ok = Command::new("tar")
        .arg("-C")
        .arg(src.path())
        .args(["-cf"])
        .arg(&tar)
        .arg("x")
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "tar -c failed");
    for d in delays() {
        let l = Layers::new(1);
        // Half the names exist in the lower layer with other data.
        for i in (0..400).step_by(2) {
            write(l.l(0, &format!("x/d{}/f{i}", i % 8)), b"old lower data\n");
        }
        let worker = format!("tar -C $M -xf {}", tar.display());
        let after = crash(&l, "", &worker, d);
        for (p, want) in &files {
            let Some(v) = after.get(p) else { continue };
            let size: usize = v
                .split("size=")
                .nth(1)
                .and_then(|s| s.split(' ').next())
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("{p}: {v}"));
            // Not mounted now: read the layers as the view shows them.
            let up = l.upper.join(p.trim_start_matches("./"));
            let data = if exists(&up) {
                read(&up)
            } else {
                read(l.l(0, p.trim_start_matches("./")))
            };
            assert_eq!(data.len(), size);
            assert!(
                want.starts_with(&data) || data == b"old lower data\n",
                "{p}: neither a prefix of the archive's data nor the lower file"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// ENOSPC

fn enospc(b: Backend) {
    let l = Layers::new(1);
    let small = l.root().join("small");
    let _t = TmpfsMount::start_sized(&small, "4m").expect("mount a 4 MiB tmpfs");
    let (upper, work) = (small.join("upper"), small.join("work"));
    mkdir(&upper);
    mkdir(&work);
    let big = pattern(8 << 20, 3);
    write(l.l(0, "big"), &big);
    write(l.l(0, "small"), b"small lower file\n");
    let opts = format!(
        "{},upperdir={},workdir={}",
        l.lowerdir_opt(),
        upper.display(),
        work.display()
    );
    let m = AnyMount::start(b, &opts, &l.merged).expect("mount");
    // A copy-up that does not fit.
    let r = std::fs::OpenOptions::new().append(true).open(l.m("big"));
    assert_eq!(errno(r), Some(libc::ENOSPC), "copy-up of 8 MiB into 4 MiB");
    assert!(!exists(upper.join("big")), "a partial copy in the upper");
    let leftovers: Vec<_> = std::fs::read_dir(work.join("work")).unwrap().collect();
    assert!(leftovers.is_empty(), "W/work keeps {leftovers:?}");
    assert!(read(l.m("big")) == big, "the merged file changed");
    assert!(read(l.l(0, "big")) == big, "the lower file changed");
    // Writes that run out of space.
    let chunk = vec![1u8; 256 << 10];
    let f = std::fs::File::create(l.m("fill")).unwrap();
    let mut err = None;
    for i in 0..64u64 {
        if let Err(e) = f.write_all_at(&chunk, i * chunk.len() as u64) {
            err = Some(e);
            break;
        }
    }
    let err = err.map(|e| e.raw_os_error());
    drop(f);
    assert_eq!(err, Some(Some(libc::ENOSPC)), "writing 16 MiB into 4 MiB");
    std::fs::remove_file(l.m("fill")).unwrap();
    // Space is back: copy-up and writes work again.
    std::fs::OpenOptions::new()
        .append(true)
        .open(l.m("small"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"more\n"))
        .expect("append after space came back");
    assert_eq!(read(l.m("small")), b"small lower file\nmore\n");
    write(l.m("new"), b"new\n");
    assert_eq!(read(l.m("new")), b"new\n");
    m.unmount();
}

both_backends!(
    enospc,
    hostile_names_and_paths,
    hostile_xattrs_and_nodes,
    huge_sparse_copy_up,
    ctrl_c_during_a_large_copy_up,
);

/// Ctrl-C (SIGINT, default action) of a process whose open is copying up
/// a 1 GiB file: the kernel stops the copy; so does rovl (it polls the
/// caller, fuser having no FUSE_INTERRUPT). Nothing is left in the upper
/// or in W/work.
fn ctrl_c_during_a_large_copy_up(b: Backend) {
    let l = Layers::new(1);
    let chunk = pattern(1 << 20, 5);
    let f = std::fs::File::create(l.l(0, "big")).unwrap();
    for i in 0..1024u64 {
        f.write_all_at(&chunk, i << 20).unwrap();
    }
    drop(f);
    let m = mount(b, &l);
    let mut child = sh(&format!("exec 3>>'{}'; echo copied", l.m("big").display()))
        .spawn()
        .expect("start the writer");
    if b == Backend::Rovl {
        // rovl builds the copy in W/work: signal once it is under way.
        let start = Instant::now();
        while work_entries(&l).is_empty() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the copy-up never started"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    } else {
        // The kernel's copy is an O_TMPFILE, not visible there.
        std::thread::sleep(Duration::from_millis(100));
    }
    signal(&child, libc::SIGINT);
    let (st, finished) = wait_bounded(&mut child, Duration::from_secs(60));
    assert!(finished, "the writer did not end");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        st.signal(),
        Some(libc::SIGINT),
        "{b:?}: the copy-up finished first ({st})"
    );
    assert!(
        !exists(l.u("big")),
        "{b:?}: a copy of the interrupted file is in the upper"
    );
    assert_eq!(
        work_entries(&l),
        Vec::<String>::new(),
        "{b:?}: W/work keeps the partial copy"
    );
    assert_eq!(std::fs::metadata(l.m("big")).unwrap().len(), 1 << 30);
    m.unmount();
}

// ---------------------------------------------------------------------------
// Layers changed under a live mount (undefined in the kernel too; rovl
// must not crash, hang, answer EIO, or write outside its layers)

#[test]
fn layers_changed_under_a_live_mount() {
    if !require_root_fuse() {
        return;
    }
    let l = Layers::new(1);
    for d in 0..8 {
        for f in 0..20 {
            write(l.l(0, &format!("d{d}/f{f}")), format!("{d}/{f}\n"));
        }
    }
    // Symlinks planted in the layers point at `../outside`: from a layer
    // that is the dir rovl must never touch; through the mount (one level
    // deeper) it is `mnt/outside`, where following a symlink is legitimate.
    let outside = l.root().join("outside");
    write(outside.join("secret"), b"outside\n");
    mkdir(l.root().join("mnt/outside"));
    let before_outside = view(&outside);
    let mnt = l.root().join("mnt/merged");
    mkdir(&mnt);
    let m = RovlMount::start(&l.opts(), &mnt).expect("mount");
    let at = |rel: &str| mnt.join(rel);
    write(at("u/file"), b"upper\n");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (root, stop) = (mnt.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut errs = BTreeMap::<i32, usize>::new();
                let mut note = |e: std::io::Error| {
                    *errs.entry(e.raw_os_error().unwrap_or(-1)).or_default() += 1;
                };
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for d in 0..8 {
                        let dir = root.join(format!("d{d}"));
                        match std::fs::read_dir(&dir) {
                            Ok(r) => {
                                for e in r.flatten() {
                                    if let Err(e) = std::fs::symlink_metadata(e.path()) {
                                        note(e);
                                    }
                                    if let Err(e) = std::fs::read(e.path()) {
                                        note(e);
                                    }
                                }
                            }
                            Err(e) => note(e),
                        }
                    }
                }
                errs
            })
        })
        .collect();
    let start = Instant::now();
    let mut round = 0;
    while start.elapsed() < stress_secs() {
        let d = round % 8;
        let dir = l.l(0, &format!("d{d}"));
        write(
            dir.join(format!("f{}", round % 20)),
            format!("rewritten {round}\n"),
        );
        let _ = std::fs::remove_file(dir.join(format!("f{}", (round + 7) % 20)));
        write(dir.join(format!("new{round}")), b"new\n");
        let moved = l.l(0, &format!("d{d}.moved"));
        std::fs::rename(&dir, &moved).unwrap();
        std::fs::rename(&moved, &dir).unwrap();
        round += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut errs = BTreeMap::new();
    for r in readers {
        for (k, v) in r.join().expect("reader panicked") {
            *errs.entry(k).or_insert(0) += v;
        }
    }
    eprintln!("{round} rounds of lower changes; readers' errors (errno: count): {errs:?}");
    // The kernel gives ENOENT and ENOTDIR here; rovl's identity check may
    // also say ESTALE (README: differences).
    let unexpected: Vec<_> = errs
        .iter()
        .filter(|(e, _)| ![libc::ENOENT, libc::ENOTDIR, libc::ESTALE].contains(e))
        .collect();
    assert!(
        unexpected.is_empty(),
        "readers got {unexpected:?} (errno: count) while lower entries changed"
    );

    // A cached upper dir and a cached lower dir swapped for symlinks out.
    let _ = std::fs::read_dir(at("u")).map(|r| r.count());
    let _ = std::fs::read_dir(at("d0")).map(|r| r.count());
    std::fs::rename(l.u("u"), l.u("u.old")).unwrap();
    symlink("../outside", l.u("u"));
    std::fs::rename(l.l(0, "d0"), l.l(0, "d0.old")).unwrap();
    symlink("../outside", l.l(0, "d0"));
    for dir in ["u", "d0"] {
        let _ = std::fs::read_dir(at(dir)).map(|r| r.count());
        let _ = std::fs::read(at(&format!("{dir}/secret")));
        let _ = std::fs::write(at(&format!("{dir}/secret")), b"changed");
        let _ = std::fs::write(at(&format!("{dir}/planted")), b"x");
        let _ = std::fs::create_dir(at(&format!("{dir}/planted-dir")));
        let _ = std::fs::remove_file(at(&format!("{dir}/secret")));
    }
    assert_eq!(
        view(&outside),
        before_outside,
        "rovl wrote outside its layers"
    );
    assert!(
        std::fs::symlink_metadata(&mnt).is_ok() && std::fs::read_dir(&mnt).is_ok(),
        "the mount stopped answering"
    );
    let st = m.unmount();
    assert!(st.success(), "rovl exited with {st}");
}

// ---------------------------------------------------------------------------
// Eight processes of mixed operations

#[test]
fn eight_processes_of_mixed_operations() {
    if !require_root_fuse() {
        return;
    }
    let l = Layers::new(1);
    for i in 0..40 {
        write(l.l(0, &format!("shared/f{i}")), format!("lower {i}\n"));
    }
    let m = RovlMount::start(&l.opts(), &l.merged).expect("mount");
    let secs = stress_secs().as_secs();
    let mut kids = Vec::new();
    for p in 0..8 {
        let script = format!(
            r#"cd "{m}" || exit 9
end=$(( $(date +%s) + {secs} ))
mkdir -p p{p}
i=0
while [ $(date +%s) -lt $end ]; do
  i=$((i+1)); f=shared/f$(( (i * 7 + {p}) % 40 ))
  echo "w {p} $i" >> $f 2>/dev/null
  cat $f > /dev/null 2>&1
  echo $i > p{p}/t && mv p{p}/t shared/r{p} 2>/dev/null
  cat shared/r$(( (i + 1) % 8 )) > /dev/null 2>&1
  mkdir -p p{p}/d$i/e && rmdir p{p}/d$i/e p{p}/d$i
  ln $f p{p}/l 2>/dev/null; rm -f p{p}/l
  [ $((i % 10)) -eq 0 ] && rm -f $f && echo new > $f
  ls -la shared > /dev/null 2>&1
done
echo done"#,
            m = l.merged.display()
        );
        let out = tempfile::NamedTempFile::new_in("/tmp").unwrap();
        let err = tempfile::NamedTempFile::new_in("/tmp").unwrap();
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdout(out.reopen().unwrap())
            .stderr(err.reopen().unwrap())
            .spawn()
            .unwrap();
        kids.push((child, out, err));
    }
    let limit = Duration::from_secs(secs + 120);
    for (mut c, out, err) in kids {
        let (st, finished) = wait_bounded(&mut c, limit);
        assert!(finished, "a worker hung (deadlock?)");
        let (o, e) = (
            std::fs::read_to_string(out.path()).unwrap_or_default(),
            std::fs::read_to_string(err.path()).unwrap_or_default(),
        );
        assert!(
            st.success() && o.contains("done"),
            "a worker failed: {st} {e}"
        );
        for bad in ["Input/output error", "No such device", "Transport endpoint"] {
            assert!(!e.contains(bad), "a worker saw {bad}: {e}");
        }
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", m.child.id())).unwrap();
    let rss_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(rss_kb < 256 * 1024, "daemon RSS {rss_kb} KiB after the run");
    let st = m.unmount();
    assert!(st.success(), "rovl exited with {st}");
}

// ---------------------------------------------------------------------------
// Hostile requests

/// The outcome of one call, as text: the same on both backends.
fn outcome<T>(r: std::io::Result<T>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => format!("errno {}", e.raw_os_error().unwrap_or(-1)),
    }
}

fn rc(r: libc::c_int) -> std::io::Result<()> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// mkdirat + openat down a chain of long names, past PATH_MAX.
fn deep_chain(root: &Path, names: &[String], create: bool) -> std::io::Result<OwnedFd> {
    let c = cstr(root);
    // SAFETY: a valid path; the fd is owned right away.
    let mut fd = unsafe {
        let raw = libc::open(c.as_ptr(), libc::O_DIRECTORY | libc::O_CLOEXEC);
        rc(raw)?;
        OwnedFd::from_raw_fd(raw)
    };
    for n in names {
        let cn = CString::new(n.as_bytes()).unwrap();
        // SAFETY: fd is a live dir fd and cn a valid name.
        unsafe {
            if create {
                let r = libc::mkdirat(fd.as_raw_fd(), cn.as_ptr(), 0o755);
                if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
                    return Err(std::io::Error::last_os_error());
                }
            }
            let raw = libc::openat(
                fd.as_raw_fd(),
                cn.as_ptr(),
                libc::O_DIRECTORY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            );
            rc(raw)?;
            fd = OwnedFd::from_raw_fd(raw);
        }
    }
    Ok(fd)
}

fn write_at(dir: &OwnedFd, name: &str, data: &[u8], flags: i32) -> std::io::Result<Vec<u8>> {
    let cn = CString::new(name).unwrap();
    // SAFETY: a live dir fd, a valid name; the file fd is owned at once.
    let f = unsafe {
        let raw = libc::openat(dir.as_raw_fd(), cn.as_ptr(), flags | libc::O_CLOEXEC, 0o644);
        rc(raw)?;
        std::fs::File::from(OwnedFd::from_raw_fd(raw))
    };
    if !data.is_empty() {
        f.write_all_at(data, f.metadata()?.len())?;
    }
    let mut buf = vec![0u8; f.metadata()?.len() as usize];
    f.read_exact_at(&mut buf, 0)?;
    Ok(buf)
}

fn hostile_names_and_paths(b: Backend) {
    let l = Layers::new(1);
    let n255 = "n".repeat(255);
    write(l.l(0, &n255), b"lower\n");
    let chain: Vec<String> = (0..20)
        .map(|i| format!("{i:02}{}", "p".repeat(248)))
        .collect();
    let lower_fd = deep_chain(&l.lowers[0], &chain, true).unwrap();
    write_at(
        &lower_fd,
        "f",
        b"deep lower\n",
        libc::O_CREAT | libc::O_RDWR,
    )
    .unwrap();
    drop(lower_fd);
    let m = mount(b, &l);
    let got = [
        outcome(std::fs::write(l.m(&"a".repeat(255)), b"x")),
        outcome(std::fs::write(l.m(&"a".repeat(256)), b"x")),
        outcome(std::fs::create_dir(l.m(&"d".repeat(256)))),
        // A lower name of 255 bytes copied up.
        outcome(
            std::fs::OpenOptions::new()
                .append(true)
                .open(l.m(&n255))
                .and_then(|mut f| std::io::Write::write_all(&mut f, b"more\n")),
        ),
    ];
    assert_eq!(read(l.m(&n255)), b"lower\nmore\n");
    // Paths past PATH_MAX: a deep lower file copied up, a new deep chain.
    let fd = deep_chain(&l.merged, &chain, false).unwrap();
    let data = write_at(&fd, "f", b"appended\n", libc::O_RDWR)
        .and_then(|_| write_at(&fd, "f", b"", libc::O_RDONLY));
    assert_eq!(data.unwrap(), b"deep lower\nappended\n");
    let fd2 = deep_chain(
        &l.merged,
        &chain
            .iter()
            .map(|c| c.replace('p', "q"))
            .collect::<Vec<_>>(),
        true,
    )
    .unwrap();
    assert_eq!(
        write_at(&fd2, "g", b"new deep\n", libc::O_CREAT | libc::O_RDWR).unwrap(),
        b"new deep\n"
    );
    drop((fd, fd2));
    m.unmount();
    assert_eq!(
        got,
        ["ok", "errno 36", "errno 36", "ok"],
        "{b:?}: outcomes of long names"
    );
    // The deep copy-up is in the upper.
    let up = deep_chain(&l.upper, &chain, false).expect("the deep chain is copied up");
    assert_eq!(
        write_at(&up, "f", b"", libc::O_RDONLY).unwrap(),
        b"deep lower\nappended\n"
    );
}

fn hostile_xattrs_and_nodes(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "f"), b"f\n");
    write(l.l(0, "d/x"), b"x\n");
    let m = mount(b, &l);
    let f = cstr(&l.m("f"));
    let d = cstr(&l.m("d"));
    let set = |p: &CString, name: &str, v: &[u8]| {
        let n = CString::new(name).unwrap();
        // SAFETY: valid strings and buffer.
        outcome(rc(unsafe {
            libc::lsetxattr(p.as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0)
        }))
    };
    let get = |p: &CString, name: &str| {
        let n = CString::new(name).unwrap();
        let mut buf = vec![0u8; 70_000];
        // SAFETY: valid strings and buffer of the given size.
        let r =
            unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if r < 0 {
            format!(
                "errno {}",
                std::io::Error::last_os_error().raw_os_error().unwrap()
            )
        } else {
            format!("{} bytes", r)
        }
    };
    let big = vec![b'v'; 65536];
    let mut got = vec![
        set(&f, "user.big", &big),
        get(&f, "user.big"),
        set(&f, "user.mid", &big[..3000]),
        get(&f, "user.mid"),
        set(&d, "trusted.overlay.opaque", b"y"),
        set(&f, "trusted.overlay.redirect", b"/x"),
        get(&d, "trusted.overlay.opaque"),
        set(&f, "user.too-big", &vec![b'v'; 65537]),
    ];
    // SAFETY: a valid path.
    got.push(outcome(rc(unsafe {
        libc::mknod(cstr(&l.m("wh")).as_ptr(), libc::S_IFCHR | 0o600, 0)
    })));
    got.push(outcome(std::fs::symlink_metadata(l.m("wh"))));
    // O_TMPFILE on the mount's root (tests/ops.rs covers it in depth).
    let dir = cstr(&l.merged);
    // SAFETY: a valid path; the fd is closed right away.
    let t = unsafe { libc::open(dir.as_ptr(), libc::O_TMPFILE | libc::O_RDWR, 0o600) };
    let tmpfile = if t >= 0 {
        // SAFETY: our fd.
        unsafe { libc::close(t) };
        "ok".to_string()
    } else {
        outcome::<()>(Err(std::io::Error::last_os_error()))
    };
    assert_eq!(read(l.m("f")), b"f\n", "the mount still works");
    assert!(
        exists(l.m("d/x")),
        "{b:?}: a user's trusted.overlay.opaque made d opaque"
    );
    m.unmount();
    assert_eq!(tmpfile, "ok", "{b:?}: O_TMPFILE");
    // What ext4 holds decides the 64 KiB case; both backends pass it on.
    let ext4_big = got[0].clone();
    assert!(
        ext4_big == "ok"
            || ext4_big == format!("errno {}", libc::ENOSPC)
            || ext4_big == format!("errno {}", libc::E2BIG),
        "64 KiB xattr: {ext4_big}"
    );
    got.remove(1);
    got.remove(0);
    assert_eq!(
        got,
        [
            "ok".to_string(),
            "3000 bytes".into(),
            // Kernel 6.7+ escapes the overlay's own names: stored as
            // trusted.overlay.overlay.*, read back, no effect on the view.
            "ok".into(),
            "ok".into(),
            "1 bytes".into(),
            format!("errno {}", libc::E2BIG),
            format!("errno {}", libc::EPERM),
            format!("errno {}", libc::ENOENT),
        ],
        "{b:?}: xattrs through the mount, mknod c 0 0"
    );
}

fn huge_sparse_copy_up(b: Backend) {
    let l = Layers::new(1);
    let tib = 1u64 << 40;
    let four_gib = 4u64 << 30;
    let f = std::fs::File::create(l.l(0, "sparse")).unwrap();
    f.write_all_at(b"head", 0).unwrap();
    f.write_all_at(b"past 4 GiB", four_gib + 123).unwrap();
    f.write_all_at(b"tail", tib - 4).unwrap();
    drop(f);
    let m = mount(b, &l);
    std::fs::OpenOptions::new()
        .append(true)
        .open(l.m("sparse"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"!"))
        .expect("append to a 1 TiB sparse lower file");
    let f = std::fs::File::open(l.m("sparse")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), tib + 1);
    let at = |off: u64, n: usize| {
        let mut buf = vec![0u8; n];
        f.read_exact_at(&mut buf, off).unwrap();
        buf
    };
    assert_eq!(at(0, 4), b"head");
    assert_eq!(at(four_gib + 123, 10), b"past 4 GiB");
    assert_eq!(at(tib - 4, 5), b"tail!");
    assert_eq!(at(1 << 30, 4), [0; 4]);
    drop(f);
    m.unmount();
    let blocks = std::fs::metadata(l.u("sparse")).unwrap().blocks();
    let lower_blocks = std::fs::metadata(l.l(0, "sparse")).unwrap().blocks();
    // The kernel copies data in 1 MiB chunks found with SEEK_DATA: three
    // data regions cost at most 2 MiB each (rovl matches: 4112 blocks here).
    assert!(
        blocks <= lower_blocks + 3 * 4096,
        "{b:?}: the copy-up filled holes ({blocks} blocks, the lower file {lower_blocks})"
    );

    if std::env::var("ROVL_TEST_LONG").is_ok_and(|v| v == "1") {
        let dense = l.l(0, "dense");
        let chunk = pattern(1 << 20, 9);
        let f = std::fs::File::create(&dense).unwrap();
        for i in 0..4608u64 {
            f.write_all_at(&chunk, i << 20).unwrap();
        }
        drop(f);
        let m = mount(b, &l);
        std::fs::OpenOptions::new()
            .append(true)
            .open(l.m("dense"))
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"!"))
            .expect("append to a 4.5 GiB lower file");
        m.unmount();
        let f = std::fs::File::open(l.u("dense")).unwrap();
        assert_eq!(f.metadata().unwrap().len(), (4608 << 20) + 1);
        let mut buf = vec![0u8; 1 << 20];
        for i in [0u64, 4095, 4096, 4607] {
            f.read_exact_at(&mut buf, i << 20).unwrap();
            assert!(buf == chunk, "{b:?}: dense copy-up differs at MiB {i}");
        }
        std::fs::remove_file(dense).unwrap();
    }
}
