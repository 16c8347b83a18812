//! `rovl umount`: only rovl mounts, lazily with `-l`, through a symlink,
//! and a busy mount gets a hint.

mod common;

use common::*;

#[test]
fn refuses_other_fuse_mounts() {
    if !require_root_fuse() {
        return;
    }
    let Some(fo) = require_program("fuse-overlayfs") else {
        return;
    };
    let l = Layers::new(1);
    let m = RovlMount::start_program(&fo, &["-f", "-o", &l.opts()], &l.merged).expect("mount");
    let r = run_rovl(&["umount".as_ref(), l.merged.as_os_str()]);
    assert!(!r.status.success());
    assert!(r.stderr.contains("not a rovl mount"), "{}", r.stderr);
    assert!(
        is_mounted(&l.merged),
        "the fuse-overlayfs mount was unmounted"
    );
    drop(m);
}

#[test]
fn through_a_symlink_and_lazily_when_busy() {
    if !require_root_fuse() {
        return;
    }
    let l = Layers::new(1);
    write(l.l(0, "f"), "f");
    let m = RovlMount::start(&l.opts(), &l.merged).expect("mount");
    let link = l.root().join("link");
    std::os::unix::fs::symlink(&l.merged, &link).unwrap();
    let busy = std::fs::File::open(l.m("f")).unwrap();
    let r = run_rovl(&["umount".as_ref(), link.as_os_str()]);
    assert!(!r.status.success());
    assert!(
        r.stderr.contains("busy") && r.stderr.contains("-l"),
        "{}",
        r.stderr
    );
    let r = run_rovl(&["umount".as_ref(), "-l".as_ref(), link.as_os_str()]);
    assert!(r.status.success(), "{}", r.stderr);
    assert!(!is_mounted(&l.merged));
    drop(busy);
    let (st, _) = m.wait_exit();
    assert!(
        st.success(),
        "the daemon exits once the last file is closed"
    );
}
