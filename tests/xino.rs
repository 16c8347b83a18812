//! Layers on two filesystems: inode numbers stay unique (the kernel's xino).
//! Each scenario runs on kernel overlayfs and on rovl.

mod common;

use common::*;

both_backends!(numbers_unique_across_filesystems);

/// Lower on the test fs, upper on a tmpfs, xino=on (rovl maps by default
/// too; the kernel's xino=auto only with a 32-bit upper fs): a lower
/// file's number gets the lower fs id in the high bits, an upper file keeps
/// its own (fs id 0),
/// and copy-up keeps the mapped lower number.
fn numbers_unique_across_filesystems(b: Backend) {
    let l = Layers::new(1);
    let fs2 = TmpfsMount::start(&l.root().join("fs2")).expect("mount tmpfs");
    let (upper, work) = (fs2.mountpoint.join("u"), fs2.mountpoint.join("w"));
    std::fs::create_dir(&upper).unwrap();
    std::fs::create_dir(&work).unwrap();
    write(l.l(0, "d/f"), "f");
    write(l.l(0, "d/g"), "g");
    let opts = format!(
        "lowerdir={},upperdir={},workdir={},xino=on",
        l.lowers[0].display(),
        upper.display(),
        work.display()
    );
    let m = AnyMount::start(b, &opts, &l.merged).expect("mount");
    let lower_f = lstat(l.l(0, "d/f")).st_ino;
    // Two filesystems: fs ids 0 (upper) and 1 (lower), two xino bits.
    let mapped_f = lower_f | 1 << 63;
    assert_eq!(lstat(l.m("d/f")).st_ino, mapped_f);
    assert_eq!(d_ino(&l.m("d"), "f"), mapped_f);
    write(l.m("d/new"), "n");
    let upper_new = lstat(upper.join("d/new")).st_ino;
    assert_eq!(lstat(l.m("d/new")).st_ino, upper_new);
    // Copy-up keeps the mapped lower number.
    std::fs::write(l.m("d/g"), "changed").unwrap();
    let mapped_g = lstat(l.l(0, "d/g")).st_ino | 1 << 63;
    assert_eq!(lstat(l.m("d/g")).st_ino, mapped_g);
    m.unmount();
    drop(fs2);
}
