//! metacopy=on: metadata-only copy-up, data copied at the first write.
//! Each scenario runs on kernel overlayfs and on rovl.

mod common;

use common::*;
use std::io::Write;

both_backends!(
    chmod_copies_metadata_only,
    write_copies_the_data,
    renamed_metacopy_keeps_its_data,
    metacopy_survives_remount,
    indexed_hard_link_keeps_first_redirect,
);

const OPTS: &str = "metacopy=on";
const METACOPY: &str = "trusted.overlay.metacopy";

fn data(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

/// chmod, chown, utimes and setxattr copy up the metadata only: the
/// upper file has the size, no data, and the metacopy mark; reads still
/// see the lower data.
fn chmod_copies_metadata_only(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "f"), data(100_000));
    write(l.l(0, "g"), "g");
    write(l.l(0, "h"), "h");
    let _m = mount_opts(b, &l, OPTS);
    chmod(l.m("f"), 0o600);
    lchown(l.m("g"), 1000, 1000);
    setxattr(l.m("h"), "user.x", b"1");
    for n in ["f", "g", "h"] {
        assert_eq!(getxattr(l.u(n), METACOPY), Some(Vec::new()), "{n}");
        assert!(getxattr(l.u(n), "trusted.overlay.origin").is_some(), "{n}");
    }
    let st = lstat(l.u("f"));
    assert_eq!(st.st_size, 100_000);
    // (ext4 may count one block for the xattrs.)
    assert!(
        st.st_blocks <= 8,
        "upper of a metacopy has no data: {}",
        st.st_blocks
    );
    assert_eq!(read(l.m("f")), data(100_000));
    // The merged file reports the lower data's blocks.
    assert_eq!(lstat(l.m("f")).st_blocks, lstat(l.l(0, "f")).st_blocks);
    assert_eq!(lstat(l.m("f")).st_mode & 0o777, 0o600);
    assert_eq!(read_string(l.m("g")), "g");
}

/// Opening for write copies the data into the upper file and drops the mark.
fn write_copies_the_data(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "f"), "lower");
    let _m = mount_opts(b, &l, OPTS);
    chmod(l.m("f"), 0o640);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(l.m("f"))
        .unwrap();
    f.write_all(b"+w").unwrap();
    drop(f);
    assert_eq!(getxattr(l.u("f"), METACOPY), None);
    assert_eq!(read_string(l.u("f")), "lower+w");
    assert_eq!(read_string(l.m("f")), "lower+w");
    assert_eq!(read_string(l.l(0, "f")), "lower");
}

/// A metacopy file moved elsewhere records an absolute redirect to its
/// data; a lower file renamed in place gets a relative one.
fn renamed_metacopy_keeps_its_data(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "a/f"), "fdata");
    write(l.l(0, "a/g"), "gdata");
    mkdir(l.l(0, "b"));
    let _m = mount_opts(b, &l, OPTS);
    chmod(l.m("a/f"), 0o600);
    std::fs::rename(l.m("a/f"), l.m("b/f2")).unwrap();
    assert_eq!(
        getxattr(l.u("b/f2"), "trusted.overlay.redirect"),
        Some(b"/a/f".to_vec())
    );
    assert!(is_whiteout(l.u("a/f")));
    assert_eq!(read_string(l.m("b/f2")), "fdata");
    std::fs::rename(l.m("a/g"), l.m("a/g2")).unwrap();
    assert_eq!(getxattr(l.u("a/g2"), METACOPY), Some(Vec::new()));
    assert_eq!(
        getxattr(l.u("a/g2"), "trusted.overlay.redirect"),
        Some(b"g".to_vec())
    );
    assert_eq!(read_string(l.m("a/g2")), "gdata");
}

/// After a remount the metacopy still reads the lower data, keeps its
/// number, and a write then copies the data.
fn metacopy_survives_remount(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "d/f"), "abc");
    let ino = lstat(l.l(0, "d/f")).st_ino;
    {
        let _m = mount_opts(b, &l, OPTS);
        chmod(l.m("d/f"), 0o600);
        std::fs::rename(l.m("d/f"), l.m("moved")).unwrap();
    }
    let _m = mount_opts(b, &l, OPTS);
    assert_eq!(read_string(l.m("moved")), "abc");
    assert_eq!(lstat(l.m("moved")).st_ino, ino);
    std::fs::write(l.m("moved"), "xyz").unwrap();
    assert_eq!(getxattr(l.u("moved"), METACOPY), None);
    assert_eq!(read_string(l.m("moved")), "xyz");
    assert_eq!(read_string(l.l(0, "d/f")), "abc");
}

/// With index=on the names of a lower hard link share one copy, and so
/// one redirect: the first rename sets it (the path of that name), and a
/// later rename of another name keeps it, as the kernel's one inode does.
fn indexed_hard_link_keeps_first_redirect(b: Backend) {
    let l = Layers::new(1);
    mkdir(l.l(0, "a"));
    mkdir(l.l(0, "d"));
    mkdir(l.l(0, "e"));
    write(l.l(0, "a/a"), data(5000));
    std::fs::hard_link(l.l(0, "a/a"), l.l(0, "d/b")).unwrap();
    let _m = mount_opts(b, &l, "redirect_dir=on,index=on,metacopy=on");
    // d/b is copied up (and known) before another name sets the redirect.
    chmod(l.m("d/b"), 0o600);
    std::fs::rename(l.m("a/a"), l.m("e/x")).unwrap();
    assert_eq!(
        getxattr(l.u("e/x"), "trusted.overlay.redirect"),
        Some(b"/a/a".to_vec())
    );
    std::fs::rename(l.m("d/b"), l.m("e/y")).unwrap();
    assert_eq!(
        getxattr(l.u("e/y"), "trusted.overlay.redirect"),
        Some(b"/a/a".to_vec()),
        "{b:?}"
    );
    assert_eq!(read(l.m("e/y")), data(5000));
}
