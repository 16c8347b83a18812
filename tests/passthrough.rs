//! Data paths: a read-only file open across a copy-up, with
//! `passthrough=upper` (kernel behaviour: it follows the copy-up) and with
//! the default `passthrough=all` (lower files pass through; it keeps the
//! lower data, as the kernel's did before 4.19).
//! The scenarios run on kernel overlayfs too; where rovl's `all` mode
//! differs by design, the test says so.

mod common;

use common::*;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;

both_backends!(
    reader_follows_copy_up,
    truncate_while_reader_open,
    reopen_after_a_change_reads_it,
);

/// Which data path rovl uses in a scenario.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Upper,
    /// The default, `passthrough=all`.
    All,
}

fn mount_mode(b: Backend, l: &Layers, m: Mode) -> AnyMount {
    match (b, m) {
        (Backend::Rovl, Mode::Upper) => mount_opts(b, l, "passthrough=upper"),
        _ => mount(b, l),
    }
}

fn read_all(f: &mut File) -> String {
    let mut s = String::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_string(&mut s).unwrap();
    s
}

/// A reader opened before a write through another open file.
fn writer_and_reader(b: Backend, m: Mode) {
    let l = Layers::new(1);
    write(l.l(0, "f"), "lower\n");
    let _mnt = mount_mode(b, &l, m);
    let mut reader = File::open(l.m("f")).unwrap();
    assert_eq!(read_all(&mut reader), "lower\n");
    let ino = reader.metadata().unwrap().ino();
    {
        let mut w = OpenOptions::new().append(true).open(l.m("f")).unwrap();
        w.write_all(b"more\n").unwrap();
    }
    // The write went to a copy in the upper layer, never to the lower file.
    assert_eq!(read_string(l.m("f")), "lower\nmore\n");
    assert_eq!(read_string(l.u("f")), "lower\nmore\n");
    assert_eq!(read_string(l.l(0, "f")), "lower\n");
    assert_eq!(lstat(l.m("f")).st_ino, ino);
    // The kernel's reader follows the copy-up; with passthrough=all rovl's
    // keeps reading the lower file it passes through (documented).
    let want = if b == Backend::Rovl && m == Mode::All {
        "lower\n"
    } else {
        "lower\nmore\n"
    };
    assert_eq!(read_all(&mut reader), want);
    drop(reader);
    // Once the reader is gone, new opens see one file again.
    let mut again = File::open(l.m("f")).unwrap();
    assert_eq!(read_all(&mut again), "lower\nmore\n");
    let mut w = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(l.m("f"))
        .unwrap();
    w.write_all(b"new\n").unwrap();
    drop(w);
    assert_eq!(read_all(&mut again), "new\n");
    assert_eq!(read_string(l.u("f")), "new\n");
    assert_eq!(read_string(l.l(0, "f")), "lower\n");
}

fn reader_follows_copy_up(b: Backend) {
    writer_and_reader(b, Mode::Upper);
}

fn truncate_while_reader_open(b: Backend) {
    for m in [Mode::Upper, Mode::All] {
        let l = Layers::new(1);
        write(l.l(0, "t"), "0123456789");
        write(l.l(0, "o"), "abcdef");
        let _mnt = mount_mode(b, &l, m);
        let r1 = File::open(l.m("t")).unwrap();
        let r2 = File::open(l.m("o")).unwrap();
        // truncate(2) by path, and an O_TRUNC open for write.
        std::fs::OpenOptions::new()
            .write(true)
            .open(l.m("t"))
            .unwrap()
            .set_len(4)
            .unwrap();
        let c = cstr(&l.m("o"));
        // SAFETY: a valid C path.
        assert_eq!(unsafe { libc::truncate(c.as_ptr(), 2) }, 0);
        assert_eq!(read_string(l.m("t")), "0123");
        assert_eq!(read_string(l.m("o")), "ab");
        assert_eq!(read_string(l.u("o")), "ab");
        assert_eq!(read_string(l.l(0, "t")), "0123456789");
        assert_eq!(read_string(l.l(0, "o")), "abcdef");
        assert_eq!(r1.metadata().unwrap().ino(), lstat(l.m("t")).st_ino);
        assert_eq!(r2.metadata().unwrap().ino(), lstat(l.m("o")).st_ino);
    }
}

/// Lower files read and closed, then changed with no file open: a new
/// open reads the change (rovl keeps a closed lower file's backing for the
/// next open; a change must not be read through it).
fn reopen_after_a_change_reads_it(b: Backend) {
    let l = Layers::new(1);
    for n in ["w", "c", "t"] {
        write(l.l(0, n), "0123456789");
    }
    let _mnt = mount(b, &l);
    for n in ["w", "c", "t"] {
        assert_eq!(read_string(l.m(n)), "0123456789");
    }
    let ino = lstat(l.m("w")).st_ino;
    std::fs::write(l.m("w"), "new").unwrap();
    assert_eq!(read_string(l.m("w")), "new");
    assert_eq!(lstat(l.m("w")).st_ino, ino);
    // Copied up by chmod, read again, then written.
    let c = cstr(&l.m("c"));
    // SAFETY: a valid C path.
    assert_eq!(unsafe { libc::chmod(c.as_ptr(), 0o600) }, 0);
    assert_eq!(read_string(l.m("c")), "0123456789");
    let mut w = OpenOptions::new().append(true).open(l.m("c")).unwrap();
    w.write_all(b"+").unwrap();
    drop(w);
    assert_eq!(read_string(l.m("c")), "0123456789+");
    // truncate(2) by path: no open file at all.
    let t = cstr(&l.m("t"));
    // SAFETY: a valid C path.
    assert_eq!(unsafe { libc::truncate(t.as_ptr(), 2) }, 0);
    assert_eq!(read_string(l.m("t")), "01");
    for n in ["w", "c", "t"] {
        assert_eq!(read_string(l.l(0, n)), "0123456789");
    }
}

#[test]
fn passthrough_all_writes_never_reach_the_lower_file() {
    if !require_root_fuse() {
        return;
    }
    writer_and_reader(Backend::Rovl, Mode::All);
}

#[test]
fn passthrough_all_shared_reads_and_metadata_copy_up() {
    if !require_root_fuse() {
        return;
    }
    let l = Layers::new(2);
    write(l.l(1, "d/f"), "data");
    let _mnt = mount_opts(Backend::Rovl, &l, "passthrough=all");
    let mut a = File::open(l.m("d/f")).unwrap();
    let mut b = File::open(l.m("d/f")).unwrap();
    assert_eq!(read_all(&mut a), "data");
    // chmod copies up the metadata; read-only opens still share one backing.
    let c = cstr(&l.m("d/f"));
    // SAFETY: a valid C path.
    assert_eq!(unsafe { libc::chmod(c.as_ptr(), 0o600) }, 0);
    assert!(exists(l.u("d/f")));
    let mut c2 = File::open(l.m("d/f")).unwrap();
    assert_eq!(read_all(&mut b), "data");
    assert_eq!(read_all(&mut c2), "data");
    assert_eq!(lstat(l.m("d/f")).st_mode & 0o7777, 0o600);
    // mmap of a passed-through lower file.
    let len = 4;
    // SAFETY: mapping 4 readable bytes of an open file; unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&a),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: p maps len readable bytes.
    let got = unsafe { std::slice::from_raw_parts(p as *const u8, len) }.to_vec();
    // SAFETY: p and len come from the mmap above.
    unsafe { libc::munmap(p, len) };
    assert_eq!(got, b"data");
    // A write while the readers are open: the name gets a new inode.
    std::fs::write(l.m("d/f"), "changed").unwrap();
    assert_eq!(read_string(l.m("d/f")), "changed");
    assert_eq!(read_string(l.l(1, "d/f")), "data");
    assert_eq!(lstat(l.m("d/f")).st_mode & 0o7777, 0o600);
}

#[test]
fn passthrough_all_with_metacopy() {
    if !require_root_fuse() {
        return;
    }
    let l = Layers::new(1);
    write(l.l(0, "m"), "lowerdata");
    let _mnt = mount_opts(Backend::Rovl, &l, "metacopy=on,passthrough=all");
    // A metadata-only copy, read through its lower data file.
    let c = cstr(&l.m("m"));
    // SAFETY: a valid C path.
    assert_eq!(unsafe { libc::chmod(c.as_ptr(), 0o640) }, 0);
    assert!(getxattr(l.u("m"), "trusted.overlay.metacopy").is_some());
    assert_eq!(lstat(l.u("m")).st_size, 9);
    let mut r = File::open(l.m("m")).unwrap();
    assert_eq!(read_all(&mut r), "lowerdata");
    // A write copies the data in and goes to a new inode.
    let mut w = OpenOptions::new().append(true).open(l.m("m")).unwrap();
    w.write_all(b"+").unwrap();
    drop(w);
    assert_eq!(read_string(l.m("m")), "lowerdata+");
    assert_eq!(read_string(l.u("m")), "lowerdata+");
    assert_eq!(getxattr(l.u("m"), "trusted.overlay.metacopy"), None);
    assert_eq!(read_string(l.l(0, "m")), "lowerdata");
    assert_eq!(lstat(l.m("m")).st_mode & 0o777, 0o640);
    assert_eq!(read_all(&mut r), "lowerdata");
}
