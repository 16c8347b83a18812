//! POSIX ACLs through the mount: default ACLs are inherited instead of the
//! umask, and an ACL grants what the mode alone does not.
//! Each scenario runs on kernel overlayfs and on rovl.

mod common;

use common::*;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

both_backends!(
    default_acl_replaces_umask,
    access_acl_grants_read,
    default_acl_over_whiteout
);

/// A `system.posix_acl_*` value: version 2, then (tag, perm, id) entries.
fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for &(tag, perm, id) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;
const NOBODY: u32 = 65534;
const NO_ID: u32 = u32::MAX;

/// rwx for the owner and nobody, r-x for the group and others.
fn default_acl() -> Vec<u8> {
    acl(&[
        (USER_OBJ, 7, NO_ID),
        (USER, 7, NOBODY),
        (GROUP_OBJ, 5, NO_ID),
        (MASK, 7, NO_ID),
        (OTHER, 5, NO_ID),
    ])
}

/// Runs `f` with the usual umask 022 (process-wide: the ACL tests make
/// files only inside it).
fn with_umask_022(f: impl FnOnce()) {
    // SAFETY: umask only swaps the process's mask.
    let old = unsafe { libc::umask(0o022) };
    f();
    unsafe { libc::umask(old) };
}

/// A new file asked for with mode 0666.
fn create_0666(p: &std::path::Path) {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o666)
        .open(p)
        .unwrap();
}

fn default_acl_replaces_umask(b: Backend) {
    let l = Layers::new(1);
    std::fs::create_dir(l.l(0, "d")).unwrap();
    let _m = mount(b, &l);
    let mode = |p| std::fs::metadata(l.m(p)).unwrap().permissions().mode() & 0o777;
    // rovl keeps what it learns of the parent's default ACL: a change of
    // it must show in the next create.
    with_umask_022(|| create_0666(&l.m("d/before")));
    assert_eq!(mode("d/before"), 0o644);
    let default = default_acl();
    setxattr(l.m("d"), "system.posix_acl_default", &default);
    // Mode 0666 with the usual umask 022: the default ACL, not the umask,
    // decides the group/mask bits of the new file.
    with_umask_022(|| {
        create_0666(&l.m("d/new"));
        std::fs::create_dir(l.m("plain")).unwrap();
    });
    assert_eq!(
        mode("d/new"),
        0o664,
        "the mask bits come from the default ACL"
    );
    let access = getxattr(l.m("d/new"), "system.posix_acl_access").expect("inherited ACL");
    assert!(access.len() > 4);
    // Without a default ACL the umask applies.
    let plain = std::fs::metadata(l.m("plain"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(plain, 0o755);
    try_removexattr(l.m("d"), "system.posix_acl_default").unwrap();
    with_umask_022(|| create_0666(&l.m("d/after")));
    assert_eq!(mode("d/after"), 0o644, "the umask again");
    // Set again on the dir, now upper (no copy-up this time).
    setxattr(l.m("d"), "system.posix_acl_default", &default);
    with_umask_022(|| create_0666(&l.m("d/again")));
    assert_eq!(mode("d/again"), 0o664, "the default ACL again");
}

fn access_acl_grants_read(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "f"), "secret");
    std::fs::set_permissions(l.l(0, "f"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let _m = mount(b, &l);
    let granted = acl(&[
        (USER_OBJ, 6, NO_ID),
        (USER, 4, NOBODY),
        (GROUP_OBJ, 0, NO_ID),
        (MASK, 4, NO_ID),
        (OTHER, 0, NO_ID),
    ]);
    setxattr(l.m("f"), "system.posix_acl_access", &granted);
    assert!(
        getxattr(l.u("f"), "system.posix_acl_access").is_some(),
        "copied up"
    );
    let read_as_nobody = |p: &std::path::Path| {
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
            .arg(p)
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(
        read_as_nobody(&l.m("f")),
        "the ACL grants nobody read access"
    );
    try_removexattr(l.m("f"), "system.posix_acl_access").unwrap();
    assert!(
        !read_as_nobody(&l.m("f")),
        "without the ACL, mode 0600 denies it"
    );
}

/// A name made again after its lower object was removed is built in the
/// workdir and swapped with the whiteout: it still gets the parent's
/// default ACL, not mode 0666 with no ACL.
fn default_acl_over_whiteout(b: Backend) {
    let l = Layers::new(1);
    std::fs::create_dir(l.l(0, "d")).unwrap();
    write(l.l(0, "d/f"), "f");
    std::fs::create_dir(l.l(0, "d/sub")).unwrap();
    let default = default_acl();
    setxattr(l.l(0, "d"), "system.posix_acl_default", &default);
    let _m = mount(b, &l);
    std::fs::remove_file(l.m("d/f")).unwrap();
    std::fs::remove_dir(l.m("d/sub")).unwrap();
    with_umask_022(|| {
        create_0666(&l.m("d/f"));
        std::fs::create_dir(l.m("d/sub")).unwrap();
    });
    let mode = |p| std::fs::metadata(l.m(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("d/f"), 0o664, "file: the default ACL's mask, not 0666");
    assert_eq!(
        mode("d/sub"),
        0o775,
        "dir: the default ACL's mask, not 0777"
    );
    for p in ["d/f", "d/sub"] {
        assert!(
            getxattr(l.m(p), "system.posix_acl_access").is_some(),
            "{p}: inherited access ACL"
        );
    }
    assert_eq!(
        getxattr(l.m("d/sub"), "system.posix_acl_default"),
        Some(default),
        "the new dir passes the default ACL on"
    );
    assert!(work_leftovers(&l).is_empty());
}
