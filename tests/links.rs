//! Hard links, symlinks and device nodes through the mount.
//! Each scenario runs on kernel overlayfs and on rovl.

mod common;

use common::*;
use std::io::Write;
use std::path::Path;

both_backends!(
    hard_link_lower_file,
    hard_link_upper_file,
    hard_link_errors,
    symlink_create_and_readlink,
    readlink_lower_symlink,
    symlink_followed_within_mount,
    mknod_fifo_char_block,
    mknod_whiteout_refused,
    mknod_over_whiteout,
    lower_hard_link_names_share_number,
    root_reports_top_layer_number,
);

fn hard_link_lower_file(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "d/f"), "lower");
    let _m = mount(b, &l);
    std::fs::hard_link(l.m("d/f"), l.m("g")).unwrap();
    let u1 = lstat(l.u("d/f"));
    let u2 = lstat(l.u("g"));
    assert_eq!(u1.st_ino, u2.st_ino);
    assert_eq!(u1.st_nlink, 2);
    let m1 = lstat(l.m("d/f"));
    let m2 = lstat(l.m("g"));
    assert_eq!(m1.st_ino, m2.st_ino);
    assert_eq!(m1.st_nlink, 2);
    // A write through one name shows through the other.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(l.m("g"))
        .unwrap();
    f.write_all(b"+more").unwrap();
    drop(f);
    assert_eq!(read_string(l.m("d/f")), "lower+more");
    assert_eq!(read_string(l.l(0, "d/f")), "lower");
    // Unlinking one name leaves the other.
    std::fs::remove_file(l.m("d/f")).unwrap();
    assert!(is_whiteout(l.u("d/f")));
    assert_eq!(read_string(l.m("g")), "lower+more");
    assert_eq!(lstat(l.m("g")).st_nlink, 1);
}

fn hard_link_upper_file(b: Backend) {
    let l = Layers::new(1);
    let _m = mount(b, &l);
    write(l.m("a"), "a");
    std::fs::hard_link(l.m("a"), l.m("b")).unwrap();
    assert_eq!(lstat(l.m("a")).st_nlink, 2);
    assert_eq!(lstat(l.m("a")).st_ino, lstat(l.m("b")).st_ino);
    assert_eq!(lstat(l.u("a")).st_ino, lstat(l.u("b")).st_ino);
}

fn hard_link_errors(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "a"), "a");
    write(l.l(0, "b"), "b");
    mkdir(l.l(0, "d"));
    let _m = mount(b, &l);
    assert_eq!(
        errno(std::fs::hard_link(l.m("a"), l.m("b"))),
        Some(libc::EEXIST)
    );
    assert_eq!(
        errno(std::fs::hard_link(l.m("d"), l.m("d2"))),
        Some(libc::EPERM)
    );
    assert_eq!(
        errno(std::fs::hard_link(l.m("nope"), l.m("x"))),
        Some(libc::ENOENT)
    );
    assert_eq!(read_string(l.m("b")), "b");
}

fn symlink_create_and_readlink(b: Backend) {
    let l = Layers::new(1);
    let _m = mount(b, &l);
    symlink("some/where/../x", l.m("s"));
    assert_eq!(readlink(l.m("s")), Path::new("some/where/../x"));
    assert_eq!(readlink(l.u("s")), Path::new("some/where/../x"));
    assert_eq!(file_type_bits(&lstat(l.m("s"))), libc::S_IFLNK);
    assert_eq!(lstat(l.m("s")).st_size, "some/where/../x".len() as i64);
    // Symlink to an absolute path, dangling.
    symlink("/nonexistent/abs", l.m("abs"));
    assert_eq!(readlink(l.m("abs")), Path::new("/nonexistent/abs"));
    assert_eq!(errno(std::fs::metadata(l.m("abs"))), Some(libc::ENOENT));
    // Over an existing name.
    write(l.m("f"), "f");
    assert_eq!(
        errno(std::os::unix::fs::symlink("t", l.m("f"))),
        Some(libc::EEXIST)
    );
}

fn readlink_lower_symlink(b: Backend) {
    let l = Layers::new(1);
    symlink("target", l.l(0, "s"));
    write(l.l(0, "target"), "through link");
    let _m = mount(b, &l);
    assert_eq!(readlink(l.m("s")), Path::new("target"));
    assert_eq!(read_string(l.m("s")), "through link");
    assert!(names(&l.upper).is_empty());
}

fn symlink_followed_within_mount(b: Backend) {
    let l = Layers::new(2);
    write(l.l(1, "real/f"), "deep");
    symlink("real", l.l(0, "alias"));
    let _m = mount(b, &l);
    assert_eq!(read_string(l.m("alias/f")), "deep");
    // Writing through the link copies up the target, not the link.
    write(l.m("alias/f"), "changed");
    assert_eq!(read_string(l.u("real/f")), "changed");
    assert!(!exists(l.u("alias")));
}

fn mknod_fifo_char_block(b: Backend) {
    let l = Layers::new(1);
    let _m = mount(b, &l);
    mknod(l.m("p"), libc::S_IFIFO | 0o640, 0);
    mknod(l.m("c"), libc::S_IFCHR | 0o600, makedev(1, 5));
    mknod(l.m("b"), libc::S_IFBLK | 0o660, makedev(7, 3));
    let p = lstat(l.u("p"));
    assert_eq!(p.st_mode, libc::S_IFIFO | 0o640);
    let c = lstat(l.u("c"));
    assert_eq!(c.st_mode, libc::S_IFCHR | 0o600);
    assert_eq!(c.st_rdev, makedev(1, 5));
    let bl = lstat(l.u("b"));
    assert_eq!(bl.st_mode, libc::S_IFBLK | 0o660);
    assert_eq!(bl.st_rdev, makedev(7, 3));
    assert_eq!(lstat(l.m("c")).st_rdev, makedev(1, 5));
    assert_eq!(lstat(l.m("b")).st_rdev, makedev(7, 3));
    let ents = readdir_raw(&l.merged);
    let t = |n: &str| ents.iter().find(|e| e.name == n).unwrap().d_type;
    assert_eq!(
        (t("p"), t("c"), t("b")),
        (libc::DT_FIFO, libc::DT_CHR, libc::DT_BLK)
    );
    // Regular file via mknod.
    mknod(l.m("r"), libc::S_IFREG | 0o644, 0);
    assert_eq!(lstat(l.u("r")).st_mode, libc::S_IFREG | 0o644);
}

fn mknod_whiteout_refused(b: Backend) {
    // Creating a char 0/0 through the mount would forge a whiteout: the
    // kernel refuses with EPERM.
    let l = Layers::new(1);
    let _m = mount(b, &l);
    let r = try_mknod(l.m("wh"), libc::S_IFCHR | 0o644, makedev(0, 0));
    assert_eq!(errno(r), Some(libc::EPERM));
    assert!(!exists(l.m("wh")));
    assert!(!exists(l.u("wh")));
}

fn mknod_over_whiteout(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "p"), "was a file");
    let _m = mount(b, &l);
    std::fs::remove_file(l.m("p")).unwrap();
    mknod(l.m("p"), libc::S_IFIFO | 0o600, 0);
    assert_eq!(lstat(l.u("p")).st_mode, libc::S_IFIFO | 0o600);
    assert_eq!(lstat(l.m("p")).st_mode, libc::S_IFIFO | 0o600);
}

/// Two names of a lower hard link show the lower number in stat and
/// readdir; copying one up gives it the upper number at once, and the
/// other keeps the lower one.
fn lower_hard_link_names_share_number(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "d/a"), "data");
    std::fs::hard_link(l.l(0, "d/a"), l.l(0, "d/b")).unwrap();
    let lower = lstat(l.l(0, "d/a")).st_ino;
    let _m = mount(b, &l);
    for name in ["a", "b"] {
        assert_eq!(lstat(l.m(&format!("d/{name}"))).st_ino, lower, "{name}");
        assert_eq!(d_ino(&l.m("d"), name), lower, "d_ino of {name}");
    }
    // Listing twice: the second listing may come from readdirplus.
    assert_eq!(d_ino(&l.m("d"), "b"), lower);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(l.m("d/a"))
        .unwrap();
    f.write_all(b"+").unwrap();
    drop(f);
    let upper = lstat(l.u("d/a")).st_ino;
    assert_ne!(upper, lower);
    assert_eq!(lstat(l.m("d/a")).st_ino, upper);
    assert_eq!(lstat(l.m("d/b")).st_ino, lower);
    assert_eq!(read_string(l.m("d/b")), "data");
}

/// The root reports the number of its top layer's root (the upper one).
fn root_reports_top_layer_number(b: Backend) {
    let l = Layers::new(2);
    let m = mount(b, &l);
    assert_eq!(lstat(m.mountpoint()).st_ino, lstat(l.u("")).st_ino);
}
