//! Answers that must not depend on timing or on the mode: fd operations on
//! open files whose names are gone, O_DIRECT creates without passthrough.
//! Each scenario runs on kernel overlayfs and on rovl.

mod common;

use common::*;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;

both_backends!(
    fd_ops_after_unlink,
    fd_ops_after_rename_over,
    o_direct_create,
    index_metacopy_lower_hard_link,
    absolute_redirect_stops_at_opaque_dir,
    readers_of_a_replaced_file,
    readers_of_a_removed_and_recreated_lower_file,
    a_node_keeps_its_object_after_its_name_goes,
);

/// A file reached after its last name went (reopened through
/// /proc/self/fd of an O_PATH fd taken before): the kernel opens the old
/// object, whether it was unlinked or renamed over, upper or lower.
fn a_node_keeps_its_object_after_its_name_goes(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "lower"), "lower data");
    write(l.l(0, "lower2"), "lower2 data");
    let _m = mount(b, &l);
    write(l.m("upper"), "upper data");
    write(l.m("new"), "new data");
    let hold = |name: &str| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open(l.m(name))
            .unwrap_or_else(|e| panic!("open {name} O_PATH: {e}"))
    };
    let (a, bb, c) = (hold("lower"), hold("upper"), hold("lower2"));
    std::fs::remove_file(l.m("lower")).unwrap();
    std::fs::rename(l.m("new"), l.m("upper")).unwrap();
    write(l.m("lower2.tmp"), "replacement");
    std::fs::rename(l.m("lower2.tmp"), l.m("lower2")).unwrap();
    let via = |f: &std::fs::File| {
        let p = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(f));
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reopen {p}: {e}"))
    };
    assert_eq!(via(&a), "lower data", "{b:?}: an unlinked lower file");
    assert_eq!(via(&bb), "upper data", "{b:?}: an upper file renamed over");
    assert_eq!(via(&c), "lower2 data", "{b:?}: a lower file renamed over");
    assert_eq!(read_string(l.m("upper")), "new data");
    assert_eq!(read_string(l.m("lower2")), "replacement");
    assert!(!exists(l.m("lower")));
}

fn open_rw(p: &std::path::Path, flags: i32) -> i32 {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid C string; the fd is closed by the caller.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, 0o600) };
    assert!(fd >= 0, "open {p:?}: {}", std::io::Error::last_os_error());
    fd
}

fn ok(what: &str, rc: libc::c_int) {
    assert!(rc >= 0, "{what}: {}", std::io::Error::last_os_error());
}

/// Every fd operation the kernel allows on an open file with no name.
fn fd_ops(fd: i32) {
    // SAFETY: plain system calls on an fd this test owns, with valid buffers.
    unsafe {
        ok("write", libc::write(fd, b"data".as_ptr().cast(), 4) as i32);
        ok("ftruncate", libc::ftruncate(fd, 2));
        ok("fchmod", libc::fchmod(fd, 0o640));
        ok("fchown", libc::fchown(fd, 7, 8));
        let times = [libc::timespec {
            tv_sec: 1_000_000,
            tv_nsec: 0,
        }; 2];
        ok("futimens", libc::futimens(fd, times.as_ptr()));
        ok(
            "fsetxattr",
            libc::fsetxattr(fd, c"user.k".as_ptr(), b"v".as_ptr().cast(), 1, 0),
        );
        let mut buf = [0u8; 8];
        let n = libc::fgetxattr(fd, c"user.k".as_ptr(), buf.as_mut_ptr().cast(), buf.len());
        assert_eq!(n, 1, "fgetxattr: {}", std::io::Error::last_os_error());
        let mut st: libc::stat = std::mem::zeroed();
        ok("fstat", libc::fstat(fd, &mut st));
        assert_eq!((st.st_size, st.st_mode & 0o7777), (2, 0o640));
        assert_eq!((st.st_uid, st.st_gid, st.st_mtime), (7, 8, 1_000_000));
        libc::close(fd);
    }
}

fn fd_ops_after_unlink(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "lower"), "lower");
    let _m = mount(b, &l);
    let fd = open_rw(&l.m("t"), libc::O_CREAT | libc::O_RDWR);
    std::fs::remove_file(l.m("t")).unwrap();
    fd_ops(fd);
    // A lower file, copied up by the open.
    let fd = open_rw(&l.m("lower"), libc::O_RDWR);
    std::fs::remove_file(l.m("lower")).unwrap();
    fd_ops(fd);
}

fn fd_ops_after_rename_over(b: Backend) {
    let l = Layers::new(1);
    let _m = mount(b, &l);
    write(l.m("a"), "a");
    write(l.m("b"), "b");
    let fd = open_rw(&l.m("a"), libc::O_RDWR);
    std::fs::rename(l.m("b"), l.m("a")).unwrap();
    fd_ops(fd);
    assert_eq!(read_string(l.m("a")), "b");
}

fn o_direct_create(b: Backend) {
    let l = Layers::new(1);
    let _m = match b {
        Backend::Kernel => mount(b, &l),
        Backend::Rovl => mount_opts(b, &l, "passthrough=off"),
    };
    let fd = open_rw(&l.m("new"), libc::O_CREAT | libc::O_WRONLY | libc::O_DIRECT);
    let layout = std::alloc::Layout::from_size_align(16384, 4096).unwrap();
    // SAFETY: an aligned buffer for O_DIRECT, freed below.
    unsafe {
        let buf = std::alloc::alloc_zeroed(layout);
        let n = libc::write(fd, buf.cast(), 16384);
        assert_eq!(
            n,
            16384,
            "O_DIRECT write: {}",
            std::io::Error::last_os_error()
        );
        std::alloc::dealloc(buf, layout);
        libc::close(fd);
    }
    assert_eq!(lstat(l.m("new")).st_size, 16384);
}

/// `index=on,metacopy=on`: a name of a lower hard link looked up before
/// another name's chmod made the index entry a metadata-only copy still
/// reads the data, and keeps it across a rewrite and a remount.
fn index_metacopy_lower_hard_link(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "a"), "important data\n");
    std::fs::hard_link(l.l(0, "a"), l.l(0, "b")).unwrap();
    let opts = "index=on,metacopy=on";
    let m = mount_opts(b, &l, opts);
    assert_eq!(lstat(l.m("a")).st_size, 15);
    chmod(l.m("b"), 0o600);
    assert_eq!(read_string(l.m("a")), "important data\n");
    assert_eq!(lstat(l.m("a")).st_mode & 0o7777, 0o600);
    // Rewritten in place through the other name.
    std::fs::OpenOptions::new()
        .write(true)
        .open(l.m("a"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"IMPORTANT"))
        .unwrap();
    assert_eq!(read_string(l.m("b")), "IMPORTANT data\n");
    m.unmount();
    let _m = mount_opts(b, &l, opts);
    assert_eq!(read_string(l.m("a")), "IMPORTANT data\n");
    assert_eq!(read_string(l.m("b")), "IMPORTANT data\n");
    assert_eq!(read_string(l.l(0, "a")), "important data\n");
}

/// An absolute redirect is walked a component at a time in each lower
/// layer: an opaque dir, a whiteout or a non-dir on the way ends the merge
/// (the differential test's seed 44 with all three features).
fn absolute_redirect_stops_at_opaque_dir(b: Backend) {
    let l = Layers::new(4);
    // l0: a/a merges; l1: `a` opaque; l2: `x` a file; l3: what lies below.
    write(l.l(0, "a/a/top"), "top");
    mkdir(l.l(1, "a"));
    set_opaque(l.l(1, "a"));
    write(l.l(2, "x"), "file");
    for f in ["a/a/hidden", "x/a/hidden"] {
        write(l.l(3, f), "hidden");
    }
    for (d, target) in [("p/d", "/a/a"), ("p/e", "/x/a")] {
        mkdir(l.u(d));
        setxattr(l.u(d), "trusted.overlay.redirect", target.as_bytes());
    }
    let _m = mount_opts(b, &l, "redirect_dir=on");
    assert_eq!(names(l.m("p/d")), ["top"]);
    assert!(names(l.m("p/e")).is_empty());
}

/// Reads `path` until `done` while another thread changes it; returns the
/// errnos seen and the number of reads.
fn read_while(
    path: &std::path::Path,
    done: &std::sync::atomic::AtomicBool,
) -> (std::collections::BTreeMap<i32, usize>, usize) {
    let mut errs = std::collections::BTreeMap::new();
    let mut reads = 0;
    while !done.load(std::sync::atomic::Ordering::Relaxed) {
        reads += 1;
        if let Err(e) = std::fs::read(path) {
            *errs.entry(e.raw_os_error().unwrap_or(0)).or_insert(0) += 1;
        }
    }
    (errs, reads)
}

/// What readers may see: nothing but, rarely, ESTALE, which the kernel
/// passes on when the name changed again during its one retry.
fn assert_readers(errs: &std::collections::BTreeMap<i32, usize>, reads: usize, allowed: &[i32]) {
    let stale = errs.get(&libc::ESTALE).copied().unwrap_or(0);
    let other: Vec<_> = errs
        .iter()
        .filter(|(e, _)| **e != libc::ESTALE && !allowed.contains(e))
        .collect();
    assert!(
        other.is_empty(),
        "errnos seen by readers: {errs:?} in {reads} reads"
    );
    assert!(
        stale * 20 < reads.max(1),
        "ESTALE {stale} times in {reads} reads"
    );
}

/// Reads `path` while `change(i)` runs 1,500 times in another thread,
/// then checks what the reads saw (`assert_readers`).
fn readers_while(path: &std::path::Path, change: impl Fn(usize) + Sync, allowed: &[i32]) {
    use std::sync::atomic::{AtomicBool, Ordering};
    // Set when the writer ends, panicking too, so the reader always stops.
    struct Done<'a>(&'a AtomicBool);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let done = AtomicBool::new(false);
    let (errs, reads) = std::thread::scope(|s| {
        s.spawn(|| {
            let _done = Done(&done);
            (0..1500).for_each(&change);
        });
        read_while(path, &done)
    });
    assert!(reads > 0);
    assert_readers(&errs, reads, allowed);
}

/// The atomic-replace idiom (write a temp file, rename it over the
/// target) never makes a reader of the target fail.
fn readers_of_a_replaced_file(b: Backend) {
    let l = Layers::new(1);
    write(l.u("d/f"), "old");
    let _m = mount(b, &l);
    let change = |i| {
        write(l.m("d/tmp"), format!("new {i}"));
        std::fs::rename(l.m("d/tmp"), l.m("d/f")).unwrap();
    };
    readers_while(&l.m("d/f"), change, &[]);
}

/// A lower file removed and made again: readers see it or ENOENT, never
/// the whiteout (ENXIO) or a changed type (EIO).
fn readers_of_a_removed_and_recreated_lower_file(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "d/g"), "low");
    let _m = mount(b, &l);
    let change = |i| {
        std::fs::remove_file(l.m("d/g")).unwrap();
        write(l.m("d/g"), format!("x {i}"));
    };
    readers_while(&l.m("d/g"), change, &[libc::ENOENT]);
}
