//! Read-only mounts: lowerdir only (no upperdir), and the `ro` option.
//! Each scenario runs on kernel overlayfs and on rovl.

mod common;

use common::*;
use std::fs::OpenOptions;

both_backends!(no_upper_reads_work_writes_erofs, ro_option_with_upper);

fn assert_all_writes_erofs(l: &Layers) {
    let erofs = Some(libc::EROFS);
    let r = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(l.m("new"));
    assert_eq!(errno(r), erofs, "create");
    assert_eq!(
        errno(OpenOptions::new().write(true).open(l.m("f"))),
        erofs,
        "open for write"
    );
    assert_eq!(errno(std::fs::create_dir(l.m("nd"))), erofs, "mkdir");
    assert_eq!(errno(std::fs::remove_file(l.m("f"))), erofs, "unlink");
    assert_eq!(errno(std::fs::remove_dir(l.m("d"))), erofs, "rmdir");
    assert_eq!(errno(std::fs::rename(l.m("f"), l.m("g"))), erofs, "rename");
    assert_eq!(errno(std::fs::hard_link(l.m("f"), l.m("h"))), erofs, "link");
    assert_eq!(
        errno(std::os::unix::fs::symlink("x", l.m("s"))),
        erofs,
        "symlink"
    );
    assert_eq!(
        errno(try_mknod(l.m("p"), libc::S_IFIFO | 0o644, 0)),
        erofs,
        "mknod"
    );
    let c = cstr(&l.m("f"));
    // SAFETY: valid path.
    let r = unsafe { libc::chmod(c.as_ptr(), 0o600) };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        erofs,
        "chmod"
    );
    assert_eq!(errno(try_lchown(l.m("f"), 1, 1)), erofs, "chown");
    assert_eq!(
        errno(try_set_times(l.m("f"), (1, 0), (1, 0))),
        erofs,
        "utimes"
    );
    assert_eq!(
        errno(try_setxattr(l.m("f"), "user.x", b"1", 0)),
        erofs,
        "setxattr"
    );
    assert_eq!(
        errno(try_removexattr(l.m("f"), "user.low")),
        erofs,
        "removexattr"
    );
    // SAFETY: valid path.
    let r = unsafe { libc::truncate(c.as_ptr(), 0) };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        erofs,
        "truncate"
    );
}

fn populate(l: &Layers) {
    write(l.l(0, "f"), "top");
    setxattr(l.l(0, "f"), "user.low", b"1");
    write(l.l(1, "f"), "bottom");
    write(l.l(1, "d/x"), "x");
    mkdir(l.l(0, "d"));
    write(l.l(0, "d/y"), "y");
}

fn no_upper_reads_work_writes_erofs(b: Backend) {
    let l = Layers::new(2);
    populate(&l);
    let before = snapshot(l.root());
    let m = mount_ro(b, &l);
    assert_eq!(read_string(l.m("f")), "top");
    assert_eq!(names(l.m("d")), vec!["x", "y"]);
    assert_eq!(getxattr(l.m("f"), "user.low").as_deref(), Some(&b"1"[..]));
    assert_all_writes_erofs(&l);
    let s = statvfs_flags(&l.merged);
    assert_ne!(s & libc::ST_RDONLY, 0, "statvfs reports read-only");
    m.unmount();
    assert_same_tree(&before, &snapshot(l.root()), "layers");
}

fn ro_option_with_upper(b: Backend) {
    let l = Layers::new(2);
    populate(&l);
    write(l.u("u"), "upper file");
    let opts = format!("{},ro", l.opts());
    let m = AnyMount::start(b, &opts, &l.merged).expect("mount ro");
    assert_eq!(read_string(l.m("u")), "upper file");
    assert_all_writes_erofs(&l);
    m.unmount();
    assert!(!exists(l.u("f")));
}

fn statvfs_flags(p: &std::path::Path) -> libc::c_ulong {
    let c = cstr(p);
    // SAFETY: valid path and zeroed out-buffer.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
    s.f_flag
}
