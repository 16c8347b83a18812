//! Set-user-ID, set-group-ID and file capabilities dropped by writes,
//! truncates and chowns as the kernel's overlay drops them. rovl declares
//! `FUSE_HANDLE_KILLPRIV_V2`, which leaves the bits to the daemon; each
//! scenario runs on kernel overlayfs and on rovl.

mod common;

use common::*;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;

both_backends!(
    dropped_without_fsetid,
    kept_with_fsetid,
    capabilities_go_and_suid_stays,
    capabilities_of_a_new_file
);

const CAP_FSETID: u32 = 4;

/// Every way to modify a file that drops privileges, by the data path
/// each takes through FUSE: passthrough or daemon writes, setattr of the
/// size by path and by fd, an `O_TRUNC` open, fallocate, copy_file_range
/// (both send the kernel's "remove privileges" setattr), and chown, also
/// to the same owner.
const OPS: &[&str] = &[
    "append",
    "pwrite",
    "truncate",
    "ftruncate",
    "otrunc",
    "fallocate",
    "copy_range",
    "chown",
    "chown_none",
];

/// Set-user-ID with group execute, and set-group-ID without it (which no
/// write drops).
const MODES: &[u32] = &[0o6755, 0o2745];

fn name(place: &str, op: &str, mode: u32) -> String {
    format!("{place}-{op}-{mode:o}")
}

/// Lower files (each copied up by its operation), one per operation and
/// mode; the names of those and of the upper ones `make_upper_files` makes.
fn make_lower_files(l: &Layers) -> Vec<(String, &'static str, u32)> {
    for op in OPS {
        for &mode in MODES {
            let p = l.l(0, &name("lo", op, mode));
            write(&p, "abc");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        }
    }
    let mut names = Vec::new();
    for place in ["lo", "up"] {
        for &op in OPS {
            for &mode in MODES {
                names.push((name(place, op, mode), op, mode));
            }
        }
    }
    names
}

/// Upper files made through the mount, and a source for copy_range.
fn make_upper_files(l: &Layers) {
    for op in OPS {
        for &mode in MODES {
            let p = l.m(&name("up", op, mode));
            write(&p, "abc");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        }
    }
    write(l.m("src"), "hello");
}

fn apply(op: &str, p: &Path, src: &Path) {
    let open_w = || OpenOptions::new().write(true).open(p).unwrap();
    match op {
        "append" => OpenOptions::new()
            .append(true)
            .open(p)
            .unwrap()
            .write_all(b"x")
            .unwrap(),
        "pwrite" => drop(open_w().write_at(b"y", 0).unwrap()),
        "truncate" => sys::truncate(p, 1).unwrap(),
        "ftruncate" => open_w().set_len(2).unwrap(),
        "otrunc" => drop(
            OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(p)
                .unwrap(),
        ),
        "fallocate" => {
            let f = open_w();
            // SAFETY: a valid fd.
            let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 8192) };
            assert_eq!(r, 0, "fallocate: {}", std::io::Error::last_os_error());
        }
        "copy_range" => {
            let (s, d) = (File::open(src).unwrap(), open_w());
            // SAFETY: valid fds; null offsets use the files' positions.
            let n = unsafe {
                libc::copy_file_range(
                    s.as_raw_fd(),
                    std::ptr::null_mut(),
                    d.as_raw_fd(),
                    std::ptr::null_mut(),
                    3,
                    0,
                )
            };
            assert_eq!(n, 3, "copy_file_range: {}", std::io::Error::last_os_error());
        }
        "chown" => std::os::unix::fs::chown(p, Some(0), Some(0)).unwrap(),
        // chown(-1, -1): the kernel's setattr carries no change at all.
        "chown_none" => std::os::unix::fs::chown(p, None, None).unwrap(),
        _ => unreachable!("{op}"),
    }
}

/// Runs every operation, in a thread without `CAP_FSETID` unless `fsetid`,
/// and gives each file's mode after it.
fn run(b: Backend, fsetid: bool) -> Vec<(String, u32, u32)> {
    let l = Layers::new(1);
    let names = make_lower_files(&l);
    let _m = mount(b, &l);
    make_upper_files(&l);
    let (merged, src) = (l.merged.clone(), l.m("src"));
    std::thread::spawn(move || {
        // Capabilities are per thread: only this one's calls lack it.
        if !fsetid {
            sys::drop_effective_cap(CAP_FSETID).unwrap();
        }
        names
            .iter()
            .map(|(n, op, mode)| {
                let p = merged.join(n);
                apply(op, &p, &src);
                (n.clone(), *mode, lstat(&p).st_mode & 0o7777)
            })
            .collect()
    })
    .join()
    .unwrap()
}

fn dropped_without_fsetid(b: Backend) {
    for (name, before, after) in run(b, false) {
        let want = if before & libc::S_IXGRP != 0 {
            before & !(libc::S_ISUID | libc::S_ISGID)
        } else {
            before
        };
        assert_eq!(after, want, "{b:?} {name}: {after:o}, want {want:o}");
    }
}

fn kept_with_fsetid(b: Backend) {
    for (name, before, after) in run(b, true) {
        // chown drops them whoever calls.
        let want = if name.contains("chown") && before & libc::S_IXGRP != 0 {
            before & !(libc::S_ISUID | libc::S_ISGID)
        } else {
            before
        };
        assert_eq!(after, want, "{b:?} {name}: {after:o}, want {want:o}");
    }
}

/// A v2 `security.capability` granting CAP_NET_RAW, effective.
const CAPS: [u8; 20] = [
    0x01, 0, 0, 0x02, 0x00, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

/// A write drops file capabilities; set-user-ID stays when the writer has
/// `CAP_FSETID` (the kernel asks for the removal with the same empty
/// setattr as for set-user-ID), and goes when it has not.
fn capabilities_go_and_suid_stays(b: Backend) {
    let l = Layers::new(1);
    for f in ["root", "nofsetid"] {
        let p = l.l(0, f);
        write(&p, "abc");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o4755)).unwrap();
        sys::lsetxattr(&p, "security.capability", &CAPS, 0).unwrap();
    }
    let _m = mount(b, &l);
    let append = |p: &Path| {
        OpenOptions::new()
            .append(true)
            .open(p)
            .unwrap()
            .write_all(b"x")
            .unwrap()
    };
    append(&l.m("root"));
    let p = l.m("nofsetid");
    std::thread::spawn(move || {
        sys::drop_effective_cap(CAP_FSETID).unwrap();
        append(&p);
    })
    .join()
    .unwrap();
    for (f, want) in [("root", 0o4755), ("nofsetid", 0o755)] {
        assert_eq!(lstat(l.m(f)).st_mode & 0o7777, want, "{b:?} {f}");
        assert_eq!(
            sys::lgetxattr(&l.m(f), "security.capability"),
            Err(libc::ENODATA),
            "{b:?} {f}: capabilities kept"
        );
    }
}

/// Capabilities set on files made through the mount read back, and go with
/// a chown and a write as on any file (rovl knows such a file has none
/// until an xattr is set on it, and answers the kernel's asking without
/// the upper layer).
fn capabilities_of_a_new_file(b: Backend) {
    let l = Layers::new(1);
    let _m = mount(b, &l);
    for f in ["chowned", "written"] {
        let p = l.m(f);
        write(&p, "abc");
        assert_eq!(
            sys::lgetxattr(&p, "security.capability"),
            Err(libc::ENODATA),
            "{b:?} {f}: a new file"
        );
        sys::lsetxattr(&p, "security.capability", &CAPS, 0).unwrap();
        assert_eq!(
            sys::lgetxattr(&p, "security.capability"),
            Ok(CAPS.to_vec()),
            "{b:?} {f}: capabilities set"
        );
    }
    std::os::unix::fs::lchown(l.m("chowned"), Some(0), Some(0)).unwrap();
    OpenOptions::new()
        .append(true)
        .open(l.m("written"))
        .unwrap()
        .write_all(b"x")
        .unwrap();
    for f in ["chowned", "written"] {
        assert_eq!(
            sys::lgetxattr(&l.m(f), "security.capability"),
            Err(libc::ENODATA),
            "{b:?} {f}: capabilities kept"
        );
    }
}
