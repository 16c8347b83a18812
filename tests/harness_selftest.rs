//! Checks of the harness itself against the kernel (no rovl needed).

mod common;

use common::*;
use std::path::Path;

#[test]
fn kernel_mount_guard_unmounts() {
    if !require_kernel_overlay() {
        return;
    }
    let l = Layers::new(2);
    write(l.l(0, "a"), "a");
    write(l.l(1, "b"), "b");
    {
        let m = KernelMount::start(&l.opts(), &l.merged).expect("kernel mount");
        assert!(is_mounted(&m.mountpoint));
        assert_eq!(mount_at(&l.merged).unwrap().fstype, "overlay");
        assert_eq!(names(&l.merged), vec!["a", "b"]);
    }
    assert!(!is_mounted(&l.merged));
}

/// The FUSE guard, exercised with fuse-overlayfs (if installed) so it is
/// known to work independently of rovl.
#[test]
fn fuse_guard_with_fuse_overlayfs() {
    if !require_root_fuse() {
        return;
    }
    let prog = Path::new("/usr/bin/fuse-overlayfs");
    if !prog.exists() {
        eprintln!("SKIPPED: /usr/bin/fuse-overlayfs not installed");
        return;
    }
    let l = Layers::new(1);
    write(l.l(0, "a"), "a");
    let m = RovlMount::start_program(prog, &["-f", "-o", &l.opts()], &l.merged).expect("mount");
    assert!(mount_at(&l.merged).unwrap().fstype.starts_with("fuse"));
    assert_eq!(names(&l.merged), vec!["a"]);
    let st = m.unmount();
    assert!(st.success(), "{st}");
    assert!(!is_mounted(&l.merged));

    // Drop path: the guard unmounts without an explicit call.
    {
        let _m =
            RovlMount::start_program(prog, &["-f", "-o", &l.opts()], &l.merged).expect("mount");
        assert!(is_mounted(&l.merged));
    }
    assert!(!is_mounted(&l.merged));
}

#[test]
fn rovl_start_reports_early_exit() {
    if !require_root_fuse() {
        return;
    }
    let l = Layers::new(1);
    let bad = format!("lowerdir={}", l.root().join("missing").display());
    let r = RovlMount::start(&bad, &l.merged);
    assert!(r.is_err());
    assert!(!is_mounted(&l.merged));
}
