//! Copy-up: every trigger, what it preserves, and what it leaves behind.
//! Each scenario runs on kernel overlayfs and on rovl.

mod common;

use common::*;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

both_backends!(
    trigger_open_for_write,
    trigger_write,
    trigger_truncate,
    trigger_chmod,
    trigger_chown,
    trigger_utimes,
    trigger_setxattr,
    trigger_removexattr,
    trigger_link,
    read_only_open_does_not_copy_up,
    symlink_copy_up,
    fifo_copy_up,
    device_copy_up,
    dir_copy_up_by_chmod,
    large_file_copy_up,
    copy_up_from_lower_layer_two,
);

const DATA: &str = "hello lower\n";
const F: &str = "dir/sub/f";
const ATIME: (i64, i64) = (1_000_000_000, 123);
const MTIME: (i64, i64) = (1_100_000_000, 456);

/// A lower file at `dir/sub/f` (mode 06755, owner 1234:5678, user xattrs,
/// fixed times) under parents with distinct modes, owners and times.
fn setup() -> Layers {
    let l = Layers::new(1);
    write(l.l(0, F), DATA);
    write(l.l(0, "dir/sub/other"), "other");
    write(l.l(0, "dir/sibling"), "sibling");
    let f = l.l(0, F);
    lchown(&f, 1234, 5678);
    chmod(&f, 0o6755);
    setxattr(&f, "user.foo", b"bar");
    setxattr(&f, "user.other", b"keep");
    set_times(&f, ATIME, MTIME);
    lchown(l.l(0, "dir"), 111, 222);
    chmod(l.l(0, "dir"), 0o751);
    lchown(l.l(0, "dir/sub"), 333, 444);
    chmod(l.l(0, "dir/sub"), 0o705);
    set_times(l.l(0, "dir/sub"), (900_000_000, 0), (900_000_001, 7));
    set_times(l.l(0, "dir"), (800_000_000, 0), (800_000_001, 9));
    l
}

/// Checks shared by all regular-file triggers: the file is in upper with
/// the parents copied up (mode/owner/mtime kept), lower unchanged, the
/// merged view matches upper, and the workdir is clean.
fn check_common(
    l: &Layers,
    lower_before: &std::collections::BTreeMap<std::path::PathBuf, Node>,
    sub_changed: bool,
) {
    let up = lstat(l.u(F));
    assert_eq!(file_type_bits(&up), libc::S_IFREG);
    for (d, mode, uid, gid) in [("dir", 0o751, 111, 222), ("dir/sub", 0o705, 333, 444)] {
        let u = lstat(l.u(d));
        let lo = lstat(l.l(0, d));
        assert_eq!(u.st_mode, libc::S_IFDIR | mode, "{d} mode");
        assert_eq!((u.st_uid, u.st_gid), (uid, gid), "{d} owner");
        if !(sub_changed && d == "dir/sub") {
            assert_eq!(mtime(&u), mtime(&lo), "{d} mtime");
        }
    }
    // Only the path to the file is copied up, not its siblings.
    assert!(!exists(l.u("dir/sibling")));
    assert!(!exists(l.u("dir/sub/other")));
    assert_same_tree(lower_before, &snapshot(l.lower(0)), "lower layer");
    assert!(work_entries(l).is_empty(), "workdir: {:?}", work_entries(l));
    let m = lstat(l.m(F));
    assert_eq!(m.st_mode, up.st_mode);
    assert_eq!((m.st_uid, m.st_gid), (up.st_uid, up.st_gid));
    assert_eq!(m.st_size, up.st_size);
    assert_eq!(read(l.m(F)), read(l.u(F)));
}

/// Runs `trigger` on the merged file and returns the upper file's stat,
/// taken before anything reads the data (reads may touch atime).
fn run_trigger(b: Backend, trigger: impl FnOnce(&Layers)) -> (Layers, libc::stat, AnyMount) {
    run_trigger_ex(b, false, trigger)
}

/// `sub_changed`: the trigger itself modifies `dir/sub` (so its mtime moves).
fn run_trigger_ex(
    b: Backend,
    sub_changed: bool,
    trigger: impl FnOnce(&Layers),
) -> (Layers, libc::stat, AnyMount) {
    let l = setup();
    let before = snapshot(l.lower(0));
    // The snapshot read the file and so touched its atime: set it back.
    set_times(l.l(0, F), ATIME, MTIME);
    let m = mount(b, &l);
    assert!(!exists(l.u(F)));
    trigger(&l);
    let up = lstat(l.u(F));
    check_common(&l, &before, sub_changed);
    (l, up, m)
}

fn assert_meta_kept(up: &libc::stat) {
    assert_eq!(
        up.st_mode,
        libc::S_IFREG | 0o6755,
        "mode incl. setuid/setgid"
    );
    assert_eq!((up.st_uid, up.st_gid), (1234, 5678));
    assert_eq!(mtime(up), MTIME);
    assert_eq!(atime(up), ATIME);
}

fn assert_xattrs_kept(l: &Layers) {
    assert_eq!(getxattr(l.u(F), "user.foo").as_deref(), Some(&b"bar"[..]));
    assert_eq!(
        getxattr(l.u(F), "user.other").as_deref(),
        Some(&b"keep"[..])
    );
    assert_eq!(getxattr(l.m(F), "user.foo").as_deref(), Some(&b"bar"[..]));
}

fn trigger_open_for_write(b: Backend) {
    let (l, up, _m) = run_trigger(b, |l| {
        let f = OpenOptions::new().write(true).open(l.m(F)).unwrap();
        drop(f);
    });
    assert_meta_kept(&up);
    assert_eq!(read_string(l.u(F)), DATA);
    assert_xattrs_kept(&l);
}

fn trigger_write(b: Backend) {
    let (l, up, _m) = run_trigger(b, |l| {
        let f = OpenOptions::new().write(true).open(l.m(F)).unwrap();
        f.write_all_at(b"J", 0).unwrap();
    });
    assert_eq!((up.st_uid, up.st_gid), (1234, 5678));
    assert_eq!(read_string(l.u(F)), "Jello lower\n");
    assert_eq!(read_string(l.l(0, F)), DATA);
    assert_xattrs_kept(&l);
}

fn trigger_truncate(b: Backend) {
    let (l, up, _m) = run_trigger(b, |l| {
        let f = OpenOptions::new().write(true).open(l.m(F)).unwrap();
        f.set_len(5).unwrap();
    });
    assert_eq!(up.st_size, 5);
    assert_eq!(up.st_mode, libc::S_IFREG | 0o6755);
    assert_eq!((up.st_uid, up.st_gid), (1234, 5678));
    assert_eq!(read_string(l.u(F)), "hello");
    assert_xattrs_kept(&l);

    // truncate(2) by path, on a fresh lower file.
    write(l.l(0, "t"), "0123456789");
    std::fs::OpenOptions::new()
        .write(true)
        .open(l.m("t"))
        .unwrap()
        .set_len(3)
        .unwrap();
    let c = cstr(&l.m("t"));
    // SAFETY: valid path.
    assert_eq!(unsafe { libc::truncate(c.as_ptr(), 2) }, 0);
    assert_eq!(read_string(l.u("t")), "01");
    assert_eq!(read_string(l.l(0, "t")), "0123456789");
}

fn trigger_chmod(b: Backend) {
    let (l, up, _m) = run_trigger(b, |l| chmod(l.m(F), 0o640));
    assert_eq!(up.st_mode, libc::S_IFREG | 0o640);
    assert_eq!((up.st_uid, up.st_gid), (1234, 5678));
    assert_eq!(mtime(&up), MTIME);
    assert_eq!(read_string(l.u(F)), DATA);
    assert_eq!(lstat(l.l(0, F)).st_mode, libc::S_IFREG | 0o6755);
    assert_xattrs_kept(&l);
}

fn trigger_chown(b: Backend) {
    let (l, up, _m) = run_trigger(b, |l| lchown(l.m(F), 42, 43));
    assert_eq!((up.st_uid, up.st_gid), (42, 43));
    // chown clears setuid/setgid of an executable, even for root.
    assert_eq!(up.st_mode, libc::S_IFREG | 0o755);
    assert_eq!(mtime(&up), MTIME);
    assert_eq!(read_string(l.u(F)), DATA);
    assert_xattrs_kept(&l);
}

fn trigger_utimes(b: Backend) {
    let (l, up, _m) = run_trigger(b, |l| {
        set_times(l.m(F), (2_000_000_000, 1), (2_000_000_001, 2))
    });
    assert_eq!(atime(&up), (2_000_000_000, 1));
    assert_eq!(mtime(&up), (2_000_000_001, 2));
    assert_eq!(up.st_mode, libc::S_IFREG | 0o6755);
    assert_eq!(read_string(l.u(F)), DATA);
    assert_eq!(mtime(&lstat(l.l(0, F))), MTIME);
    assert_xattrs_kept(&l);
}

fn trigger_setxattr(b: Backend) {
    let (l, up, _m) = run_trigger(b, |l| setxattr(l.m(F), "user.new", b"1"));
    assert_meta_kept(&up);
    assert_xattrs_kept(&l);
    assert_eq!(getxattr(l.u(F), "user.new").as_deref(), Some(&b"1"[..]));
    assert_eq!(getxattr(l.l(0, F), "user.new"), None);
    assert_eq!(read_string(l.u(F)), DATA);
}

fn trigger_removexattr(b: Backend) {
    let (l, up, _m) = run_trigger(b, |l| try_removexattr(l.m(F), "user.foo").unwrap());
    assert_meta_kept(&up);
    assert_eq!(getxattr(l.u(F), "user.foo"), None);
    assert_eq!(getxattr(l.m(F), "user.foo"), None);
    assert_eq!(
        getxattr(l.u(F), "user.other").as_deref(),
        Some(&b"keep"[..])
    );
    assert_eq!(
        getxattr(l.l(0, F), "user.foo").as_deref(),
        Some(&b"bar"[..])
    );
}

fn trigger_link(b: Backend) {
    let (l, up, _m) = run_trigger_ex(b, true, |l| {
        std::fs::hard_link(l.m(F), l.m("dir/sub/f2")).unwrap()
    });
    assert_eq!(up.st_mode, libc::S_IFREG | 0o6755);
    assert_eq!((up.st_uid, up.st_gid), (1234, 5678));
    assert_eq!(mtime(&up), MTIME);
    let up2 = lstat(l.u("dir/sub/f2"));
    assert_eq!(up.st_ino, up2.st_ino, "hard link in upper");
    assert_eq!(up2.st_nlink, 2);
    assert_eq!(read_string(l.m("dir/sub/f2")), DATA);
    assert_xattrs_kept(&l);
    assert!(!exists(l.l(0, "dir/sub/f2")));
}

fn read_only_open_does_not_copy_up(b: Backend) {
    let l = setup();
    let before = snapshot(l.lower(0));
    let _m = mount(b, &l);
    let mut s = String::new();
    File::open(l.m(F)).unwrap().read_to_string(&mut s).unwrap();
    assert_eq!(s, DATA);
    let _ = lstat(l.m(F));
    let _ = listxattr(l.m(F));
    let _ = getxattr(l.m(F), "user.foo");
    assert!(names(&l.upper).is_empty(), "upper: {:?}", names(&l.upper));
    assert_same_tree(&before, &snapshot(l.lower(0)), "lower layer");
}

fn symlink_copy_up(b: Backend) {
    let l = Layers::new(1);
    symlink("../some/target", l.l(0, "d/s"));
    lchown(l.l(0, "d/s"), 7, 8);
    let _m = mount(b, &l);
    lchown(l.m("d/s"), 9, 10);
    let up = lstat(l.u("d/s"));
    assert_eq!(file_type_bits(&up), libc::S_IFLNK);
    assert_eq!((up.st_uid, up.st_gid), (9, 10));
    assert_eq!(readlink(l.u("d/s")), Path::new("../some/target"));
    assert_eq!(readlink(l.m("d/s")), Path::new("../some/target"));
    assert_eq!(lstat(l.l(0, "d/s")).st_uid, 7);
    assert!(work_entries(&l).is_empty());
}

fn fifo_copy_up(b: Backend) {
    let l = Layers::new(1);
    mknod(l.l(0, "p"), libc::S_IFIFO | 0o644, 0);
    let _m = mount(b, &l);
    chmod(l.m("p"), 0o600);
    let up = lstat(l.u("p"));
    assert_eq!(up.st_mode, libc::S_IFIFO | 0o600);
    assert_eq!(lstat(l.l(0, "p")).st_mode, libc::S_IFIFO | 0o644);
    assert_eq!(lstat(l.m("p")).st_mode, libc::S_IFIFO | 0o600);
    assert!(work_entries(&l).is_empty());
}

fn device_copy_up(b: Backend) {
    let l = Layers::new(1);
    mknod(l.l(0, "null"), libc::S_IFCHR | 0o666, makedev(1, 3));
    mknod(l.l(0, "loop"), libc::S_IFBLK | 0o660, makedev(7, 0));
    let _m = mount(b, &l);
    lchown(l.m("null"), 5, 6);
    set_times(l.m("loop"), (1_500_000_000, 0), (1_500_000_000, 0));
    let n = lstat(l.u("null"));
    assert_eq!(n.st_mode, libc::S_IFCHR | 0o666);
    assert_eq!(n.st_rdev, makedev(1, 3));
    assert_eq!((n.st_uid, n.st_gid), (5, 6));
    let lp = lstat(l.u("loop"));
    assert_eq!(lp.st_mode, libc::S_IFBLK | 0o660);
    assert_eq!(lp.st_rdev, makedev(7, 0));
    assert_eq!(mtime(&lp), (1_500_000_000, 0));
    assert_eq!(lstat(l.m("null")).st_rdev, makedev(1, 3));
    assert!(work_entries(&l).is_empty());
}

fn dir_copy_up_by_chmod(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "d/a"), "a");
    write(l.l(0, "d/e/b"), "b");
    setxattr(l.l(0, "d"), "user.dx", b"v");
    chmod(l.l(0, "d"), 0o755);
    let _m = mount(b, &l);
    chmod(l.m("d"), 0o700);
    let up = lstat(l.u("d"));
    assert_eq!(up.st_mode, libc::S_IFDIR | 0o700);
    // Only the directory itself is copied up; its contents stay merged.
    assert!(names(l.u("d")).is_empty());
    assert_eq!(names(l.m("d")), vec!["a", "e"]);
    assert_eq!(getxattr(l.u("d"), "user.dx").as_deref(), Some(&b"v"[..]));
    assert!(!is_opaque(l.u("d")));
    assert_eq!(lstat(l.l(0, "d")).st_mode, libc::S_IFDIR | 0o755);
    assert!(work_entries(&l).is_empty());
}

fn large_file_copy_up(b: Backend) {
    let l = Layers::new(1);
    let size = 3 * 1024 * 1024 + 123;
    let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
    write(l.l(0, "big"), &data);
    let _m = mount(b, &l);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(l.m("big"))
        .unwrap();
    f.seek(SeekFrom::Start(2 * 1024 * 1024)).unwrap();
    f.write_all(b"XYZ").unwrap();
    drop(f);
    let mut want = data.clone();
    want[2 * 1024 * 1024..2 * 1024 * 1024 + 3].copy_from_slice(b"XYZ");
    assert!(read(l.u("big")) == want, "upper content differs");
    assert!(read(l.m("big")) == want, "merged content differs");
    assert!(read(l.l(0, "big")) == data, "lower changed");
}

fn copy_up_from_lower_layer_two(b: Backend) {
    // The file comes from the second lower; the parent exists in both lowers
    // with different modes: the topmost one is copied up.
    let l = Layers::new(2);
    write(l.l(1, "d/f"), "from l1");
    mkdir(l.l(0, "d"));
    chmod(l.l(0, "d"), 0o711);
    chmod(l.l(1, "d"), 0o755);
    let _m = mount(b, &l);
    let mut f = OpenOptions::new().append(true).open(l.m("d/f")).unwrap();
    f.write_all(b"+").unwrap();
    drop(f);
    assert_eq!(read_string(l.u("d/f")), "from l1+");
    assert_eq!(lstat(l.u("d")).st_mode, libc::S_IFDIR | 0o711);
    assert_eq!(read_string(l.l(1, "d/f")), "from l1");
}
