//! index=on: hard links kept across copy-up (the kernel's `W/index`).
//! Each scenario runs on kernel overlayfs and on rovl.

mod common;

use common::*;

both_backends!(
    copy_up_keeps_lower_hard_links,
    unlink_and_link_keep_the_union_count,
    index_survives_remount,
    index_refuses_other_lower_layers,
    stale_and_orphan_entries_removed_at_mount,
    bad_index_entry_refused,
    read_only_mount_reads_the_index,
    xattr_set_through_one_name_shows_through_all,
);

/// Index entries other than leftovers (`#...`), by name.
fn index_entries(l: &Layers) -> Vec<String> {
    names(l.work.join("index"))
        .into_iter()
        .filter(|n| !n.starts_with('#'))
        .collect()
}

const OPTS: &str = "redirect_dir=off,index=on";

fn nlink_ino(p: impl AsRef<std::path::Path>) -> (u64, u64) {
    let st = lstat(p);
    (st.st_nlink, st.st_ino)
}

/// Three names of a lower file: writing through one shows through all,
/// all keep the lower number and count 3; the upper gets one index entry
/// and only the written name.
fn copy_up_keeps_lower_hard_links(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "a"), "data");
    std::fs::hard_link(l.l(0, "a"), l.l(0, "b")).unwrap();
    std::fs::hard_link(l.l(0, "a"), l.l(0, "c")).unwrap();
    let ino = lstat(l.l(0, "a")).st_ino;
    let _m = mount_opts(b, &l, OPTS);
    for n in ["a", "b", "c"] {
        assert_eq!(nlink_ino(l.m(n)), (3, ino), "{n} before copy-up");
    }
    append(l.m("a"), "+a");
    for n in ["a", "b", "c"] {
        assert_eq!(nlink_ino(l.m(n)), (3, ino), "{n} after copy-up");
        assert_eq!(read_string(l.m(n)), "data+a", "{n}");
    }
    assert_eq!(names(&l.upper), vec!["a"]);
    assert_eq!(lstat(l.u("a")).st_nlink, 2);
    let index: Vec<String> = names(l.work.join("index"))
        .into_iter()
        .filter(|n| !n.starts_with('#'))
        .collect();
    assert_eq!(index.len(), 1, "index entries: {index:?}");
    assert_eq!(
        getxattr(l.u("a"), "trusted.overlay.nlink"),
        Some(b"U+1".to_vec())
    );
    // A change through a name not yet copied up links that name up.
    chmod(l.m("b"), 0o600);
    assert_eq!(names(&l.upper), vec!["a", "b"]);
    assert_eq!(lstat(l.u("b")).st_ino, lstat(l.u("a")).st_ino);
    assert_eq!(lstat(l.m("c")).st_mode & 0o777, 0o600);
    assert_eq!(read_string(l.l(0, "a")), "data");
}

/// rm and ln change every name's count, as with one inode.
fn unlink_and_link_keep_the_union_count(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "d/a"), "x");
    std::fs::hard_link(l.l(0, "d/a"), l.l(0, "d/b")).unwrap();
    std::fs::hard_link(l.l(0, "d/a"), l.l(0, "d/c")).unwrap();
    let _m = mount_opts(b, &l, OPTS);
    append(l.m("d/a"), "y");
    std::fs::remove_file(l.m("d/c")).unwrap();
    assert!(is_whiteout(l.u("d/c")));
    assert_eq!(lstat(l.m("d/a")).st_nlink, 2);
    assert_eq!(lstat(l.m("d/b")).st_nlink, 2);
    std::fs::hard_link(l.m("d/a"), l.m("d/e")).unwrap();
    for n in ["a", "b", "e"] {
        assert_eq!(lstat(l.m(&format!("d/{n}"))).st_nlink, 3, "{n}");
    }
    assert_eq!(read_string(l.m("d/e")), "xy");
    // Removing every name removes the index entry too.
    for n in ["a", "b", "e"] {
        std::fs::remove_file(l.m(&format!("d/{n}"))).unwrap();
    }
    assert!(names(l.m("d")).is_empty());
    // (The kernel keeps its shared whiteout, `#<hex>`, in the index dir.)
    let left: Vec<String> = names(l.work.join("index"))
        .into_iter()
        .filter(|n| !n.starts_with('#'))
        .collect();
    assert!(left.is_empty(), "index entries left: {left:?}");
}

/// After a remount the names still share the copy and the count.
fn index_survives_remount(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "a"), "1");
    std::fs::hard_link(l.l(0, "a"), l.l(0, "b")).unwrap();
    let ino = lstat(l.l(0, "a")).st_ino;
    {
        let _m = mount_opts(b, &l, OPTS);
        append(l.m("a"), "2");
    }
    let _m = mount_opts(b, &l, OPTS);
    assert_eq!(read_string(l.m("b")), "12");
    assert_eq!(nlink_ino(l.m("a")), (2, ino));
    assert_eq!(nlink_ino(l.m("b")), (2, ino));
    append(l.m("b"), "3");
    assert_eq!(read_string(l.m("a")), "123");
    assert_eq!(lstat(l.u("a")).st_ino, lstat(l.u("b")).st_ino);
}

/// An upper dir indexed against one lower layer is refused over another.
fn index_refuses_other_lower_layers(b: Backend) {
    let l = Layers::new(2);
    {
        let _m = mount_opts(b, &l, OPTS);
    }
    assert!(getxattr(&l.upper, "trusted.overlay.origin").is_some());
    let swapped = format!(
        "lowerdir={}:{},upperdir={},workdir={},{OPTS}",
        l.lowers[1].display(),
        l.lowers[0].display(),
        l.upper.display(),
        l.work.display()
    );
    assert!(AnyMount::start(b, &swapped, &l.merged).is_err());
    assert!(!is_mounted(&l.merged));
}

/// At mount, as the kernel: an entry whose lower file is gone (stale), an
/// entry no name uses (one link, union count 0) and a leftover `#...` go;
/// an entry still in use stays.
fn stale_and_orphan_entries_removed_at_mount(b: Backend) {
    let l = Layers::new(1);
    for (x, y) in [("a", "b"), ("c", "d"), ("e", "f")] {
        write(l.l(0, x), x);
        std::fs::hard_link(l.l(0, x), l.l(0, y)).unwrap();
    }
    {
        let _m = mount_opts(b, &l, OPTS);
        for x in ["a", "c", "e"] {
            append(l.m(x), "+");
        }
    }
    assert_eq!(index_entries(&l).len(), 3);
    let entry_of = |name: &str| {
        let ino = lstat(l.u(name)).st_ino;
        index_entries(&l)
            .into_iter()
            .find(|e| lstat(l.work.join("index").join(e)).st_ino == ino)
            .unwrap()
    };
    let (keep, orphan, stale) = (entry_of("a"), entry_of("c"), entry_of("e"));
    // c: no upper name left and a union count of zero.
    std::fs::remove_file(l.u("c")).unwrap();
    setxattr(
        l.work.join("index").join(&orphan),
        "trusted.overlay.nlink",
        b"U-1",
    );
    // e: its lower file is gone.
    std::fs::remove_file(l.u("e")).unwrap();
    std::fs::remove_file(l.l(0, "e")).unwrap();
    std::fs::remove_file(l.l(0, "f")).unwrap();
    write(l.work.join("index").join("#leftover"), "x");
    let _m = mount_opts(b, &l, OPTS);
    assert_eq!(
        index_entries(&l),
        vec![keep],
        "stale {stale}, orphan {orphan}"
    );
    assert!(!exists(l.work.join("index").join("#leftover")));
    assert_eq!(read_string(l.m("b")), "a+");
    assert_eq!(read_string(l.m("d")), "c");
}

/// An index entry whose name is not a file handle stops the mount.
fn bad_index_entry_refused(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "a"), "a");
    {
        let _m = mount_opts(b, &l, OPTS);
    }
    write(l.work.join("index").join("zz"), "x");
    let opts = format!("{},{OPTS}", l.opts());
    assert!(AnyMount::start(b, &opts, &l.merged).is_err());
    assert!(!is_mounted(&l.merged));
    assert!(exists(l.work.join("index").join("zz")));
}

/// A read-only mount shows the indexed copy through every name.
fn read_only_mount_reads_the_index(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "a"), "data");
    std::fs::hard_link(l.l(0, "a"), l.l(0, "b")).unwrap();
    let ino = lstat(l.l(0, "a")).st_ino;
    {
        let _m = mount_opts(b, &l, OPTS);
        append(l.m("a"), "+more");
    }
    let _m = mount_opts(b, &l, &format!("ro,{OPTS}"));
    assert_eq!(read_string(l.m("b")), "data+more");
    for n in ["a", "b"] {
        let st = lstat(l.m(n));
        assert_eq!((st.st_nlink, st.st_ino), (2, ino), "{n}");
    }
}

/// An xattr set through one name of a lower hard link shows through the
/// others, also where they were asked before (and found none).
fn xattr_set_through_one_name_shows_through_all(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "a"), "data");
    std::fs::hard_link(l.l(0, "a"), l.l(0, "b")).unwrap();
    let _m = mount_opts(b, &l, OPTS);
    assert_eq!(getxattr(l.m("b"), "user.x"), None, "{b:?}");
    assert!(listxattr(l.m("b")).is_empty(), "{b:?}");
    setxattr(l.m("a"), "user.x", b"1");
    for n in ["a", "b"] {
        assert_eq!(
            getxattr(l.m(n), "user.x").as_deref(),
            Some(&b"1"[..]),
            "{b:?} {n}"
        );
        assert_eq!(listxattr(l.m(n)), vec!["user.x"], "{b:?} {n}");
    }
}
