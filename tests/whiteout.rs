//! Whiteouts and opaque directories as written to the upper layer.
//! Each scenario runs on kernel overlayfs and on rovl.

mod common;

use common::*;

both_backends!(
    unlink_lower_file_leaves_whiteout,
    unlink_upper_only_file_leaves_nothing,
    unlink_file_in_upper_and_lower,
    unlink_lower_symlink_and_special,
    rmdir_lower_empty_dir_leaves_whiteout,
    rmdir_merged_dir_of_whiteouts,
    rmdir_merged_dir_of_whiteouts_and_a_device,
    rmdir_not_empty,
    rmdir_upper_only_dir,
    recreate_file_over_whiteout,
    create_over_whiteouts_in_upper_only_dirs,
    mkdir_over_removed_lower_dir_is_opaque,
    mkdir_over_removed_lower_file_is_opaque,
    unlink_in_lower_subdir_copies_up_parent,
    whiteout_listed_in_one_layer_dir,
    whiteouts_share_one_inode,
    whiteouts_past_the_link_limit,
    unlink_each_kind_of_name_in_a_merged_dir,
);

fn assert_whiteout(p: &std::path::Path) {
    let st = lstat(p);
    assert_eq!(st.st_mode, libc::S_IFCHR, "{p:?}: whiteout mode c---------");
    assert_eq!(st.st_rdev, makedev(0, 0), "{p:?}: whiteout rdev 0,0");
}

fn unlink_lower_file_leaves_whiteout(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "f"), "f");
    let before = snapshot(l.lower(0));
    let _m = mount(b, &l);
    std::fs::remove_file(l.m("f")).unwrap();
    assert_eq!(errno(try_lstat(l.m("f"))), Some(libc::ENOENT));
    assert!(names(&l.merged).is_empty());
    assert_whiteout(&l.u("f"));
    assert_same_tree(&before, &snapshot(l.lower(0)), "lower");
    assert!(work_leftovers(&l).is_empty());
}

fn unlink_upper_only_file_leaves_nothing(b: Backend) {
    let l = Layers::new(1);
    let _m = mount(b, &l);
    write(l.m("new"), "n");
    assert_eq!(read_string(l.u("new")), "n");
    std::fs::remove_file(l.m("new")).unwrap();
    assert!(!exists(l.u("new")));
    assert!(names(&l.upper).is_empty());
}

fn unlink_file_in_upper_and_lower(b: Backend) {
    let l = Layers::new(2);
    write(l.l(1, "f"), "1");
    write(l.l(0, "f"), "0");
    write(l.u("f"), "u");
    let _m = mount(b, &l);
    std::fs::remove_file(l.m("f")).unwrap();
    assert_whiteout(&l.u("f"));
    assert!(!exists(l.m("f")));
    assert_eq!(read_string(l.l(0, "f")), "0");
}

fn unlink_lower_symlink_and_special(b: Backend) {
    let l = Layers::new(1);
    symlink("f", l.l(0, "s"));
    mknod(l.l(0, "p"), libc::S_IFIFO | 0o644, 0);
    let _m = mount(b, &l);
    std::fs::remove_file(l.m("s")).unwrap();
    std::fs::remove_file(l.m("p")).unwrap();
    assert_whiteout(&l.u("s"));
    assert_whiteout(&l.u("p"));
    assert!(names(&l.merged).is_empty());
}

fn rmdir_lower_empty_dir_leaves_whiteout(b: Backend) {
    let l = Layers::new(1);
    mkdir(l.l(0, "d"));
    let _m = mount(b, &l);
    rmdir_to_whiteout(&l);
    assert!(exists(l.l(0, "d")));
}

/// Removes the merged dir `d`, which must leave its whiteout in the upper
/// dir and nothing in the workdir.
fn rmdir_to_whiteout(l: &Layers) {
    std::fs::remove_dir(l.m("d")).unwrap();
    assert_whiteout(&l.u("d"));
    assert!(!exists(l.m("d")));
    assert!(work_leftovers(l).is_empty(), "{:?}", work_leftovers(l));
}

fn rmdir_merged_dir_of_whiteouts(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "d/a"), "a");
    write(l.l(0, "d/b"), "b");
    let _m = mount(b, &l);
    std::fs::remove_file(l.m("d/a")).unwrap();
    std::fs::remove_file(l.m("d/b")).unwrap();
    assert!(names(l.m("d")).is_empty());
    rmdir_to_whiteout(&l);
}

/// rovl tells links of its shared whiteout by their number (held until
/// unmount); a device of another number, a whiteout made before the
/// mount, and the lower names still count as what they are.
fn rmdir_merged_dir_of_whiteouts_and_a_device(b: Backend) {
    let l = Layers::new(1);
    for f in ["a", "b", "c", "x"] {
        write(l.l(0, &format!("d/{f}")), f);
    }
    mknod_whiteout(l.u("d/x"));
    let _m = mount(b, &l);
    std::fs::remove_file(l.m("d/a")).unwrap();
    std::fs::remove_file(l.m("d/b")).unwrap();
    mknod(l.m("d/dev"), libc::S_IFCHR | 0o600, makedev(1, 3));
    assert_eq!(names(l.m("d")), vec!["c", "dev"]);
    assert_eq!(errno(std::fs::remove_dir(l.m("d"))), Some(libc::ENOTEMPTY));
    std::fs::remove_file(l.m("d/c")).unwrap();
    assert_eq!(names(l.m("d")), vec!["dev"]);
    assert_eq!(errno(std::fs::remove_dir(l.m("d"))), Some(libc::ENOTEMPTY));
    std::fs::remove_file(l.m("d/dev")).unwrap();
    assert!(names(l.m("d")).is_empty());
    rmdir_to_whiteout(&l);
}

fn rmdir_not_empty(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "d/a"), "a");
    write(l.l(0, "e/x"), "x");
    mknod_whiteout(l.u("e/x"));
    write(l.u("e/y"), "y");
    let _m = mount(b, &l);
    let r = std::fs::remove_dir(l.m("d"));
    assert_eq!(errno(r), Some(libc::ENOTEMPTY));
    let r = std::fs::remove_dir(l.m("e"));
    assert_eq!(errno(r), Some(libc::ENOTEMPTY));
    assert_eq!(names(l.m("d")), vec!["a"]);
    assert_eq!(names(l.m("e")), vec!["y"]);
    assert!(!exists(l.u("d")) || !is_whiteout(l.u("d")));
    // rmdir of a non-directory.
    write(l.m("file"), "f");
    assert_eq!(errno(std::fs::remove_dir(l.m("file"))), Some(libc::ENOTDIR));
    // unlink of a directory.
    assert_eq!(errno(std::fs::remove_file(l.m("d"))), Some(libc::EISDIR));
}

fn rmdir_upper_only_dir(b: Backend) {
    let l = Layers::new(1);
    let _m = mount(b, &l);
    mkdir(l.m("d"));
    assert!(lstat(l.u("d")).st_mode & libc::S_IFMT == libc::S_IFDIR);
    std::fs::remove_dir(l.m("d")).unwrap();
    assert!(!exists(l.u("d")));
}

fn recreate_file_over_whiteout(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "f"), "old");
    let _m = mount(b, &l);
    std::fs::remove_file(l.m("f")).unwrap();
    write(l.m("f"), "new");
    assert_eq!(read_string(l.m("f")), "new");
    assert_eq!(read_string(l.u("f")), "new");
    assert_eq!(read_string(l.l(0, "f")), "old");
    assert!(work_leftovers(&l).is_empty());
}

/// Whiteouts left in dirs of the upper layer alone (an opaque dir, a dir
/// no lower layer has) are replaced by new objects of every kind, as
/// after a removal through the mount.
fn create_over_whiteouts_in_upper_only_dirs(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "o/f"), "lower");
    std::fs::create_dir_all(l.u("o")).unwrap();
    set_opaque(l.u("o"));
    let kinds = ["d", "f", "p", "s"];
    for dir in ["o", "n"] {
        for k in kinds {
            mknod_whiteout(l.u(&format!("{dir}/{k}")));
        }
    }
    let _m = mount(b, &l);
    for dir in ["o", "n"] {
        let at = |k: &str| l.m(&format!("{dir}/{k}"));
        // (A one-layer dir lists its whiteouts, as on the kernel.)
        for k in kinds {
            assert_eq!(
                errno(try_lstat(at(k))),
                Some(libc::ENOENT),
                "{b:?} {dir}/{k}"
            );
        }
        write(at("f"), "new");
        mkdir(at("d"));
        std::os::unix::fs::symlink("t", at("s")).unwrap();
        mknod(at("p"), libc::S_IFIFO | 0o644, 0);
        assert_eq!(read_string(at("f")), "new", "{b:?} {dir}");
        assert_eq!(
            names(l.m(dir)),
            kinds.map(String::from).to_vec(),
            "{b:?} {dir}"
        );
        assert_eq!(read_string(l.u(&format!("{dir}/f"))), "new", "{b:?} {dir}");
        assert!(is_opaque(l.u(&format!("{dir}/d"))), "{b:?} {dir}/d: opaque");
        let st = lstat(l.u(&format!("{dir}/p")));
        assert_eq!(st.st_mode & libc::S_IFMT, libc::S_IFIFO, "{b:?} {dir}/p");
    }
    assert!(work_leftovers(&l).is_empty());
}

fn mkdir_over_removed_lower_dir_is_opaque(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "d/a"), "a");
    let _m = mount(b, &l);
    std::fs::remove_file(l.m("d/a")).unwrap();
    std::fs::remove_dir(l.m("d")).unwrap();
    mkdir(l.m("d"));
    assert!(is_opaque(l.u("d")), "upper d must be opaque");
    assert!(names(l.m("d")).is_empty());
    assert!(names(l.u("d")).is_empty());
    write(l.m("d/b"), "b");
    assert_eq!(names(l.m("d")), vec!["b"]);
    // The marker is not visible through the mount.
    assert!(!listxattr(l.m("d"))
        .iter()
        .any(|n| n.starts_with("trusted.overlay.")));
    assert!(work_leftovers(&l).is_empty());
}

fn mkdir_over_removed_lower_file_is_opaque(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "x"), "file");
    let _m = mount_opts(b, &l, "redirect_dir=off");
    std::fs::remove_file(l.m("x")).unwrap();
    mkdir(l.m("x"));
    assert_eq!(file_type_bits(&lstat(l.u("x"))), libc::S_IFDIR);
    assert!(is_opaque(l.u("x")));
    assert!(names(l.m("x")).is_empty());
    // A fresh dir with nothing below is not opaque (with redirect_dir=on,
    // any new dir in a merged dir is).
    mkdir(l.m("fresh"));
    assert!(!is_opaque(l.u("fresh")));
}

fn unlink_in_lower_subdir_copies_up_parent(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "a/b/f"), "f");
    write(l.l(0, "a/b/g"), "g");
    chmod(l.l(0, "a/b"), 0o750);
    let _m = mount(b, &l);
    std::fs::remove_file(l.m("a/b/f")).unwrap();
    assert_whiteout(&l.u("a/b/f"));
    assert_eq!(lstat(l.u("a/b")).st_mode, libc::S_IFDIR | 0o750);
    assert!(!is_opaque(l.u("a/b")));
    assert_eq!(names(l.m("a/b")), vec!["g"]);
}

/// A dir in one layer only lists a whiteout in it as a character device,
/// with the whiteout's own inode number as `d_ino`.
fn whiteout_listed_in_one_layer_dir(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "keep"), "k");
    mkdir(l.u("d"));
    mknod_whiteout(l.u("d/w"));
    let ino = lstat(l.u("d/w")).st_ino;
    let _m = mount(b, &l);
    assert_eq!(names(l.m("d")), ["w"]);
    assert_eq!(d_ino(&l.m("d"), "w"), ino, "d_ino of the listed whiteout");
    assert_eq!(errno(try_lstat(l.m("d/w"))), Some(libc::ENOENT));
}

/// As the kernel's since 5.8: every whiteout is a hard link of one 0/0
/// device kept in `W/work`, whether it lands on a free name or replaces
/// an upper file.
fn whiteouts_share_one_inode(b: Backend) {
    let l = Layers::new(1);
    for f in ["a", "b", "both"] {
        write(l.l(0, f), f);
    }
    mkdir(l.l(0, "d"));
    write(l.u("both"), "u");
    let _m = mount(b, &l);
    for f in ["a", "b", "both"] {
        std::fs::remove_file(l.m(f)).unwrap();
    }
    std::fs::remove_dir(l.m("d")).unwrap();
    let sts: Vec<_> = ["a", "b", "both", "d"].map(|f| lstat(l.u(f))).into();
    for (f, st) in ["a", "b", "both", "d"].iter().zip(&sts) {
        assert_whiteout(&l.u(f));
        assert_eq!(st.st_ino, sts[0].st_ino, "{f}: the shared whiteout");
    }
    // Four names in the upper dir and the one in W/work.
    assert_eq!(sts[0].st_nlink, 5);
    assert!(work_leftovers(&l).is_empty());
}

/// Past the upper fs's link limit (ext4's 65,000) whiteouts go on as links
/// of a new shared whiteout, as the kernel's do (`ovl_whiteout` on
/// `EMLINK`). rovl holds each one it made until unmount and tells links
/// of either by number, so listings hide them and rmdir clears them.
fn whiteouts_past_the_link_limit(b: Backend) {
    const EXT4_SUPER_MAGIC: i64 = 0xEF53;
    const DIRS: usize = 66;
    const PER_DIR: usize = 1000;
    let l = Layers::new(1);
    if sys::fs_magic(&l.upper) != Ok(EXT4_SUPER_MAGIC) {
        missing("whiteouts_past_the_link_limit needs an ext4 /tmp (a link limit of 65,000)");
        return;
    }
    let dir = |d: usize| format!("d{d:02}");
    for d in 0..DIRS {
        mkdir(l.l(0, &dir(d)));
        for f in 0..PER_DIR {
            std::fs::File::create(l.l(0, &format!("{}/f{f:03}", dir(d)))).unwrap();
        }
    }
    let _m = mount(b, &l);
    for d in 0..DIRS {
        for f in 0..PER_DIR {
            std::fs::remove_file(l.m(&format!("{}/f{f:03}", dir(d)))).unwrap();
        }
    }
    let mut inos = std::collections::BTreeSet::new();
    for d in 0..DIRS {
        assert!(names(l.m(&dir(d))).is_empty(), "{}: all removed", dir(d));
        for f in names(l.u(&dir(d))) {
            let st = lstat(l.u(&format!("{}/{f}", dir(d))));
            assert!(
                is_whiteout(l.u(&format!("{}/{f}", dir(d)))),
                "{}/{f}",
                dir(d)
            );
            inos.insert(st.st_ino);
        }
    }
    assert!(inos.len() >= 2, "66,000 whiteouts over one inode: {inos:?}");
    for d in 0..DIRS {
        std::fs::remove_dir(l.m(&dir(d))).unwrap();
        assert_whiteout(&l.u(&dir(d)));
    }
    assert!(names(&l.merged).is_empty());
    assert!(work_leftovers(&l).is_empty(), "{:?}", work_leftovers(&l));
}

/// Unlink of every kind of name in a dir with an upper half over two
/// lowers: rovl links the whiteout without probing the upper dir first
/// where only lowers hold the name, and takes the full way where the
/// upper dir holds it too.
fn unlink_each_kind_of_name_in_a_merged_dir(b: Backend) {
    let l = Layers::new(2);
    for f in ["low0", "both", "copied", "open"] {
        write(l.l(0, &format!("d/{f}")), f);
    }
    write(l.l(1, "d/low1"), "low1");
    write(l.l(1, "d/both"), "under");
    write(l.l(1, "d/hidden"), "hidden");
    mkdir(l.l(1, "d/sub"));
    std::fs::hard_link(l.l(0, "d/low0"), l.l(0, "d/link0")).unwrap();
    write(l.u("d/both"), "upper");
    mknod_whiteout(l.u("d/hidden"));
    let _m = mount(b, &l);
    std::fs::write(l.m("d/copied"), "changed").unwrap();
    let open = std::fs::File::open(l.m("d/open")).unwrap();
    for f in ["low0", "low1", "both", "copied", "open"] {
        std::fs::remove_file(l.m(&format!("d/{f}"))).unwrap();
        assert_whiteout(&l.u(&format!("d/{f}")));
        assert_eq!(errno(try_lstat(l.m(&format!("d/{f}")))), Some(libc::ENOENT));
    }
    assert_eq!(
        errno(std::fs::remove_file(l.m("d/hidden"))),
        Some(libc::ENOENT)
    );
    assert_eq!(
        errno(std::fs::remove_file(l.m("d/sub"))),
        Some(libc::EISDIR)
    );
    assert_eq!(std::io::read_to_string(open).unwrap(), "open");
    assert_eq!(read_string(l.m("d/link0")), "low0");
    assert_eq!(names(l.m("d")), vec!["link0", "sub"]);
    assert_eq!(read_string(l.l(0, "d/low0")), "low0");
    assert!(work_leftovers(&l).is_empty());
}
