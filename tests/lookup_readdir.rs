//! Lookup and readdir merge rules, each run on kernel overlayfs and on rovl.

mod common;

use common::*;
use std::collections::BTreeMap;

both_backends!(
    top_layer_wins_for_files,
    dirs_merge_down_to_first_opaque,
    whiteouts_hide_lower_names,
    non_dir_hides_lower_dir,
    dir_hides_lower_non_dir,
    readdir_dedup_and_d_type,
    readdir_dot_and_dotdot,
    readdir_hides_whiteouts_only,
    empty_merged_root,
    lookup_missing_is_enoent,
    deep_merge_three_lowers,
    lookups_over_many_lowers,
    lookups_in_one_lower_after_many_misses,
);

fn top_layer_wins_for_files(b: Backend) {
    let l = Layers::new(2);
    write(l.l(1, "f"), "lowest");
    write(l.l(0, "f"), "middle");
    write(l.l(1, "g"), "g-lowest");
    write(l.l(0, "h"), "h-middle");
    write(l.u("h"), "h-upper");
    let _m = mount(b, &l);
    assert_eq!(read_string(l.m("f")), "middle");
    assert_eq!(read_string(l.m("g")), "g-lowest");
    assert_eq!(read_string(l.m("h")), "h-upper");
    assert_eq!(lstat(l.m("h")).st_size, 7);
}

fn dirs_merge_down_to_first_opaque(b: Backend) {
    let l = Layers::new(3);
    write(l.l(2, "d/c"), "c");
    write(l.l(1, "d/b"), "b");
    set_opaque(l.l(1, "d"));
    write(l.l(0, "d/a"), "a");
    write(l.u("d/u"), "u");
    // An opaque dir in upper hides everything below it.
    write(l.l(0, "o/hidden"), "x");
    write(l.u("o/shown"), "y");
    set_opaque(l.u("o"));
    let _m = mount(b, &l);
    assert_eq!(names(l.m("d")), vec!["a", "b", "u"]);
    assert!(!exists(l.m("d/c")));
    assert_eq!(read_string(l.m("d/b")), "b");
    assert_eq!(names(l.m("o")), vec!["shown"]);
    assert!(!exists(l.m("o/hidden")));
    // The opaque marker itself is not visible through the mount.
    assert!(!listxattr(l.m("o"))
        .iter()
        .any(|n| n.starts_with("trusted.overlay.")));
}

fn whiteouts_hide_lower_names(b: Backend) {
    let l = Layers::new(2);
    write(l.l(1, "f"), "f");
    write(l.l(1, "d/x"), "x");
    write(l.l(1, "keep"), "k");
    write(l.l(0, "g"), "g");
    mknod_whiteout(l.l(0, "f"));
    mknod_whiteout(l.u("d"));
    mknod_whiteout(l.u("g"));
    // A whiteout with nothing below is just hidden.
    mknod_whiteout(l.u("nothing"));
    let _m = mount(b, &l);
    assert_eq!(names(&l.merged), vec!["keep"]);
    for n in ["f", "d", "g", "nothing", "d/x"] {
        assert_eq!(errno(try_lstat(l.m(n))), Some(libc::ENOENT), "{n}");
    }
}

fn non_dir_hides_lower_dir(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "d/x"), "x");
    write(l.u("d"), "file now");
    let _m = mount(b, &l);
    let st = lstat(l.m("d"));
    assert_eq!(file_type_bits(&st), libc::S_IFREG);
    assert_eq!(read_string(l.m("d")), "file now");
    assert_eq!(errno(try_lstat(l.m("d/x"))), Some(libc::ENOTDIR));
    let ents = readdir_raw(&l.merged);
    let d: Vec<_> = ents.iter().filter(|e| e.name == "d").collect();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].d_type, libc::DT_REG);
}

fn dir_hides_lower_non_dir(b: Backend) {
    let l = Layers::new(2);
    write(l.l(1, "d"), "file below");
    write(l.l(0, "d/x"), "x");
    symlink("target", l.l(1, "s"));
    write(l.l(0, "s/y"), "y");
    let _m = mount(b, &l);
    assert_eq!(file_type_bits(&lstat(l.m("d"))), libc::S_IFDIR);
    assert_eq!(names(l.m("d")), vec!["x"]);
    assert_eq!(names(l.m("s")), vec!["y"]);
}

fn readdir_dedup_and_d_type(b: Backend) {
    let l = Layers::new(2);
    write(l.l(1, "same"), "1");
    write(l.l(0, "same"), "0");
    write(l.u("same"), "u");
    write(l.l(1, "dir/a"), "a");
    write(l.l(0, "dir/b"), "b");
    mkdir(l.u("dir"));
    symlink("same", l.l(0, "link"));
    mknod(l.l(1, "fifo"), libc::S_IFIFO | 0o644, 0);
    mknod(l.l(1, "chr"), libc::S_IFCHR | 0o644, makedev(1, 3));
    mknod(l.l(0, "blk"), libc::S_IFBLK | 0o600, makedev(7, 0));
    let _m = mount(b, &l);
    let ents = readdir_raw(&l.merged);
    let mut seen: BTreeMap<String, u8> = BTreeMap::new();
    for e in &ents {
        assert!(
            seen.insert(e.name.clone(), e.d_type).is_none(),
            "dup {}",
            e.name
        );
    }
    let expect = [
        (".", libc::DT_DIR),
        ("..", libc::DT_DIR),
        ("blk", libc::DT_BLK),
        ("chr", libc::DT_CHR),
        ("dir", libc::DT_DIR),
        ("fifo", libc::DT_FIFO),
        ("link", libc::DT_LNK),
        ("same", libc::DT_REG),
    ];
    let expect: BTreeMap<String, u8> = expect.iter().map(|(n, t)| (n.to_string(), *t)).collect();
    assert_eq!(seen, expect);
    // std's read_dir agrees on types.
    for e in std::fs::read_dir(&l.merged).unwrap() {
        let e = e.unwrap();
        let ft = e.file_type().unwrap();
        let want = std::fs::symlink_metadata(e.path()).unwrap().file_type();
        assert_eq!(ft, want, "{:?}", e.file_name());
    }
    assert_eq!(names(l.m("dir")), vec!["a", "b"]);
}

fn readdir_dot_and_dotdot(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "d/sub/f"), "f");
    let _m = mount(b, &l);
    for dir in [l.merged.clone(), l.m("d"), l.m("d/sub")] {
        let ents = readdir_raw(&dir);
        let dots: Vec<&str> = ents
            .iter()
            .filter(|e| e.name == "." || e.name == "..")
            .map(|e| e.name.as_str())
            .collect();
        assert_eq!(dots.len(), 2, "{dir:?}: {ents:?}");
        assert!(dots.contains(&".") && dots.contains(&".."));
    }
    // `.` carries the directory's own inode number.
    let ents = readdir_raw(l.m("d"));
    let dot = ents.iter().find(|e| e.name == ".").unwrap();
    assert_eq!(dot.ino, lstat(l.m("d")).st_ino);
}

fn readdir_hides_whiteouts_only(b: Backend) {
    // Whiteouts and opaque markers are hidden. AUFS-style `.wh.` names are
    // ordinary files to the kernel; rovl reads them as containers/storage
    // writes them, markers never shown (a documented difference).
    let l = Layers::new(1);
    write(l.l(0, "a"), "a");
    write(l.l(0, ".wh.b"), "not special");
    mknod_whiteout(l.u("a"));
    write(l.u("c"), "c");
    let _m = mount(b, &l);
    match b {
        Backend::Kernel => {
            assert_eq!(names(&l.merged), vec![".wh.b", "c"]);
            assert_eq!(read_string(l.m(".wh.b")), "not special");
        }
        Backend::Rovl => {
            assert_eq!(names(&l.merged), vec!["c"]);
            assert_eq!(errno(try_lstat(l.m(".wh.b"))), Some(libc::ENOENT));
        }
    }
}

fn empty_merged_root(b: Backend) {
    let l = Layers::new(1);
    let _m = mount(b, &l);
    assert!(names(&l.merged).is_empty());
    let st = lstat(&l.merged);
    assert_eq!(file_type_bits(&st), libc::S_IFDIR);
}

fn lookup_missing_is_enoent(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "f"), "f");
    let _m = mount(b, &l);
    assert_eq!(errno(try_lstat(l.m("nope"))), Some(libc::ENOENT));
    assert_eq!(errno(try_lstat(l.m("nope/deeper"))), Some(libc::ENOENT));
    assert_eq!(errno(try_lstat(l.m("f/child"))), Some(libc::ENOTDIR));
}

fn deep_merge_three_lowers(b: Backend) {
    let l = Layers::new(3);
    write(l.l(2, "a/b/c/low"), "2");
    write(l.l(1, "a/b/mid"), "1");
    write(l.l(0, "a/top"), "0");
    write(l.u("a/b/c/up"), "u");
    let _m = mount(b, &l);
    assert_eq!(names(l.m("a")), vec!["b", "top"]);
    assert_eq!(names(l.m("a/b")), vec!["c", "mid"]);
    assert_eq!(names(l.m("a/b/c")), vec!["low", "up"]);
    assert_eq!(read_string(l.m("a/b/c/low")), "2");
}

/// Names spread over 8 lowers: lookups must see each layer as the kernel
/// does (rovl answers from one listing of the dir's lower layers).
fn lookups_over_many_lowers(b: Backend) {
    let l = Layers::new(8);
    for i in 0..8 {
        write(l.l(i, &format!("d/only{i}")), format!("{i}"));
        write(l.l(i, "d/every"), format!("{i}"));
    }
    // A whiteout in layer 2 hides layer 5's file; a file in layer 6 is
    // hidden by nothing; a dir merges layers 1, 3 and 7 under an opaque 3.
    write(l.l(5, "d/hidden"), "5");
    mknod_whiteout(l.l(2, "d/hidden"));
    write(l.l(7, "d/sub/seven"), "7");
    write(l.l(3, "d/sub/three"), "3");
    set_opaque(l.l(3, "d/sub"));
    write(l.l(1, "d/sub/one"), "1");
    let _m = mount(b, &l);
    for i in 0..8 {
        assert_eq!(read_string(l.m(&format!("d/only{i}"))), format!("{i}"));
    }
    assert_eq!(read_string(l.m("d/every")), "0");
    assert_eq!(errno(try_lstat(l.m("d/hidden"))), Some(libc::ENOENT));
    assert_eq!(names(l.m("d/sub")), vec!["one", "three"]);
    assert_eq!(errno(try_lstat(l.m("d/sub/seven"))), Some(libc::ENOENT));
    for n in ["missing", "only8", "sub/missing"] {
        assert_eq!(errno(try_lstat(l.m(&format!("d/{n}")))), Some(libc::ENOENT));
    }
    // Removing a name from the middle leaves a whiteout only where needed.
    std::fs::remove_file(l.m("d/only4")).unwrap();
    assert!(is_whiteout(l.u("d/only4")));
    assert_eq!(errno(try_lstat(l.m("d/only4"))), Some(libc::ENOENT));
    let mut want: Vec<String> = (0..8)
        .filter(|&i| i != 4)
        .map(|i| format!("only{i}"))
        .collect();
    want.extend(["every".to_string(), "sub".to_string()]);
    want.sort();
    assert_eq!(names(l.m("d")), want);
}

/// Many names missed in a dir of one lower layer (which rovl then answers
/// from a listing of that layer), then every kind of name in it looked up,
/// made and removed as before.
fn lookups_in_one_lower_after_many_misses(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "d/a"), "a");
    write(l.l(0, "d/sub/inner"), "i");
    mknod_whiteout(l.l(0, "d/gone"));
    write(l.l(0, "e/f"), "f");
    write(l.u("d/up"), "u");
    let _m = mount(b, &l);
    for i in 0..300 {
        for d in ["d", "e"] {
            assert_eq!(
                errno(try_lstat(l.m(&format!("{d}/miss{i}")))),
                Some(libc::ENOENT)
            );
        }
    }
    assert_eq!(read_string(l.m("d/a")), "a");
    assert_eq!(read_string(l.m("d/sub/inner")), "i");
    assert_eq!(read_string(l.m("d/up")), "u");
    assert_eq!(read_string(l.m("e/f")), "f");
    assert_eq!(errno(try_lstat(l.m("d/gone"))), Some(libc::ENOENT));
    assert_eq!(errno(try_lstat(l.m("d/missing"))), Some(libc::ENOENT));
    write(l.m("d/new"), "n");
    write(l.m("e/new"), "n");
    std::fs::remove_file(l.m("d/a")).unwrap();
    assert!(is_whiteout(l.u("d/a")));
    assert_eq!(errno(try_lstat(l.m("d/a"))), Some(libc::ENOENT));
    assert_eq!(names(l.m("d")), vec!["new", "sub", "up"]);
    assert_eq!(names(l.m("e")), vec!["f", "new"]);
    assert_eq!(names(l.u("e")), vec!["new"]);
}

/// A dir of one lower layer is listed only once names missed in it have
/// cost about what its listing does: never where names are only found
/// (`rovl stats` counts the names held by listings).
#[test]
fn one_lower_dir_listed_after_misses_only() {
    if !require_root_fuse() {
        return;
    }
    let l = Layers::new(1);
    for i in 0..200 {
        write(l.l(0, &format!("found/f{i}")), "x");
    }
    for n in ["one", "two", "three"] {
        write(l.l(0, &format!("missed/{n}")), "y");
    }
    let _m = mount(Backend::Rovl, &l);
    let listed = || {
        rovl_stats(&l.merged)["listings"]
            .as_u64()
            .expect("listings")
    };
    for i in 0..200 {
        lstat(l.m(&format!("found/f{i}")));
    }
    assert_eq!(listed(), 0, "a dir whose names were all found was listed");
    for i in 0..3 {
        assert_eq!(
            errno(try_lstat(l.m(&format!("missed/m{i}")))),
            Some(libc::ENOENT)
        );
    }
    assert_eq!(listed(), 0, "listed after 3 misses");
    for i in 3..300 {
        assert_eq!(
            errno(try_lstat(l.m(&format!("missed/m{i}")))),
            Some(libc::ENOENT)
        );
    }
    assert_eq!(listed(), 3, "the three names of the missed dir");
}
