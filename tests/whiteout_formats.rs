//! Lower layers written by other tools: containers/storage's `.wh.` files,
//! the kernel's xattr whiteouts, fuse-overlayfs' opaque xattr, all mixed
//! in one stack, read through lookup and readdir, and written over.

mod common;

use common::*;
use std::path::Path;

/// Paths and contents seen through a mount, in order.
fn listing(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for (p, n) in snapshot(root) {
        let kind = match n.mode & libc::S_IFMT {
            libc::S_IFDIR => "dir".to_string(),
            libc::S_IFCHR => format!("chr {}", n.rdev),
            _ => String::from_utf8_lossy(n.data.as_deref().unwrap_or_default()).into_owned(),
        };
        out.push(format!("{} {kind}", p.display()));
    }
    out
}

fn touch_xattr(p: impl AsRef<Path>, name: &str, value: &[u8]) {
    setxattr(p.as_ref(), name, value);
}

/// Three lowers: l0 in the AUFS format containers/storage writes, l1 with
/// kernel whiteouts (device and xattr) and fuse-overlayfs' opaque xattr,
/// l2 holding everything they hide. Dirs `d` and `m` span all three, so
/// lookups there go through the per-dir listing.
fn mixed_stack(l: &Layers) {
    for f in [
        "f1", "f2", "f3", "f4", "d/a", "d/b", "d/c", "e/old", "g/old", "h/hx", "h/hy",
    ] {
        write(l.l(2, f), f);
    }
    for f in ["k/old", "m/x", "m/y", "m/z"] {
        write(l.l(2, f), f);
    }
    // l1: kernel formats.
    mknod_whiteout(l.l(1, "f3"));
    mkdir(l.l(1, "d"));
    write(l.l(1, "d/l1only"), "l1");
    mknod_whiteout(l.l(1, "d/c"));
    mkdir(l.l(1, "h"));
    write(l.l(1, "h/hx"), "");
    touch_xattr(l.l(1, "h/hx"), "trusted.overlay.whiteout", b"y");
    touch_xattr(l.l(1, "h"), "trusted.overlay.opaque", b"x");
    mkdir(l.l(1, "k"));
    write(l.l(1, "k/new"), "k");
    touch_xattr(l.l(1, "k"), "user.fuseoverlayfs.opaque", b"y");
    mkdir(l.l(1, "m"));
    write(l.l(1, "m/w"), "");
    touch_xattr(l.l(1, "m/w"), "user.overlay.whiteout", b"y");
    // l0: AUFS format.
    write(l.l(0, ".wh.f1"), "");
    write(l.l(0, ".wh.f4"), "");
    write(l.l(0, "f4"), "new f4");
    mkdir(l.l(0, "d"));
    write(l.l(0, "d/.wh.a"), "");
    mkdir(l.l(0, "e"));
    write(l.l(0, "e/.wh..wh..opq"), "");
    write(l.l(0, "e/n"), "n");
    mkdir(l.l(0, "g"));
    write(l.l(0, "g/.wh..opq"), "");
    mkdir(l.l(0, "m"));
    write(l.l(0, "m/.wh.x"), "");
    write(l.l(0, "m/.wh.w"), "");
}

const EXPECTED: &[&str] = &[
    " dir",
    "d dir",
    "d/b d/b",
    "d/l1only l1",
    "e dir",
    "e/n n",
    "f2 f2",
    "f4 new f4",
    "g dir",
    "h dir",
    "h/hy h/hy",
    "k dir",
    "k/new k",
    "m dir",
    "m/y m/y",
    "m/z m/z",
];

#[test]
fn mixed_formats_read() {
    if !require_root_fuse() {
        return;
    }
    let l = Layers::new(3);
    mixed_stack(&l);
    for opts in [l.opts(), l.opts_ro()] {
        let m = RovlMount::start(&opts, &l.merged).expect("mount");
        assert_eq!(listing(&l.merged), EXPECTED, "{opts}");
        // Markers are never looked up, and what they hide stays hidden.
        for p in [
            ".wh.f1", "f1", "f3", "d/a", "d/c", "d/.wh.a", "e/old", "g/old",
        ] {
            assert_eq!(errno(try_lstat(l.m(p))), Some(libc::ENOENT), "{p}");
        }
        for p in [
            "h/hx",
            "k/old",
            "m/x",
            "m/w",
            "e/.wh..wh..opq",
            "g/.wh..opq",
        ] {
            assert_eq!(errno(try_lstat(l.m(p))), Some(libc::ENOENT), "{p}");
        }
        drop(m);
    }
}

#[test]
fn mixed_formats_written_over() {
    if !require_root_fuse() {
        return;
    }
    let l = Layers::new(3);
    mixed_stack(&l);
    let lowers: Vec<_> = (0..3).map(|i| snapshot(l.lower(i))).collect();
    let m = RovlMount::start(&l.opts(), &l.merged).expect("mount");
    // A hidden name made again is a new, upper file.
    write(l.m("f1"), "again");
    write(l.m("d/a"), "again");
    write(l.m("h/hx"), "again");
    assert_eq!(read_string(l.m("f1")), "again");
    assert_eq!(read_string(l.m("d/a")), "again");
    assert_eq!(read_string(l.m("h/hx")), "again");
    // An opaque dir of any format empties and is removed like any dir.
    std::fs::remove_file(l.m("e/n")).unwrap();
    std::fs::remove_dir(l.m("e")).unwrap();
    std::fs::remove_file(l.m("k/new")).unwrap();
    std::fs::remove_dir(l.m("k")).unwrap();
    mkdir(l.m("k"));
    assert!(names(l.m("k")).is_empty());
    // A dir of whiteouts in every format is empty.
    for f in ["m/y", "m/z"] {
        std::fs::remove_file(l.m(f)).unwrap();
    }
    std::fs::remove_dir(l.m("m")).unwrap();
    // `.wh.` names are refused, whatever creates them (fuse-overlayfs
    // refuses files; rovl refuses every kind, since all would be hidden).
    assert_eq!(
        errno(std::fs::write(l.m(".wh.new"), "x")),
        Some(libc::EINVAL)
    );
    assert_eq!(
        errno(std::fs::create_dir(l.m(".wh.dir"))),
        Some(libc::EINVAL)
    );
    assert_eq!(
        errno(std::os::unix::fs::symlink("t", l.m(".wh.sl"))),
        Some(libc::EINVAL)
    );
    assert_eq!(
        errno(std::fs::rename(l.m("f2"), l.m(".wh.f2"))),
        Some(libc::EINVAL)
    );
    let seen = listing(&l.merged);
    drop(m);
    // The lowers are untouched, and a remount sees the same tree.
    for (i, before) in lowers.iter().enumerate() {
        assert_same_tree(before, &snapshot(l.lower(i)), "lower");
    }
    let m = RovlMount::start(&l.opts(), &l.merged).expect("remount");
    assert_eq!(listing(&l.merged), seen);
    assert!(seen.contains(&"f1 again".to_string()), "{seen:?}");
    assert!(!seen
        .iter()
        .any(|s| s.starts_with("e ") || s.starts_with("m ")));
    assert!(seen.contains(&"k dir".to_string()) && !seen.iter().any(|s| s.starts_with("k/")));
    drop(m);
}

/// The kernel's own formats (devices, xattr whiteouts in `opaque=x` dirs)
/// read the same on the kernel and on rovl, over a stack of several lowers.
#[test]
fn kernel_formats_match_the_kernel() {
    if !require_root_fuse() || !require_kernel_overlay() {
        return;
    }
    let l = Layers::new(3);
    for f in ["a", "b", "d/a", "d/b", "d/c", "x/1", "x/2"] {
        write(l.l(2, f), f);
    }
    mknod_whiteout(l.l(1, "a"));
    mkdir(l.l(1, "d"));
    write(l.l(1, "d/a"), "");
    touch_xattr(l.l(1, "d/a"), "trusted.overlay.whiteout", b"y");
    touch_xattr(l.l(1, "d"), "trusted.overlay.opaque", b"x");
    // A non-empty file with the xattr is no whiteout.
    write(l.l(1, "d/b"), "kept");
    touch_xattr(l.l(1, "d/b"), "trusted.overlay.whiteout", b"y");
    mkdir(l.l(0, "x"));
    touch_xattr(l.l(0, "x"), "trusted.overlay.opaque", b"y");
    write(l.l(0, "x/3"), "3");
    let mut seen = Vec::new();
    for b in [Backend::Kernel, Backend::Rovl] {
        let m = mount(b, &l);
        let mut t = listing(&l.merged);
        for p in ["a", "d/a", "x/1"] {
            t.push(format!("{p}: {:?}", errno(try_lstat(l.m(p)))));
        }
        // What removing a name hidden below writes in the upper layer.
        std::fs::remove_file(l.m("d/c")).unwrap();
        t.push(format!("upper d/c whiteout: {}", is_whiteout(l.u("d/c"))));
        seen.push(t);
        m.unmount();
        std::fs::remove_dir_all(&l.upper).unwrap();
        mkdir(&l.upper);
    }
    assert_eq!(seen[0], seen[1], "kernel vs rovl");
    assert!(seen[1].contains(&"d/b kept".to_string()), "{:?}", seen[1]);
}

/// containers/storage's layers read the same on fuse-overlayfs, the
/// reference for the `.wh.` format.
#[test]
fn aufs_format_matches_fuse_overlayfs() {
    if !require_root_fuse() {
        return;
    }
    let Some(fuse_overlayfs) = require_program("fuse-overlayfs") else {
        return;
    };
    let l = Layers::new(3);
    for f in ["f1", "f2", "d/a", "d/b", "e/old"] {
        write(l.l(2, f), f);
    }
    write(l.l(1, ".wh.f1"), "");
    mkdir(l.l(1, "d"));
    write(l.l(1, "d/.wh.a"), "");
    mkdir(l.l(0, "e"));
    write(l.l(0, "e/.wh..wh..opq"), "");
    write(l.l(0, "e/new"), "new");
    let mut seen = Vec::new();
    for prog in [fuse_overlayfs, rovl_bin()] {
        let m = RovlMount::start_program(&prog, &["-f", "-o", &l.opts()], &l.merged)
            .unwrap_or_else(|e| panic!("{prog:?}: {e}"));
        seen.push(listing(&l.merged));
        drop(m);
    }
    assert_eq!(seen[0], seen[1], "fuse-overlayfs vs rovl");
    assert_eq!(
        seen[1],
        [" dir", "d dir", "d/b d/b", "e dir", "e/new new", "f2 f2"]
    );
}

/// Where the upper fs refuses a 0/0 `mknod` (and `RENAME_WHITEOUT`), rovl
/// writes the kernel's xattr whiteouts, and the kernel reads them. The
/// upper fs here is another rovl mount, which refuses both.
#[test]
fn xattr_whiteouts_where_mknod_is_refused() {
    if !require_root_fuse() || !require_kernel_overlay() {
        return;
    }
    let inner = Layers::new(1);
    let _im = RovlMount::start(&inner.opts(), &inner.merged).expect("inner mount");
    for d in ["up", "work"] {
        mkdir(inner.m(d));
    }
    assert_eq!(
        errno(try_mknod(inner.m("probe"), libc::S_IFCHR, 0)),
        Some(libc::EPERM),
        "the inner mount must refuse whiteouts for this test to mean anything"
    );
    let outer = Layers::new(1);
    for f in ["f", "g", "d/a", "d/b"] {
        write(outer.l(0, f), f);
    }
    let up = inner.m("up");
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        outer.lower(0).display(),
        up.display(),
        inner.m("work").display()
    );
    let om = RovlMount::start(&opts, &outer.merged).expect("outer mount");
    std::fs::remove_file(outer.m("f")).unwrap();
    std::fs::remove_file(outer.m("d/a")).unwrap();
    std::fs::rename(outer.m("d/b"), outer.m("d/c")).unwrap();
    let seen = listing(&outer.merged);
    assert_eq!(seen, [" dir", "d dir", "d/c d/b", "g g"]);
    drop(om);
    // On the upper fs: zero-size files with the whiteout xattr, their
    // dirs marked opaque=x.
    for w in ["f", "d/a", "d/b"] {
        let st = lstat(up.join(w));
        assert_eq!((file_type_bits(&st), st.st_size), (libc::S_IFREG, 0), "{w}");
        assert!(
            getxattr(up.join(w), "trusted.overlay.whiteout").is_some(),
            "{w}"
        );
    }
    for d in [up.clone(), up.join("d")] {
        assert_eq!(
            getxattr(&d, "trusted.overlay.opaque").as_deref(),
            Some(&b"x"[..])
        );
    }
    // rovl and the kernel read them back alike.
    let om = RovlMount::start(&opts, &outer.merged).expect("outer remount");
    assert_eq!(listing(&outer.merged), seen);
    drop(om);
    let ro = format!("lowerdir={}:{}", up.display(), outer.lower(0).display());
    let km = KernelMount::start(&ro, &outer.merged).expect("kernel mount");
    assert_eq!(listing(&outer.merged), seen, "the kernel's view");
    km.unmount();
}

/// `.wh.` markers in the upper layer, as fuse-overlayfs writes them where
/// it cannot `mknod`: rovl learns at a dir's first miss whether its upper
/// dir holds any (and skips the marker probe where none is), so what they
/// hide stays hidden whichever name is looked up first; in dirs rovl made
/// or copied up, misses stay misses and new names show.
#[test]
fn upper_markers_hide_whatever_is_looked_up_first() {
    if !require_root_fuse() {
        return;
    }
    let l = Layers::new(1);
    for f in ["a/x", "a/y", "a/z", "b/x", "b/y", "c/x"] {
        write(l.l(0, f), f);
    }
    for d in ["a", "b"] {
        mkdir(l.u(d));
        write(l.u(&format!("{d}/.wh.x")), "");
    }
    let m = RovlMount::start(&l.opts(), &l.merged).expect("mount");
    // a: a miss first, then the hidden name; b: the hidden name first.
    assert_eq!(errno(try_lstat(l.m("a/none"))), Some(libc::ENOENT));
    for d in ["a", "b"] {
        assert_eq!(
            errno(try_lstat(l.m(&format!("{d}/x")))),
            Some(libc::ENOENT),
            "{d}/x"
        );
        assert_eq!(
            read_string(l.m(&format!("{d}/y"))),
            format!("{d}/y"),
            "{d}/y"
        );
    }
    assert_eq!(errno(try_lstat(l.m("b/none"))), Some(libc::ENOENT));
    assert_eq!(errno(try_lstat(l.m("b/x"))), Some(libc::ENOENT));
    // c is copied up by a create in it, d is made: no markers in either.
    write(l.m("c/new"), "new");
    mkdir(l.m("d"));
    write(l.m("d/new"), "d");
    assert_eq!(read_string(l.m("c/x")), "c/x");
    assert_eq!(errno(try_lstat(l.m("c/none"))), Some(libc::ENOENT));
    assert_eq!(read_string(l.m("c/new")), "new");
    assert_eq!(read_string(l.m("d/new")), "d");
    assert_eq!(
        listing(&l.merged),
        [
            " dir",
            "a dir",
            "a/y a/y",
            "a/z a/z",
            "b dir",
            "b/y b/y",
            "c dir",
            "c/new new",
            "c/x c/x",
            "d dir",
            "d/new d",
        ]
    );
    drop(m);
}

/// A dir of one lower layer holding markers of every kind, looked up after
/// enough misses that rovl answers from a listing of the layer: markers
/// stay unseen, a name beside its own marker shows (a marker hides only
/// what is below), and a whiteout looks up as missing.
#[test]
fn markers_in_a_listed_dir_of_one_lower() {
    if !require_root_fuse() {
        return;
    }
    let l = Layers::new(2);
    write(l.l(1, "other"), "o");
    for (f, data) in [
        ("d/x", "x"),
        ("d/.wh.x", ""),
        ("d/.wh.gone", ""),
        ("d/y", "y"),
    ] {
        write(l.l(0, f), data);
    }
    write(l.l(0, "d/.wh..wh..opq"), "");
    mknod_whiteout(l.l(0, "d/dev"));
    let m = RovlMount::start(&l.opts(), &l.merged).expect("mount");
    let listed = || {
        rovl_stats(&l.merged)["listings"]
            .as_u64()
            .expect("listings")
    };
    lstat(l.m("d"));
    let before = listed();
    for i in 0..300 {
        assert_eq!(
            errno(try_lstat(l.m(&format!("d/miss{i}")))),
            Some(libc::ENOENT)
        );
    }
    assert_eq!(listed() - before, 6, "the six entries of d's layer");
    for p in [".wh.x", ".wh.gone", "gone", ".wh..wh..opq", "dev", "z"] {
        assert_eq!(
            errno(try_lstat(l.m(&format!("d/{p}")))),
            Some(libc::ENOENT),
            "d/{p}"
        );
    }
    assert_eq!(read_string(l.m("d/x")), "x");
    assert_eq!(read_string(l.m("d/y")), "y");
    // As the kernel lists a dir of one layer: its whiteout shows.
    assert_eq!(names(l.m("d")), vec!["dev", "x", "y"]);
    drop(m);
}
