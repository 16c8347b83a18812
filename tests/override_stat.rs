//! `xattr_permissions=2`: owners, modes and device types kept in
//! `user.containers.override_stat`, as containers/storage writes them with
//! `force_mask` and fuse-overlayfs reads and writes them.

mod common;

use common::*;

const X: &str = "user.containers.override_stat";

fn stat_line(p: &std::path::Path) -> String {
    let st = lstat(p);
    format!(
        "{}:{} {:o} {:o} {}",
        st.st_uid,
        st.st_gid,
        st.st_mode & 0o7777,
        st.st_mode & libc::S_IFMT,
        st.st_rdev
    )
}

#[test]
fn override_stat_read_and_written() {
    if !require_root_fuse() {
        return;
    }
    let l = Layers::new(1);
    write(l.l(0, "a"), "a");
    setxattr(l.l(0, "a"), X, b"5:6:0640");
    write(l.l(0, "dev"), "");
    setxattr(l.l(0, "dev"), X, b"0:0:0620:char-1-3");
    mkdir(l.l(0, "d"));
    setxattr(l.l(0, "d"), X, b"7:7:0700");
    // An upper written by fuse-overlayfs 1.10, under its older name.
    write(l.u("old"), "o");
    setxattr(
        l.u("old"),
        "user.fuseoverlayfs.override_stat",
        b"9:9:100604",
    );
    let before = snapshot(l.lower(0));
    let m =
        RovlMount::start(&format!("{},xattr_permissions=2", l.opts()), &l.merged).expect("mount");
    assert_eq!(stat_line(&l.m("a")), "5:6 640 100000 0");
    assert_eq!(
        stat_line(&l.m("dev")),
        format!("0:0 620 20000 {}", makedev(1, 3))
    );
    assert_eq!(stat_line(&l.m("d")), "7:7 700 40000 0");
    assert_eq!(stat_line(&l.m("old")), "9:9 604 100000 0");
    // chown and chmod land in the xattr of the copy, not on the file.
    lchown(l.m("a"), 11, 12);
    chmod(l.m("a"), 0o604);
    assert_eq!(stat_line(&l.m("a")), "11:12 604 100000 0");
    assert_eq!(getxattr(l.u("a"), X).as_deref(), Some(&b"11:12:0604"[..]));
    assert_eq!(
        lstat(l.u("a")).st_mode & 0o7777,
        0o644,
        "the real mode stays"
    );
    // New objects record what the caller asked for.
    mkdir(l.m("nd"));
    chmod(l.m("nd"), 0o711);
    assert_eq!(getxattr(l.u("nd"), X).as_deref(), Some(&b"0:0:0711"[..]));
    drop(m);
    assert_same_tree(&before, &snapshot(l.lower(0)), "lower");
}
