//! rename(2) and renameat2(2) through the mount.
//! Each scenario runs on kernel overlayfs and on rovl.

mod common;

use common::*;

const RENAME_NOREPLACE: u32 = libc::RENAME_NOREPLACE;
const RENAME_EXCHANGE: u32 = libc::RENAME_EXCHANGE;

both_backends!(
    rename_lower_file,
    rename_upper_file,
    rename_over_existing_lower_file,
    rename_into_other_dir,
    noreplace,
    exchange_lower_and_upper,
    exchange_upper_files,
    lower_dir_rename_is_exdev,
    merged_dir_rename_is_exdev,
    upper_only_dir_rename_works,
    rename_file_onto_itself,
    rename_dir_over_nonempty_dir,
    redirect_lower_dir_same_parent,
    redirect_dir_across_parents_and_back,
    redirect_dir_into_opaque_and_over_empty,
);

const REDIRECT: &str = "trusted.overlay.redirect";

/// redirect_dir=on: a lower dir renamed in its parent gets a relative
/// redirect, only the dir is copied up, and a whiteout hides the old name.
fn redirect_lower_dir_same_parent(b: Backend) {
    let l = Layers::new(2);
    write(l.l(0, "p/d/f"), "f0");
    write(l.l(1, "p/d/g"), "g1");
    let before = snapshot(l.lower(0));
    let _m = mount_opts(b, &l, "redirect_dir=on");
    std::fs::rename(l.m("p/d"), l.m("p/e")).unwrap();
    assert_eq!(names(l.m("p/e")), vec!["f", "g"]);
    assert_eq!(read_string(l.m("p/e/g")), "g1");
    assert!(!exists(l.m("p/d")));
    assert_eq!(getxattr(l.u("p/e"), REDIRECT), Some(b"d".to_vec()));
    assert!(is_whiteout(l.u("p/d")));
    // Only the dir itself was copied up.
    assert!(names(l.u("p/e")).is_empty());
    // A new dir in a merged dir is opaque, so a later redirect into it
    // cannot merge stray lower entries.
    mkdir(l.m("p/new"));
    assert!(is_opaque(l.u("p/new")));
    assert_same_tree(&before, &snapshot(l.lower(0)), "lower");
}

/// redirect_dir=on: moved to another parent the redirect is absolute; moved
/// twice it keeps pointing at the lower path; moved back it still merges.
fn redirect_dir_across_parents_and_back(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "a/d/f"), "f");
    mkdir(l.l(0, "z"));
    let _m = mount_opts(b, &l, "redirect_dir=on");
    std::fs::create_dir(l.m("x")).unwrap();
    std::fs::rename(l.m("a/d"), l.m("x/d2")).unwrap();
    assert_eq!(getxattr(l.u("x/d2"), REDIRECT), Some(b"/a/d".to_vec()));
    std::fs::rename(l.m("x/d2"), l.m("z/d3")).unwrap();
    assert_eq!(getxattr(l.u("z/d3"), REDIRECT), Some(b"/a/d".to_vec()));
    assert_eq!(read_string(l.m("z/d3/f")), "f");
    std::fs::rename(l.m("z/d3"), l.m("a/d")).unwrap();
    assert_eq!(names(l.m("a/d")), vec!["f"]);
    assert_eq!(read_string(l.m("a/d/f")), "f");
    assert!(names(l.m("x")).is_empty());
    assert!(names(l.m("z")).is_empty());
}

/// redirect_dir=on: a merged dir moved into an opaque dir, and over an
/// empty lower dir, keeps its lower entries.
fn redirect_dir_into_opaque_and_over_empty(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "d/f"), "f");
    mkdir(l.l(0, "empty"));
    write(l.l(0, "o/hidden"), "h");
    let _m = mount_opts(b, &l, "redirect_dir=on");
    write(l.m("d/g"), "g");
    std::fs::remove_file(l.m("o/hidden")).unwrap();
    std::fs::remove_dir(l.m("o")).unwrap();
    std::fs::create_dir(l.m("o")).unwrap();
    assert!(is_opaque(l.u("o")));
    std::fs::rename(l.m("d"), l.m("o/d")).unwrap();
    assert_eq!(names(l.m("o/d")), vec!["f", "g"]);
    assert_eq!(names(l.m("o")), vec!["d"]);
    std::fs::rename(l.m("o/d"), l.m("empty")).unwrap();
    assert_eq!(names(l.m("empty")), vec!["f", "g"]);
    assert_eq!(getxattr(l.u("empty"), REDIRECT), Some(b"/d".to_vec()));
}

/// rovl's default is redirect_dir=on: a lower dir renames without EXDEV.
#[test]
fn rovl_default_renames_lower_dirs() {
    if !require_root_fuse() {
        return;
    }
    let l = Layers::new(1);
    write(l.l(0, "d/f"), "f");
    let _m = mount(Backend::Rovl, &l);
    std::fs::rename(l.m("d"), l.m("e")).unwrap();
    assert_eq!(read_string(l.m("e/f")), "f");
    assert_eq!(getxattr(l.u("e"), REDIRECT), Some(b"d".to_vec()));
}

fn rename_lower_file(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "a"), "data a");
    chmod(l.l(0, "a"), 0o604);
    let before = snapshot(l.lower(0));
    let _m = mount(b, &l);
    std::fs::rename(l.m("a"), l.m("b")).unwrap();
    assert_eq!(names(&l.merged), vec!["b"]);
    assert_eq!(read_string(l.m("b")), "data a");
    assert_eq!(lstat(l.m("b")).st_mode, libc::S_IFREG | 0o604);
    assert!(is_whiteout(l.u("a")));
    assert_eq!(read_string(l.u("b")), "data a");
    assert_same_tree(&before, &snapshot(l.lower(0)), "lower");
    assert!(work_leftovers(&l).is_empty());
}

fn rename_upper_file(b: Backend) {
    let l = Layers::new(1);
    let _m = mount(b, &l);
    write(l.m("a"), "x");
    std::fs::rename(l.m("a"), l.m("b")).unwrap();
    assert_eq!(names(&l.upper), vec!["b"]);
    assert_eq!(read_string(l.m("b")), "x");
}

fn rename_over_existing_lower_file(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "a"), "A");
    write(l.l(0, "b"), "B");
    let _m = mount(b, &l);
    std::fs::rename(l.m("a"), l.m("b")).unwrap();
    assert_eq!(names(&l.merged), vec!["b"]);
    assert_eq!(read_string(l.m("b")), "A");
    assert!(is_whiteout(l.u("a")));
    assert_eq!(read_string(l.u("b")), "A");
    assert_eq!(read_string(l.l(0, "b")), "B");
}

fn rename_into_other_dir(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "d1/f"), "f");
    mkdir(l.l(0, "d2"));
    let _m = mount(b, &l);
    std::fs::rename(l.m("d1/f"), l.m("d2/g")).unwrap();
    assert!(names(l.m("d1")).is_empty());
    assert_eq!(names(l.m("d2")), vec!["g"]);
    assert!(is_whiteout(l.u("d1/f")));
    assert_eq!(read_string(l.u("d2/g")), "f");
    // d1 still exists in lower, now with only a whiteout: removable.
    std::fs::remove_dir(l.m("d1")).unwrap();
    assert!(is_whiteout(l.u("d1")));
}

fn noreplace(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "a"), "A");
    write(l.l(0, "lowb"), "B");
    let _m = mount(b, &l);
    write(l.m("upc"), "C");
    // Target only in lower.
    assert_eq!(
        errno(try_renameat2(l.m("a"), l.m("lowb"), RENAME_NOREPLACE)),
        Some(libc::EEXIST)
    );
    // Target in upper.
    assert_eq!(
        errno(try_renameat2(l.m("a"), l.m("upc"), RENAME_NOREPLACE)),
        Some(libc::EEXIST)
    );
    assert_eq!(read_string(l.m("lowb")), "B");
    assert_eq!(read_string(l.m("upc")), "C");
    // Target whited out: free.
    std::fs::remove_file(l.m("lowb")).unwrap();
    try_renameat2(l.m("a"), l.m("lowb"), RENAME_NOREPLACE).unwrap();
    assert_eq!(read_string(l.m("lowb")), "A");
    assert!(!exists(l.m("a")));
    try_renameat2(l.m("upc"), l.m("fresh"), RENAME_NOREPLACE).unwrap();
    assert_eq!(names(&l.merged), vec!["fresh", "lowb"]);
}

fn exchange_lower_and_upper(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "low"), "LOW");
    let _m = mount(b, &l);
    write(l.m("up"), "UP");
    try_renameat2(l.m("low"), l.m("up"), RENAME_EXCHANGE).unwrap();
    assert_eq!(read_string(l.m("low")), "UP");
    assert_eq!(read_string(l.m("up")), "LOW");
    assert_eq!(read_string(l.u("low")), "UP");
    assert_eq!(read_string(l.u("up")), "LOW");
    assert_eq!(read_string(l.l(0, "low")), "LOW");
    // Exchange with a missing target fails.
    assert_eq!(
        errno(try_renameat2(l.m("low"), l.m("missing"), RENAME_EXCHANGE)),
        Some(libc::ENOENT)
    );
}

fn exchange_upper_files(b: Backend) {
    let l = Layers::new(1);
    let _m = mount(b, &l);
    write(l.m("a"), "a");
    mkdir(l.m("d"));
    try_renameat2(l.m("a"), l.m("d"), RENAME_EXCHANGE).unwrap();
    assert_eq!(file_type_bits(&lstat(l.m("a"))), libc::S_IFDIR);
    assert_eq!(read_string(l.m("d")), "a");
    // Both flags at once is invalid.
    assert_eq!(
        errno(try_renameat2(
            l.m("a"),
            l.m("d"),
            RENAME_EXCHANGE | RENAME_NOREPLACE
        )),
        Some(libc::EINVAL)
    );
}

fn lower_dir_rename_is_exdev(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "d/f"), "f");
    let before = snapshot(l.lower(0));
    let _m = mount_opts(b, &l, "redirect_dir=off");
    assert_eq!(
        errno(std::fs::rename(l.m("d"), l.m("e"))),
        Some(libc::EXDEV)
    );
    assert_eq!(names(&l.merged), vec!["d"]);
    assert_eq!(read_string(l.m("d/f")), "f");
    assert_same_tree(&before, &snapshot(l.lower(0)), "lower");
}

fn merged_dir_rename_is_exdev(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "d/f"), "f");
    let _m = mount_opts(b, &l, "redirect_dir=off");
    write(l.m("d/g"), "g");
    assert!(exists(l.u("d")));
    assert_eq!(
        errno(std::fs::rename(l.m("d"), l.m("e"))),
        Some(libc::EXDEV)
    );
    assert_eq!(names(l.m("d")), vec!["f", "g"]);
}

fn upper_only_dir_rename_works(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "other"), "o");
    let _m = mount(b, &l);
    mkdir(l.m("d/sub"));
    write(l.m("d/sub/f"), "f");
    std::fs::rename(l.m("d"), l.m("e")).unwrap();
    assert_eq!(names(&l.merged), vec!["e", "other"]);
    assert_eq!(read_string(l.m("e/sub/f")), "f");
    assert!(!exists(l.u("d")));
    assert_eq!(read_string(l.u("e/sub/f")), "f");
}

fn rename_file_onto_itself(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "a"), "a");
    let _m = mount(b, &l);
    std::fs::rename(l.m("a"), l.m("a")).unwrap();
    assert_eq!(read_string(l.m("a")), "a");
}

fn rename_dir_over_nonempty_dir(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "full/x"), "x");
    let _m = mount(b, &l);
    mkdir(l.m("new"));
    let r = std::fs::rename(l.m("new"), l.m("full"));
    assert_eq!(errno(r), Some(libc::ENOTEMPTY));
    assert_eq!(names(l.m("full")), vec!["x"]);
    // Over a lower dir that only holds whiteouts: allowed.
    std::fs::remove_file(l.m("full/x")).unwrap();
    std::fs::rename(l.m("new"), l.m("full")).unwrap();
    assert!(names(l.m("full")).is_empty());
    assert!(!exists(l.m("new")));
    assert!(is_opaque(l.u("full")));
}
