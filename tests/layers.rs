//! `rovl diff`, `rovl apply`, `rovl check`: layers as data.
//!
//! - Round trips: an upper written through rovl, and one written by the
//!   kernel (redirect_dir, index, metacopy on) for the same operations,
//!   each made a layer with `rovl diff` and extracted with `rovl apply`;
//!   the kernel's overlay of the extracted layer over the same lowers
//!   must show the original merged tree.
//! - The layer is deterministic, compressed layers carry the same diff-id.
//! - Hostile layers are refused with nothing written outside the target.
//! - `rovl check` finds planted damage; `--repair` leaves a tree the
//!   kernel mounts.

mod common;

use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Lower layers with a bit of everything (l0 on top of l1).
fn populate(l: &Layers) {
    for (i, rel, data) in [
        (1, "dir/a", "a\n"),
        (1, "dir/b", "b\n"),
        (1, "dir/sub/c", "c\n"),
        (1, "gone/g", "g\n"),
        (1, "gone/deep/h", "h\n"),
        (1, "keep/k", "k\n"),
        (1, "ren/r1", "r1\n"),
        (1, "ren/deep/r2", "r2\n"),
        (1, "file.txt", "file\n"),
        (1, "over", "from l1\n"),
        (0, "over", "from l0\n"),
        (0, "dir/x", "x\n"),
        (0, "big", ""),
    ] {
        let p = l.l(i, rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        write(&p, data);
    }
    write(l.l(0, "big"), vec![7u8; 300_000]);
    symlink("dir/a", l.l(1, "lowlink"));
}

/// What users do in a container: on the merged dir `m`.
fn workload(m: &Path) {
    write(m.join("new.txt"), "new\n");
    fs::hard_link(m.join("new.txt"), m.join("newlink")).unwrap();
    mkdir(m.join("newdir"));
    write(m.join("newdir/inner"), "inner\n");
    append(m.join("dir/a"), "more\n");
    chmod(m.join("dir/b"), 0o600);
    lchown(m.join("file.txt"), 1234, 5678);
    setxattr(m.join("keep/k"), "user.test", b"value");
    // A name in the overlay namespace, set by a user: stored escaped.
    setxattr(m.join("new.txt"), "trusted.overlay.mine", b"v");
    fs::remove_file(m.join("dir/sub/c")).unwrap();
    fs::remove_dir_all(m.join("gone")).unwrap();
    mkdir(m.join("gone"));
    write(m.join("gone/new"), "again\n");
    fs::rename(m.join("ren"), m.join("renamed")).unwrap();
    fs::remove_file(m.join("renamed/r1")).unwrap();
    write(m.join("renamed/added"), "added\n");
    fs::remove_file(m.join("over")).unwrap();
    symlink("new.txt", m.join("sl"));
    mknod(m.join("fifo"), libc::S_IFIFO | 0o644, 0);
    mknod(m.join("null"), libc::S_IFCHR | 0o666, makedev(1, 3));
    // Longer than ustar's 100 bytes: PAX records carry it.
    let long = m.join("l".repeat(120));
    mkdir(&long);
    write(long.join("f".repeat(90)), "long\n");
    symlink("t".repeat(150), m.join("longlink"));
    chmod(m.join("big"), 0o640);
}

/// Entries by path, and the hard-link groups.
type View = (BTreeMap<PathBuf, String>, BTreeSet<Vec<PathBuf>>);

/// A tree as compared here: entries with type, mode, owner, device, size,
/// data, link target, xattrs, mtime seconds (the root's left out: a layer
/// does not carry it), and the groups of hard-linked names.
fn view(root: &Path) -> View {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), Vec<PathBuf>> = BTreeMap::new();
    for (p, n) in snapshot(root) {
        let md = fs::symlink_metadata(root.join(&p)).unwrap();
        if md.is_file() && md.nlink() > 1 {
            inodes
                .entry((md.dev(), md.ino()))
                .or_default()
                .push(p.clone());
        }
        let mtime = if p.as_os_str().is_empty() {
            0
        } else {
            n.mtime.0
        };
        out.insert(
            p,
            format!(
                "{:o} {}:{} rdev={} size={} data={:?} link={:?} xattrs={:?} mtime={}",
                n.mode,
                n.uid,
                n.gid,
                n.rdev,
                n.size,
                n.data.as_ref().map(|d| {
                    use std::hash::{Hash, Hasher};
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    d.hash(&mut h);
                    h.finish()
                }),
                n.link,
                n.xattrs,
                mtime
            ),
        );
    }
    let groups = inodes.into_values().filter(|g| g.len() > 1).collect();
    (out, groups)
}

fn rovl_ok(args: &[&str]) -> String {
    let r = run_rovl(args);
    assert!(
        r.status.success(),
        "rovl {args:?} failed ({}):\n{}",
        r.status,
        r.stderr
    );
    r.stdout
}

/// The kernel's overlay view of `lowerdir` (read-only).
fn kernel_view(lowerdir: &str, mnt: &Path) -> View {
    let m = KernelMount::start(&format!("lowerdir={lowerdir}"), mnt)
        .unwrap_or_else(|e| panic!("kernel mount of {lowerdir}: {e}"));
    let v = view(&m.mountpoint);
    drop(m);
    v
}

/// The merged view of `l` (upper and work included), by the kernel.
fn original_view(l: &Layers, extra: &str) -> View {
    let m = KernelMount::start(&format!("{},{extra}", l.opts()), &l.merged)
        .unwrap_or_else(|e| panic!("kernel mount: {e}"));
    let v = view(&m.mountpoint);
    drop(m);
    v
}

/// `rovl diff --lower` then `rovl apply`; returns the applied dir.
fn diff_and_apply(l: &Layers, tag: &str) -> PathBuf {
    let tar = l.root().join(format!("{tag}.tar"));
    let lower = l.lowerdir_opt().trim_start_matches("lowerdir=").to_string();
    rovl_ok(&[
        "diff",
        "--lower",
        &lower,
        l.upper.to_str().unwrap(),
        "-o",
        tar.to_str().unwrap(),
    ]);
    let applied = l.root().join(format!("{tag}-applied"));
    rovl_ok(&[
        "apply",
        "--allow-devices",
        tar.to_str().unwrap(),
        applied.to_str().unwrap(),
    ]);
    applied
}

fn assert_views_equal(a: &View, b: &View, what: &str) {
    let mut diffs = Vec::new();
    for (k, v) in &a.0 {
        match b.0.get(k) {
            None => diffs.push(format!("only in the first: {k:?} {v}")),
            Some(w) if w != v => diffs.push(format!("{k:?}:\n  {v}\n  {w}")),
            _ => {}
        }
    }
    for (k, v) in &b.0 {
        if !a.0.contains_key(k) {
            diffs.push(format!("only in the second: {k:?} {v}"));
        }
    }
    assert!(diffs.is_empty(), "{what}:\n{}", diffs.join("\n"));
    assert_eq!(a.1, b.1, "{what}: hard-link groups");
}

const FEATURES: &str = "redirect_dir=on,index=on,metacopy=on";

/// The layer of an upper rovl wrote, applied over the same lowers, shows
/// the same merged tree.
#[test]
fn round_trip_of_a_rovl_upper() {
    if !require_root_fuse() || !require_kernel_overlay() {
        return;
    }
    let l = Layers::new(2);
    populate(&l);
    let m = mount_opts(Backend::Rovl, &l, FEATURES);
    workload(m.mountpoint());
    m.unmount();
    let original = original_view(&l, FEATURES);
    assert!(original.0.contains_key(Path::new("renamed/deep/r2")));
    assert!(!original.0.contains_key(Path::new("gone/g")));
    let applied = diff_and_apply(&l, "rovl");
    let lowers = format!(
        "{}:{}",
        applied.display(),
        l.lowerdir_opt().trim_start_matches("lowerdir=")
    );
    let shown = kernel_view(&lowers, &l.merged);
    assert_views_equal(&original, &shown, "original vs applied layer");
    // The user's overlay-namespace xattr is stored escaped, not as a marker.
    assert_eq!(
        getxattr(applied.join("new.txt"), "trusted.overlay.overlay.mine").as_deref(),
        Some(&b"v"[..])
    );
    assert!(is_whiteout(applied.join("over")));
    assert!(is_opaque(applied.join("gone")));
}

/// The same operations through the kernel and through rovl give uppers
/// whose layers apply to the same tree.
#[test]
fn kernel_and_rovl_uppers_give_the_same_layer_tree() {
    if !require_root_fuse() || !require_kernel_overlay() {
        return;
    }
    let mut applied = Vec::new();
    let mut layers = Vec::new();
    for b in [Backend::Kernel, Backend::Rovl] {
        let l = Layers::new(2);
        populate(&l);
        let m = mount_opts(b, &l, FEATURES);
        workload(m.mountpoint());
        m.unmount();
        applied.push(diff_and_apply(&l, &format!("{b:?}")));
        layers.push(l);
    }
    // Compared on their own (their mtimes differ by when each ran).
    let strip = |v: View| -> View {
        let m =
            v.0.into_iter()
                .map(|(k, s)| (k, s.split(" mtime=").next().unwrap().to_string()))
                .collect();
        (m, v.1)
    };
    let k = strip(view(&applied[0]));
    let r = strip(view(&applied[1]));
    assert_views_equal(&k, &r, "kernel-written vs rovl-written upper, applied");
    assert!(
        k.0.contains_key(Path::new("renamed/deep/r2")),
        "{:?}",
        k.0.keys()
    );
}

/// The same upper gives the same bytes; gzip and zstd carry the same
/// diff-id; the printed digest is the file's.
#[test]
fn layers_are_deterministic() {
    if !require_root_fuse() || !require_kernel_overlay() {
        return;
    }
    let l = Layers::new(2);
    populate(&l);
    let m = mount_opts(Backend::Kernel, &l, "redirect_dir=on");
    workload(m.mountpoint());
    m.unmount();
    let lower = l.lowerdir_opt().trim_start_matches("lowerdir=").to_string();
    let out = |name: &str, extra: &[&str]| -> (serde_json::Value, Vec<u8>) {
        let p = l.root().join(name);
        let mut args = vec![
            "diff",
            "--json",
            "--lower",
            &lower,
            l.upper.to_str().unwrap(),
        ];
        args.extend_from_slice(&["-o", p.to_str().unwrap()]);
        args.extend_from_slice(extra);
        let j = rovl_ok(&args);
        (serde_json::from_str(&j).unwrap(), fs::read(&p).unwrap())
    };
    let (a, ta) = out("a.tar", &[]);
    let (b, tb) = out("b.tar", &[]);
    assert_eq!(ta, tb, "the same upper gave different tars");
    assert_eq!(a["digest"], b["digest"]);
    assert_eq!(a["digest"], a["diff_id"]);
    let sha = Command::new("sha256sum")
        .arg(l.root().join("a.tar"))
        .output()
        .unwrap();
    let sha = String::from_utf8_lossy(&sha.stdout);
    assert_eq!(
        a["digest"].as_str().unwrap(),
        format!("sha256:{}", sha.split_whitespace().next().unwrap())
    );
    for (name, flag) in [("a.tar.gz", "--gzip"), ("a.tar.zst", "--zstd")] {
        let (c, _) = out(name, &[flag]);
        assert_eq!(c["diff_id"], a["diff_id"], "{flag}");
        assert_ne!(c["digest"], a["diff_id"], "{flag}");
        // apply reads it back by its magic number.
        let dir = l.root().join(format!("{name}.d"));
        rovl_ok(&[
            "apply",
            "--allow-devices",
            l.root().join(name).to_str().unwrap(),
            dir.to_str().unwrap(),
        ]);
        assert_eq!(read(dir.join("gone/new")), b"again\n");
    }
    // GNU tar reads it, with the long names.
    let list = Command::new("tar")
        .arg("-tf")
        .arg(l.root().join("a.tar"))
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.contains(&format!("{}/{}", "l".repeat(120), "f".repeat(90))),
        "{list}"
    );
    assert!(
        list.contains(".wh.over") && list.contains("gone/.wh..wh..opq"),
        "{list}"
    );
    // containers/storage's rule: opaque only where a lower has the dir.
    assert!(!list.contains("newdir/.wh..wh..opq"), "{list}");
}

/// Without lowers a renamed dir cannot be resolved: a clear refusal, and
/// no output file.
#[test]
fn redirect_without_lowers_is_refused() {
    if !require_root_fuse() || !require_kernel_overlay() {
        return;
    }
    let l = Layers::new(2);
    populate(&l);
    let m = mount_opts(Backend::Kernel, &l, "redirect_dir=on");
    fs::rename(m.mountpoint().join("ren"), m.mountpoint().join("renamed")).unwrap();
    m.unmount();
    let out = l.root().join("x.tar");
    let r = run_rovl(&[
        "diff",
        l.upper.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(!r.status.success());
    assert!(r.stderr.contains("--lower"), "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(!out.exists());
    assert_eq!(
        fs::read_dir(l.root())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains("rovl-tmp")
            })
            .count(),
        0
    );
}

// ---------------------------------------------------------------------------
// Hostile layers

/// A raw tar header with any name (the tar crate refuses unsafe ones);
/// names over 100 bytes as GNU long names.
fn raw_entry(
    b: &mut tar::Builder<Vec<u8>>,
    name: &[u8],
    kind: tar::EntryType,
    link: &[u8],
    data: &[u8],
) {
    if name.len() > 100 {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        use std::os::unix::ffi::OsStrExt;
        let p = Path::new(std::ffi::OsStr::from_bytes(name));
        b.append_data(&mut h, p, data).unwrap();
        return;
    }
    let mut h = tar::Header::new_ustar();
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    if matches!(kind, tar::EntryType::Char) {
        h.set_device_major(if link == b"00" { 0 } else { 1 })
            .unwrap();
        h.set_device_minor(if link == b"00" { 0 } else { 3 })
            .unwrap();
        h.as_old_mut().linkname = [0; 100];
    }
    h.set_cksum();
    b.append(&h, data).unwrap();
}

/// An entry: name, type, link target, data.
type Raw<'a> = (&'a [u8], tar::EntryType, &'a [u8], &'a [u8]);

fn layer(entries: &[Raw<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    raw_entry(&mut b, b"ok/", tar::EntryType::Directory, b"", b"");
    raw_entry(&mut b, b"ok/file", tar::EntryType::Regular, b"", b"fine");
    for (name, kind, link, data) in entries {
        raw_entry(&mut b, name, *kind, link, data);
    }
    b.into_inner().unwrap()
}

#[test]
fn hostile_layers_are_refused() {
    if !require_root_fuse() {
        return;
    }
    use tar::EntryType::*;
    let long = [b"a/".as_slice(), &[b'n'; 300]].concat();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "dotdot",
            layer(&[(b"../escaped", Regular, b"", b"x")]),
            "'..'",
        ),
        (
            "deep-dotdot",
            layer(&[(b"ok/../../escaped", Regular, b"", b"x")]),
            "'..'",
        ),
        (
            "absolute",
            layer(&[(b"/tmp/escaped", Regular, b"", b"x")]),
            "absolute",
        ),
        (
            "symlink-then-file",
            layer(&[
                (b"out", Symlink, b"../outside", b""),
                (b"out/escaped", Regular, b"", b"x"),
            ]),
            "not a dir",
        ),
        (
            "symlink-dir-then-file",
            layer(&[
                (b"ok/up", Symlink, b"/", b""),
                (b"ok/up/tmp/escaped", Regular, b"", b"x"),
            ]),
            "not a dir",
        ),
        (
            "hardlink-out",
            layer(&[(b"hl", Link, b"../outside/sentinel", b"")]),
            "hard link",
        ),
        (
            "hardlink-abs",
            layer(&[(b"hl", Link, b"/etc/passwd", b"")]),
            "hard link",
        ),
        (
            "hardlink-missing",
            layer(&[(b"hl", Link, b"nothere", b"")]),
            "hard link",
        ),
        (
            "device",
            layer(&[(b"dev", Char, b"13", b"")]),
            "--allow-devices",
        ),
        (
            "whiteout-device",
            layer(&[(b"wd", Char, b"00", b"")]),
            "whiteout",
        ),
        ("huge-name", layer(&[(&long, Regular, b"", b"x")]), "255"),
    ];
    for (tag, data, expect) in cases {
        let t = tempfile::Builder::new()
            .prefix("rovl-hostile-")
            .tempdir_in("/tmp")
            .unwrap();
        let outside = t.path().join("outside");
        mkdir(&outside);
        write(outside.join("sentinel"), "untouched");
        let layer = t.path().join("layer.tar");
        fs::write(&layer, &data).unwrap();
        let before = snapshot(t.path());
        let target = t.path().join("target");
        let r = run_rovl(&["apply", layer.to_str().unwrap(), target.to_str().unwrap()]);
        assert!(!r.status.success(), "{tag}: applied:\n{}", r.stdout);
        assert!(r.stderr.contains(expect), "{tag}: {}", r.stderr);
        assert_eq!(r.stderr.trim().lines().count(), 1, "{tag}: {}", r.stderr);
        // Nothing written: not the target, not a stage dir, not outside.
        assert_same_tree(&before, &snapshot(t.path()), tag);
        assert!(!Path::new("/tmp/escaped").exists(), "{tag}");
    }
}

/// Overlay markers in a layer's xattrs become the user's escaped names.
#[test]
fn layer_xattrs_cannot_plant_overlay_markers() {
    if !require_root_fuse() {
        return;
    }
    let mut b = tar::Builder::new(Vec::new());
    let mut pax = Vec::new();
    for (k, v) in [
        ("SCHILY.xattr.trusted.overlay.opaque", "y"),
        ("SCHILY.xattr.user.ok", "1"),
    ] {
        let rec = format!(" {k}={v}\n");
        let len = rec.len() + (rec.len() + 2).to_string().len();
        pax.extend_from_slice(format!("{len}{rec}").as_bytes());
    }
    let mut x = tar::Header::new_ustar();
    x.set_entry_type(tar::EntryType::XHeader);
    x.set_path("PaxHeader").unwrap();
    x.set_size(pax.len() as u64);
    x.set_cksum();
    b.append(&x, pax.as_slice()).unwrap();
    raw_entry(&mut b, b"d/", tar::EntryType::Directory, b"", b"");
    let t = tempfile::Builder::new()
        .prefix("rovl-xattr-")
        .tempdir_in("/tmp")
        .unwrap();
    let layer = t.path().join("layer.tar");
    fs::write(&layer, b.into_inner().unwrap()).unwrap();
    let target = t.path().join("target");
    rovl_ok(&["apply", layer.to_str().unwrap(), target.to_str().unwrap()]);
    assert!(!is_opaque(target.join("d")));
    assert_eq!(
        getxattr(target.join("d"), "trusted.overlay.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(
        getxattr(target.join("d"), "user.ok").as_deref(),
        Some(&b"1"[..])
    );
}

// ---------------------------------------------------------------------------
// rovl check

fn check_json(args: &[&str]) -> (i32, serde_json::Value) {
    let r = run_rovl(args);
    let code = r.status.code().unwrap_or(-1);
    let j = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("rovl {args:?}: {e}:\n{}\n{}", r.stdout, r.stderr));
    (code, j)
}

fn kinds(j: &serde_json::Value) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for f in j["findings"].as_array().unwrap() {
        m.entry(f["kind"].as_str().unwrap().to_string())
            .or_default()
            .push(f["path"].as_str().unwrap().to_string());
    }
    m
}

#[test]
fn check_finds_and_repairs_planted_damage() {
    if !require_root_fuse() || !require_kernel_overlay() {
        return;
    }
    let l = Layers::new(2);
    populate(&l);
    let m = mount_opts(Backend::Kernel, &l, FEATURES);
    workload(m.mountpoint());
    // Away and back: the kernel leaves a redirect to the dir's own path.
    fs::rename(m.mountpoint().join("dir/sub"), m.mountpoint().join("sub2")).unwrap();
    fs::rename(m.mountpoint().join("sub2"), m.mountpoint().join("dir/sub")).unwrap();
    m.unmount();
    assert_eq!(
        getxattr(l.u("dir/sub"), "trusted.overlay.redirect").as_deref(),
        Some(&b"/dir/sub"[..])
    );
    let lower = l.lowerdir_opt().trim_start_matches("lowerdir=").to_string();
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["check", "--json", "--lower", &lower]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.push(l.upper.display().to_string());
        v.push(l.work.display().to_string());
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run = |extra: &[&str]| {
        let a = args(extra);
        let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
        check_json(&a)
    };
    let (code, j) = run(&[]);
    assert_eq!(code, 0, "a clean kernel upper: {j}");
    // Damage.
    write(l.work.join("work/#1234"), "leftover");
    write(l.u("dir/.wh.x"), "");
    mknod_whiteout(l.u("nothing-below"));
    let f = l.u("keep/xw");
    write(&f, "");
    setxattr(&f, "trusted.overlay.whiteout", b"y");
    mkdir(l.u("nowhere"));
    setxattr(l.u("nowhere"), "trusted.overlay.redirect", b"/no/such/dir");
    mkdir(l.u("malformed"));
    setxattr(l.u("malformed"), "trusted.overlay.redirect", b"a/../b");
    setxattr(l.u("new.txt"), "trusted.overlay.nlink", b"garbage");
    let expected = [
        "work-leftover",
        "aufs-whiteout",
        "orphan-whiteout",
        "xwhiteout-unmarked",
        "redirect-nowhere",
        "redirect-malformed",
        "nlink-xattr",
    ];
    let (code, j) = run(&[]);
    let found = kinds(&j);
    for k in expected {
        assert!(found.contains_key(k), "{k} not found: {j}");
    }
    assert_eq!(code, 4, "{j}");
    assert!(
        found["aufs-whiteout"].contains(&"upper/dir/.wh.x".to_string()),
        "{j}"
    );
    // Nothing changed without --repair.
    assert!(l.work.join("work/#1234").exists());
    let (code, j) = run(&["--repair"]);
    assert_eq!(code, 1, "all of these are repairable: {j}");
    let (code, j) = run(&[]);
    assert_eq!(code, 0, "after repair: {j}");
    assert!(is_whiteout(l.u("dir/x")));
    // The kernel mounts the repaired dirs and shows what they say.
    let m = KernelMount::start(&format!("{},{FEATURES}", l.opts()), &l.merged).unwrap();
    assert!(!exists(m.mountpoint.join("dir/x")));
    assert!(!exists(m.mountpoint.join("keep/xw")));
    assert!(exists(m.mountpoint.join("renamed/deep/r2")));
    drop(m);
    // Lost data cannot be repaired: reported, exit 4.
    fs::remove_file(l.l(1, "keep/k")).unwrap();
    let mc = l.u("keep/k");
    if getxattr(&mc, "trusted.overlay.metacopy").is_none() {
        // The xattr change above copied it up whole: plant a metacopy one.
        fs::remove_file(&mc).unwrap();
        write(&mc, "");
        setxattr(&mc, "trusted.overlay.metacopy", b"");
    }
    let (code, j) = run(&["--repair"]);
    assert_eq!(code, 4, "{j}");
    assert!(kinds(&j).contains_key("metacopy-data-gone"), "{j}");
}

/// A layer piped to `rovl apply -` applies; its whiteout becomes a 0/0 device.
#[test]
fn apply_reads_stdin() {
    if !require_root_fuse() {
        return;
    }
    let data = layer(&[(b"ok/.wh.gone", tar::EntryType::Regular, b"", b"")]);
    let t = tempfile::Builder::new()
        .prefix("rovl-stdin-")
        .tempdir_in("/tmp")
        .unwrap();
    let target = t.path().join("target");
    let mut c = Command::new(rovl_bin())
        .args(["apply", "-", target.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    c.stdin.take().unwrap().write_all(&data).unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(is_whiteout(target.join("ok/gone")));
    assert_eq!(read(target.join("ok/file")), b"fine");
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 whiteouts"));
}

/// Bad input: one line that says what to do, a non-zero exit, nothing
/// written.
#[test]
fn bad_input_is_one_clear_line() {
    let t = tempfile::Builder::new()
        .prefix("rovl-bad-")
        .tempdir_in("/tmp")
        .unwrap();
    let full = t.path().join("full");
    mkdir(&full);
    write(full.join("x"), "x");
    let tarf = t.path().join("l.tar");
    fs::write(&tarf, layer(&[])).unwrap();
    let not_tar = t.path().join("garbage");
    fs::write(&not_tar, vec![b'g'; 2048]).unwrap();
    let before = snapshot(t.path());
    for (args, expect) in [
        (
            vec!["diff", "/nonexistent/upper", "-o", "/tmp/x.tar"],
            "/nonexistent/upper",
        ),
        (
            vec!["apply", tarf.to_str().unwrap(), full.to_str().unwrap()],
            "not empty",
        ),
        (
            vec!["apply", "/nonexistent.tar", "/tmp/nowhere-dir"],
            "/nonexistent.tar",
        ),
        (
            vec![
                "apply",
                not_tar.to_str().unwrap(),
                t.path().join("n").to_str().unwrap(),
            ],
            "apply",
        ),
        (
            vec!["check", "/nonexistent/u", "/nonexistent/w"],
            "/nonexistent/u",
        ),
    ] {
        let r = run_rovl(&args);
        assert!(!r.status.success(), "{args:?}");
        assert!(r.stderr.contains(expect), "{args:?}: {}", r.stderr);
        assert_eq!(r.stderr.trim().lines().count(), 1, "{args:?}: {}", r.stderr);
    }
    assert_same_tree(&before, &snapshot(t.path()), "the dir");
    assert!(!Path::new("/tmp/x.tar").exists());
}

/// A whiteout and then entries under the same name in one layer: the
/// lower one is gone, the new one stays (the OCI rule), so the new dir is
/// opaque.
#[test]
fn whiteout_then_entries_of_the_same_name() {
    if !require_root_fuse() {
        return;
    }
    use tar::EntryType::*;
    let data = layer(&[
        (b".wh.d", Regular, b"", b""),
        (b"d/", Directory, b"", b""),
        (b"d/f", Regular, b"", b"f"),
        (b".wh.e", Regular, b"", b""),
        (b"e/g", Regular, b"", b"g"),
        (b".wh.h", Regular, b"", b""),
        (b"h", Regular, b"", b"file now"),
    ]);
    let t = tempfile::Builder::new()
        .prefix("rovl-wh-")
        .tempdir_in("/tmp")
        .unwrap();
    let layer_path = t.path().join("l.tar");
    fs::write(&layer_path, data).unwrap();
    let target = t.path().join("target");
    rovl_ok(&[
        "apply",
        layer_path.to_str().unwrap(),
        target.to_str().unwrap(),
    ]);
    assert!(is_opaque(target.join("d")) && is_opaque(target.join("e")));
    assert_eq!(read(target.join("d/f")), b"f");
    assert_eq!(read(target.join("e/g")), b"g");
    assert_eq!(read(target.join("h")), b"file now");
    assert!(!is_opaque(target.join("ok")));
}

/// A socket cannot be in a tar: left out, with a warning, as tar does.
#[test]
fn sockets_are_left_out() {
    let t = tempfile::Builder::new()
        .prefix("rovl-sock-")
        .tempdir_in("/tmp")
        .unwrap();
    let upper = t.path().join("upper");
    mkdir(&upper);
    write(upper.join("f"), "f");
    let _sock = std::os::unix::net::UnixListener::bind(upper.join("s")).unwrap();
    let out = t.path().join("l.tar");
    let r = run_rovl(&["diff", upper.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert!(r.status.success(), "{}", r.stderr);
    assert!(r.stderr.contains("socket"), "{}", r.stderr);
    assert!(r.stdout.contains("entries: 1"), "{}", r.stdout);
}

/// Every whiteout and opaque form rovl reads, and fuse-overlayfs' owner
/// override, in an upper written by other tools (rootless layouts).
#[test]
fn other_tools_formats_become_oci() {
    if !require_root_fuse() {
        return;
    }
    let t = tempfile::Builder::new()
        .prefix("rovl-forms-")
        .tempdir_in("/tmp")
        .unwrap();
    let (upper, lower) = (t.path().join("upper"), t.path().join("lower"));
    for d in ["a", "b", "c", "d"] {
        fs::create_dir_all(lower.join(d)).unwrap();
        write(lower.join(d).join("old"), "old");
    }
    for d in ["a", "b", "c", "d"] {
        fs::create_dir_all(upper.join(d)).unwrap();
    }
    // a: containers/storage's .wh. file; b: an xattr whiteout (user.);
    // c: fuse-overlayfs' opaque xattr; d: .wh..wh..opq.
    write(upper.join("a/.wh.old"), "");
    write(upper.join("b/old"), "");
    setxattr(upper.join("b/old"), "user.overlay.whiteout", b"y");
    setxattr(upper.join("b"), "user.overlay.opaque", b"x");
    setxattr(upper.join("c"), "user.fuseoverlayfs.opaque", b"y");
    write(upper.join("d/.wh..wh..opq"), "");
    write(upper.join("d/mine"), "mine");
    setxattr(
        upper.join("d/mine"),
        "user.containers.override_stat",
        b"1000:1001:4755",
    );
    let out = t.path().join("l.tar");
    rovl_ok(&[
        "diff",
        "--lower",
        lower.to_str().unwrap(),
        upper.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    let mut ar = tar::Archive::new(fs::File::open(&out).unwrap());
    let mut got = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let h = e.header();
        let line = format!(
            "{} {:o} {}:{}",
            String::from_utf8_lossy(&e.path_bytes()),
            h.mode().unwrap(),
            h.uid().unwrap(),
            h.gid().unwrap()
        );
        let x: Vec<String> = e
            .pax_extensions()
            .unwrap()
            .map(|p| p.map(|r| r.unwrap().key().unwrap().to_string()).collect())
            .unwrap_or_default();
        got.push(format!("{line} {x:?}"));
    }
    let got = got.join("\n");
    for want in [
        "a/.wh.old ",
        "b/.wh.old ",
        "c/.wh..wh..opq ",
        "d/.wh..wh..opq ",
        "d/mine 4755 1000:1001 []",
    ] {
        assert!(got.contains(want), "{want:?} not in:\n{got}");
    }
    assert!(!got.contains("b/old ") && !got.contains("overlay"), "{got}");
    assert_eq!(
        got.lines().filter(|l| l.contains(".wh.")).count(),
        4,
        "{got}"
    );
}

/// Lower layers that were uppers once, with renamed dirs: `diff` follows
/// their redirects below them (relative and absolute), as the kernel's
/// lookup does, when it writes a renamed dir whole.
#[test]
fn redirects_in_lower_layers_are_followed() {
    if !require_root_fuse() || !require_kernel_overlay() {
        return;
    }
    let l = Layers::new(2);
    for (rel, data) in [("old/f", "f"), ("old/sub/g", "g"), ("deep/x", "x")] {
        let p = l.l(1, rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        write(p, data);
    }
    // l0 is an upper over l1 where old was renamed (relative redirect)
    // and old/sub moved under deep (absolute redirect).
    let (w0, m0) = (l.root().join("w0"), l.root().join("m0"));
    mkdir(&w0);
    mkdir(&m0);
    let k = KernelMount::start(
        &format!(
            "lowerdir={},upperdir={},workdir={},redirect_dir=on",
            l.lower(1).display(),
            l.lower(0).display(),
            w0.display()
        ),
        &m0,
    )
    .unwrap();
    fs::rename(m0.join("old"), m0.join("new")).unwrap();
    fs::rename(m0.join("new/sub"), m0.join("deep/moved")).unwrap();
    drop(k);
    assert!(getxattr(l.l(0, "new"), "trusted.overlay.redirect").is_some());
    // The workload renames those dirs again in the upper.
    let m = mount_opts(Backend::Kernel, &l, "redirect_dir=on");
    fs::rename(m.mountpoint().join("new"), m.mountpoint().join("again")).unwrap();
    write(m.mountpoint().join("again/added"), "added");
    fs::rename(m.mountpoint().join("deep"), m.mountpoint().join("deeper")).unwrap();
    m.unmount();
    let original = original_view(&l, "redirect_dir=on");
    assert!(
        original.0.contains_key(Path::new("again/f")),
        "{:?}",
        original.0.keys()
    );
    assert!(original.0.contains_key(Path::new("deeper/moved/g")));
    let applied = diff_and_apply(&l, "lr");
    let lowers = format!(
        "{}:{}",
        applied.display(),
        l.lowerdir_opt().trim_start_matches("lowerdir=")
    );
    let m = KernelMount::start(&format!("lowerdir={lowers},redirect_dir=on"), &l.merged)
        .unwrap_or_else(|e| panic!("kernel mount: {e}"));
    let shown = view(&m.mountpoint);
    drop(m);
    assert_views_equal(&original, &shown, "original vs applied layer");
    assert_eq!(read(applied.join("again/f")), b"f");
    assert_eq!(read(applied.join("deeper/moved/g")), b"g");
}

/// As a plain user: owners the user may give, `user.overlay.*` markers
/// (the default when not root), whiteouts the kernel reads with
/// `userxattr` (0/0 devices, which kernels since 5.8 let users make).
#[test]
fn unprivileged_apply() {
    if !require_root_fuse() || !require_kernel_overlay() {
        return;
    }
    let Some(user) = TestUser::new() else {
        return;
    };
    let gid: u32 = String::from_utf8_lossy(
        &Command::new("id")
            .args(["-g", &user.name])
            .output()
            .unwrap()
            .stdout,
    )
    .trim()
    .parse()
    .unwrap();
    let t = tempfile::Builder::new()
        .prefix("rovl-unpriv-")
        .tempdir_in("/tmp")
        .unwrap();
    chmod(t.path(), 0o755);
    let out = t.path().join("out");
    mkdir(&out);
    lchown(&out, user.uid, gid);
    let tarf = t.path().join("l.tar");
    fs::write(&tarf, owned_layer(user.uid, gid)).unwrap();
    chmod(&tarf, 0o644);
    let layer = out.join("layer");
    let r = Command::new("runuser")
        .args(["-u", &user.name, "--"])
        .arg(rovl_bin())
        .args(["apply", tarf.to_str().unwrap(), layer.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(lstat(layer.join("d/f")).st_uid, user.uid);
    assert_eq!(
        getxattr(layer.join("o"), "user.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert!(getxattr(layer.join("o"), "trusted.overlay.opaque").is_none());
    assert_layer_reads_with_userxattr(&layer, t.path());
}

/// Where mknod of a whiteout is refused (here: inside a kernel overlay,
/// which refuses it), `.wh.NAME` becomes the kernel's xattr whiteout, its
/// dir marked `opaque=x`; the kernel reads a copy of the result.
#[test]
fn apply_writes_xattr_whiteouts_where_mknod_is_refused() {
    if !require_root_fuse() || !require_kernel_overlay() {
        return;
    }
    let l = Layers::new(1);
    let m = mount_opts(Backend::Kernel, &l, "userxattr");
    let tarf = l.root().join("l.tar");
    fs::write(&tarf, owned_layer(0, 0)).unwrap();
    let layer = m.mountpoint().join("layer");
    rovl_ok(&[
        "apply",
        "--userxattr",
        tarf.to_str().unwrap(),
        layer.to_str().unwrap(),
    ]);
    let x = fs::symlink_metadata(layer.join("d/x")).unwrap();
    assert!(x.is_file() && x.len() == 0, "{x:?}");
    assert_eq!(
        getxattr(layer.join("d/x"), "user.overlay.whiteout").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(
        getxattr(layer.join("d"), "user.overlay.opaque").as_deref(),
        Some(&b"x"[..])
    );
    // Layers never inside a mountpoint: the kernel reads a copy.
    let copy = l.root().join("copy");
    let st = Command::new("cp")
        .args(["-a", "--preserve=all"])
        .arg(&layer)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(st.success());
    m.unmount();
    assert_layer_reads_with_userxattr(&copy, &l.root());
}

/// `d/` with `d/.wh.x` and `d/f`, and an opaque `o/`, owned by uid:gid.
fn owned_layer(uid: u32, gid: u32) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, data) in [
        ("d/", tar::EntryType::Directory, &b""[..]),
        ("d/.wh.x", tar::EntryType::Regular, b""),
        ("d/f", tar::EntryType::Regular, b"mine"),
        ("o/", tar::EntryType::Directory, b""),
        ("o/.wh..wh..opq", tar::EntryType::Regular, b""),
    ] {
        let mut h = tar::Header::new_ustar();
        h.set_path(name).unwrap();
        h.set_entry_type(kind);
        h.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
        h.set_uid(uid as u64);
        h.set_gid(gid as u64);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

/// The kernel, with `userxattr`, over `layer` and a lower holding `d/x`,
/// `d/y` and `o/z`: x hidden, y from below, f from the layer, o opaque.
fn assert_layer_reads_with_userxattr(layer: &Path, scratch: &Path) {
    let lower = scratch.join("lower-under");
    write(lower.join("d/x"), "x");
    write(lower.join("d/y"), "y");
    write(lower.join("o/z"), "z");
    let mnt = scratch.join("m-under");
    mkdir(&mnt);
    let m = KernelMount::start(
        &format!("lowerdir={}:{},userxattr", layer.display(), lower.display()),
        &mnt,
    )
    .unwrap();
    assert_eq!(names(m.mountpoint.join("d")), ["f", "y"]);
    assert!(names(m.mountpoint.join("o")).is_empty());
    drop(m);
}
