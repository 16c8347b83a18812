//! Extended attributes through the mount.
//! Each scenario runs on kernel overlayfs and on rovl.

mod common;

use common::*;

both_backends!(
    user_xattrs_roundtrip,
    trusted_xattrs_roundtrip,
    lower_xattrs_visible_without_copy_up,
    private_xattrs_hidden,
    private_xattr_names_are_escaped,
    xattr_flags_and_errors,
    xattr_on_upper_dir,
    selinux_labels_pass_through,
    lower_files_without_xattrs_then_given_some,
    empty_lower_files_without_xattrs_then_given_some,
);

fn user_xattrs_roundtrip(b: Backend) {
    let l = Layers::new(1);
    let _m = mount(b, &l);
    write(l.m("f"), "f");
    setxattr(l.m("f"), "user.a", b"1");
    setxattr(l.m("f"), "user.b", b"");
    setxattr(l.m("f"), "user.big", &vec![b'x'; 3000]);
    assert_eq!(getxattr(l.m("f"), "user.a").as_deref(), Some(&b"1"[..]));
    assert_eq!(getxattr(l.m("f"), "user.b").as_deref(), Some(&b""[..]));
    assert_eq!(getxattr(l.m("f"), "user.big").unwrap().len(), 3000);
    assert_eq!(listxattr(l.m("f")), vec!["user.a", "user.b", "user.big"]);
    assert_eq!(getxattr(l.u("f"), "user.a").as_deref(), Some(&b"1"[..]));
    try_removexattr(l.m("f"), "user.a").unwrap();
    assert_eq!(getxattr(l.m("f"), "user.a"), None);
    assert_eq!(getxattr(l.u("f"), "user.a"), None);
    assert_eq!(listxattr(l.m("f")), vec!["user.b", "user.big"]);
}

fn trusted_xattrs_roundtrip(b: Backend) {
    let l = Layers::new(1);
    let _m = mount(b, &l);
    write(l.m("f"), "f");
    setxattr(l.m("f"), "trusted.t", b"tv");
    assert_eq!(getxattr(l.m("f"), "trusted.t").as_deref(), Some(&b"tv"[..]));
    assert!(listxattr(l.m("f")).contains(&"trusted.t".to_string()));
    assert_eq!(getxattr(l.u("f"), "trusted.t").as_deref(), Some(&b"tv"[..]));
    try_removexattr(l.m("f"), "trusted.t").unwrap();
    assert_eq!(getxattr(l.m("f"), "trusted.t"), None);
}

fn lower_xattrs_visible_without_copy_up(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "f"), "f");
    setxattr(l.l(0, "f"), "user.low", b"L");
    setxattr(l.l(0, "f"), "trusted.low", b"T");
    let _m = mount(b, &l);
    assert_eq!(getxattr(l.m("f"), "user.low").as_deref(), Some(&b"L"[..]));
    assert_eq!(listxattr(l.m("f")), vec!["trusted.low", "user.low"]);
    assert!(!exists(l.u("f")));
    // Size query (empty buffer) reports the value length.
    let c = cstr(&l.m("f"));
    let n = std::ffi::CString::new("user.low").unwrap();
    // SAFETY: a null buffer with size 0 is the documented size query.
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) };
    assert_eq!(r, 1);
    // SAFETY: same for listxattr.
    let r = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
    assert_eq!(r as usize, "trusted.low\0user.low\0".len());
}

fn private_xattrs_hidden(b: Backend) {
    // The overlay's own xattrs on layer files never show through the mount.
    let l = Layers::new(1);
    write(l.l(0, "d/f"), "f");
    write(l.l(0, "o/x"), "x");
    let _m = mount(b, &l);
    // Copy-up makes the kernel write trusted.overlay.origin / impure.
    setxattr(l.m("d/f"), "user.x", b"1");
    // An opaque dir.
    std::fs::remove_file(l.m("o/x")).unwrap();
    std::fs::remove_dir(l.m("o")).unwrap();
    mkdir(l.m("o"));
    assert!(is_opaque(l.u("o")));
    for p in ["d/f", "d", "o", ""] {
        let names = listxattr(l.m(p));
        assert!(
            !names.iter().any(|n| n.starts_with("trusted.overlay.")),
            "{p}: {names:?}"
        );
    }
    assert_eq!(listxattr(l.m("d/f")), vec!["user.x"]);
    assert_eq!(
        errno(try_getxattr(l.m("o"), "trusted.overlay.opaque")),
        Some(libc::ENODATA)
    );
    assert_eq!(
        errno(try_getxattr(l.m("d/f"), "trusted.overlay.origin")),
        Some(libc::ENODATA)
    );
}

fn private_xattr_names_are_escaped(b: Backend) {
    // Kernel >= 6.7: `trusted.overlay.X` set through the mount is stored as
    // `trusted.overlay.overlay.X` in the layer and shown back unescaped, so
    // a user can never forge or read the overlay's own xattrs.
    let l = Layers::new(1);
    write(l.l(0, "f"), "f");
    setxattr(l.l(0, "f"), "trusted.overlay.overlay.low", b"esc");
    mkdir(l.l(0, "d"));
    let _m = mount(b, &l);
    assert_eq!(listxattr(l.m("f")), vec!["trusted.overlay.low"]);
    assert_eq!(
        getxattr(l.m("f"), "trusted.overlay.low").as_deref(),
        Some(&b"esc"[..])
    );
    setxattr(l.m("d"), "trusted.overlay.opaque", b"y");
    // Not an opaque marker in the layer: stored escaped.
    assert!(!is_opaque(l.u("d")));
    assert_eq!(
        getxattr(l.u("d"), "trusted.overlay.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(
        getxattr(l.m("d"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(listxattr(l.m("d")), vec!["trusted.overlay.opaque"]);
    try_removexattr(l.m("d"), "trusted.overlay.opaque").unwrap();
    assert_eq!(getxattr(l.u("d"), "trusted.overlay.overlay.opaque"), None);
    assert!(listxattr(l.m("d")).is_empty());
}

fn xattr_flags_and_errors(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "f"), "f");
    let _m = mount(b, &l);
    assert_eq!(
        errno(try_getxattr(l.m("f"), "user.none")),
        Some(libc::ENODATA)
    );
    assert_eq!(
        errno(try_removexattr(l.m("f"), "user.none")),
        Some(libc::ENODATA)
    );
    assert_eq!(
        errno(try_setxattr(l.m("f"), "user.n", b"v", libc::XATTR_REPLACE)),
        Some(libc::ENODATA)
    );
    try_setxattr(l.m("f"), "user.n", b"v", libc::XATTR_CREATE).unwrap();
    assert_eq!(
        errno(try_setxattr(l.m("f"), "user.n", b"w", libc::XATTR_CREATE)),
        Some(libc::EEXIST)
    );
    try_setxattr(l.m("f"), "user.n", b"w", libc::XATTR_REPLACE).unwrap();
    assert_eq!(getxattr(l.m("f"), "user.n").as_deref(), Some(&b"w"[..]));
    // Buffer too small.
    let c = cstr(&l.m("f"));
    let n = std::ffi::CString::new("user.n").unwrap();
    let mut buf = [0u8; 0];
    // SAFETY: a zero-length buffer that is non-null.
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), 0) };
    assert_eq!(r, 1);
    setxattr(l.m("f"), "user.n", b"longer value");
    let mut small = [0u8; 4];
    // SAFETY: buffer valid for 4 bytes.
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), small.as_mut_ptr().cast(), 4) };
    assert_eq!(r, -1);
    assert_eq!(io_errno(), libc::ERANGE);
    // Unknown namespace.
    assert_eq!(
        errno(try_setxattr(l.m("f"), "bogus.n", b"v", 0)),
        Some(libc::EOPNOTSUPP)
    );
}

fn io_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap()
}

fn xattr_on_upper_dir(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "d/f"), "f");
    let _m = mount(b, &l);
    setxattr(l.m("d"), "user.dir", b"1");
    assert_eq!(getxattr(l.u("d"), "user.dir").as_deref(), Some(&b"1"[..]));
    assert_eq!(names(l.m("d")), vec!["f"]);
    assert_eq!(listxattr(l.m("d")), vec!["user.dir"]);
}

fn selinux_labels_pass_through(b: Backend) {
    // No SELinux here: the label is an ordinary xattr stored by the layers.
    let l = Layers::new(1);
    write(l.l(0, "lab"), "x");
    setxattr(
        l.l(0, "lab"),
        "security.selinux",
        b"system_u:object_r:x_t:s0\0",
    );
    write(l.l(0, "plain"), "y");
    let _m = mount(b, &l);
    assert_eq!(
        getxattr(l.m("lab"), "security.selinux").as_deref(),
        Some(&b"system_u:object_r:x_t:s0\0"[..])
    );
    // A missing label: the kernel says ENODATA; rovl says ENOTSUP by default
    // (`selinux_missing=enotsup`) so that `ls -l` stops asking per file.
    let want = match b {
        Backend::Kernel => libc::ENODATA,
        Backend::Rovl => libc::EOPNOTSUPP,
    };
    assert_eq!(
        errno(try_getxattr(l.m("plain"), "security.selinux")),
        Some(want)
    );
    // Other missing security xattrs keep ENODATA on both.
    assert_eq!(
        errno(try_getxattr(l.m("plain"), "security.capability")),
        Some(libc::ENODATA)
    );
    // Setting a label through the mount still works (copy-up).
    setxattr(l.m("plain"), "security.selinux", b"u:r:t:s0\0");
    assert_eq!(
        getxattr(l.u("plain"), "security.selinux").as_deref(),
        Some(&b"u:r:t:s0\0"[..])
    );
}

#[test]
fn selinux_missing_enodata_matches_kernel() {
    if !require_root_fuse() {
        return;
    }
    let l = Layers::new(1);
    write(l.l(0, "plain"), "y");
    let _m = mount_opts(Backend::Rovl, &l, "selinux_missing=enodata");
    assert_eq!(
        errno(try_getxattr(l.m("plain"), "security.selinux")),
        Some(libc::ENODATA)
    );
    assert_eq!(
        errno(try_getxattr(l.m(""), "security.selinux")),
        Some(libc::ENODATA)
    );
}

/// Lower files with no xattrs, asked (by name or for the list) before and
/// after xattrs are set on them through the mount, and one with xattrs.
/// rovl answers the later misses of a lower file that lists none from
/// what it learned; a copy-up or a set forgets it.
fn lower_files_without_xattrs_then_given_some(b: Backend) {
    without_xattrs_then_given_some(b, |f| f);
}

/// rovl reads an empty lower file's xattr list at lookup (for the xattr
/// whiteout check) and answers its GETXATTRs from what it read.
fn empty_lower_files_without_xattrs_then_given_some(b: Backend) {
    without_xattrs_then_given_some(b, |_| "");
}

fn without_xattrs_then_given_some(b: Backend, content: fn(&str) -> &str) {
    let l = Layers::new(1);
    for f in ["byname", "bylist"] {
        write(l.l(0, f), content(f));
    }
    write(l.l(0, "has"), content("has"));
    setxattr(l.l(0, "has"), "user.y", b"2");
    let _m = mount(b, &l);
    assert_eq!(getxattr(l.m("byname"), "user.x"), None, "{b:?}");
    assert_eq!(
        getxattr(l.m("byname"), "security.capability"),
        None,
        "{b:?}"
    );
    assert!(listxattr(l.m("bylist")).is_empty(), "{b:?}");
    assert_eq!(getxattr(l.m("bylist"), "user.x"), None, "{b:?}");
    assert_eq!(getxattr(l.m("has"), "user.y").as_deref(), Some(&b"2"[..]));
    assert_eq!(getxattr(l.m("has"), "user.z"), None, "{b:?}");
    for f in ["byname", "bylist"] {
        setxattr(l.m(f), "user.x", b"1");
        assert_eq!(
            getxattr(l.m(f), "user.x").as_deref(),
            Some(&b"1"[..]),
            "{b:?} {f}"
        );
        assert_eq!(listxattr(l.m(f)), vec!["user.x"], "{b:?} {f}");
        assert_eq!(
            getxattr(l.u(f), "user.x").as_deref(),
            Some(&b"1"[..]),
            "{b:?} {f}"
        );
    }
}
