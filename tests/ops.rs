//! Miscellaneous file operations through the mount.
//! Each scenario runs on kernel overlayfs and on rovl.

mod common;

use common::*;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};

both_backends!(
    create_write_read,
    open_flags,
    open_then_unlink_lower,
    open_then_unlink_upper,
    name_too_long,
    statfs_reports_upper_fs,
    fallocate_extends,
    seek_data_and_hole,
    sparse_copy_up_keeps_holes,
    copy_file_range_in_mount,
    inode_numbers_stable_across_copy_up,
    mkdir_mode_and_nested,
    fsync_and_fdatasync,
    o_tmpfile,
);

fn create_write_read(b: Backend) {
    let l = Layers::new(1);
    let _m = mount(b, &l);
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o640)
        .open(l.m("f"))
        .unwrap();
    f.write_all(b"hello").unwrap();
    drop(f);
    assert_eq!(read_string(l.m("f")), "hello");
    assert_eq!(lstat(l.u("f")).st_mode & 0o7777, 0o640 & !umask());
    assert_eq!(lstat(l.m("f")).st_size, 5);
}

fn umask() -> u32 {
    // SAFETY: umask has no preconditions; set it back right away.
    unsafe {
        let m = libc::umask(0o022);
        libc::umask(m);
        m
    }
}

fn open_flags(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "f"), "0123456789");
    write(l.l(0, "g"), "abc");
    let _m = mount(b, &l);
    // O_EXCL on an existing lower file.
    let r = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(l.m("f"));
    assert_eq!(errno(r), Some(libc::EEXIST));
    // O_TRUNC on a lower file.
    let f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(l.m("f"))
        .unwrap();
    drop(f);
    assert_eq!(lstat(l.m("f")).st_size, 0);
    assert_eq!(read_string(l.l(0, "f")), "0123456789");
    // O_APPEND on a lower file.
    let mut g = OpenOptions::new().append(true).open(l.m("g")).unwrap();
    g.write_all(b"def").unwrap();
    drop(g);
    assert_eq!(read_string(l.m("g")), "abcdef");
    // O_DIRECTORY on a file, open of a missing file.
    let r = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(l.m("g"));
    assert_eq!(errno(r), Some(libc::ENOTDIR));
    assert_eq!(errno(File::open(l.m("missing"))), Some(libc::ENOENT));
    // Writing to a directory.
    let r = OpenOptions::new().write(true).open(&l.merged);
    assert_eq!(errno(r), Some(libc::EISDIR));
}

fn open_then_unlink_lower(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "f"), "lower data");
    let _m = mount(b, &l);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(l.m("f"))
        .unwrap();
    std::fs::remove_file(l.m("f")).unwrap();
    assert!(!exists(l.m("f")));
    assert!(is_whiteout(l.u("f")));
    f.write_all_at(b"LOWER", 0).unwrap();
    let mut s = String::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "LOWER data");
    // SAFETY: fstat on an open fd into a zeroed buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::fstat(f.as_raw_fd(), &mut st) }, 0);
    assert_eq!(st.st_nlink, 0);
    assert_eq!(st.st_size, 10);
    drop(f);
    assert_eq!(read_string(l.l(0, "f")), "lower data");
}

fn open_then_unlink_upper(b: Backend) {
    let l = Layers::new(1);
    let _m = mount(b, &l);
    write(l.m("f"), "upper");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(l.m("f"))
        .unwrap();
    std::fs::remove_file(l.m("f")).unwrap();
    assert!(!exists(l.u("f")));
    f.seek(SeekFrom::End(0)).unwrap();
    f.write_all(b" more").unwrap();
    let mut s = String::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "upper more");
    // A new file with the same name is a different file.
    write(l.m("f"), "new");
    f.seek(SeekFrom::Start(0)).unwrap();
    s.clear();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "upper more");
    assert_eq!(read_string(l.m("f")), "new");
}

fn name_too_long(b: Backend) {
    let l = Layers::new(1);
    let _m = mount(b, &l);
    let long = "n".repeat(256);
    let max = "m".repeat(255);
    let r = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(l.m(&long));
    assert_eq!(errno(r), Some(libc::ENAMETOOLONG));
    assert_eq!(errno(try_lstat(l.m(&long))), Some(libc::ENAMETOOLONG));
    assert_eq!(
        errno(std::fs::create_dir(l.m(&long))),
        Some(libc::ENAMETOOLONG)
    );
    // NAME_MAX itself is fine.
    write(l.m(&max), "ok");
    assert_eq!(read_string(l.m(&max)), "ok");
    assert!(exists(l.u(&max)));
}

fn statvfs(p: &std::path::Path) -> libc::statvfs {
    let c = cstr(p);
    // SAFETY: valid path and zeroed out-buffer.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe { libc::statvfs(c.as_ptr(), &mut s) },
        0,
        "statvfs {p:?}"
    );
    s
}

fn statfs_reports_upper_fs(b: Backend) {
    let l = Layers::new(1);
    let _m = mount(b, &l);
    let m = statvfs(&l.merged);
    let u = statvfs(&l.upper);
    assert!(m.f_blocks > 0);
    assert_eq!(m.f_blocks * m.f_frsize, u.f_blocks * u.f_frsize);
    assert_eq!(m.f_namemax, 255);
    assert_eq!(m.f_files, u.f_files);
}

fn fallocate_extends(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "low"), "abc");
    let _m = mount(b, &l);
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(l.m("f"))
        .unwrap();
    // SAFETY: valid fd.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 1 << 20) };
    assert_eq!(r, 0, "fallocate: {}", std::io::Error::last_os_error());
    assert_eq!(lstat(l.m("f")).st_size, 1 << 20);
    assert_eq!(lstat(l.u("f")).st_size, 1 << 20);
    // KEEP_SIZE on a lower file: copied up, size unchanged.
    let g = OpenOptions::new().write(true).open(l.m("low")).unwrap();
    // SAFETY: valid fd.
    let r = unsafe { libc::fallocate(g.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, 65536) };
    assert_eq!(r, 0, "fallocate: {}", std::io::Error::last_os_error());
    assert_eq!(lstat(l.m("low")).st_size, 3);
    assert_eq!(read_string(l.u("low")), "abc");
}

fn lseek(f: &File, off: i64, whence: i32) -> Result<i64, i32> {
    // SAFETY: valid fd.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap())
    } else {
        Ok(r)
    }
}

const MB: i64 = 1 << 20;

/// A file with data at [0, 4096) and [4 MiB, 4 MiB + 4096), 8 MiB long.
fn make_sparse(p: &std::path::Path) {
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(p)
        .unwrap();
    f.write_all_at(&[1u8; 4096], 0).unwrap();
    f.write_all_at(&[2u8; 4096], 4 * MB as u64).unwrap();
    f.set_len(8 * MB as u64).unwrap();
}

fn seek_data_and_hole(b: Backend) {
    let l = Layers::new(1);
    make_sparse(&l.l(0, "sp"));
    let _m = mount(b, &l);
    // Lower file, read-only (no copy-up).
    let f = File::open(l.m("sp")).unwrap();
    assert_eq!(lseek(&f, 0, libc::SEEK_DATA), Ok(0));
    assert_eq!(lseek(&f, 0, libc::SEEK_HOLE), Ok(4096));
    assert_eq!(lseek(&f, 4096, libc::SEEK_DATA), Ok(4 * MB));
    assert_eq!(lseek(&f, 4 * MB, libc::SEEK_HOLE), Ok(4 * MB + 4096));
    assert_eq!(lseek(&f, 4 * MB + 4096, libc::SEEK_DATA), Err(libc::ENXIO));
    assert_eq!(lseek(&f, 8 * MB, libc::SEEK_HOLE), Err(libc::ENXIO));
    assert_eq!(lseek(&f, 0, libc::SEEK_END), Ok(8 * MB));
    drop(f);
    assert!(!exists(l.u("sp")));
    // Upper file.
    make_sparse(&l.m("up"));
    let f = File::open(l.m("up")).unwrap();
    assert_eq!(lseek(&f, 4096, libc::SEEK_DATA), Ok(4 * MB));
    assert_eq!(lseek(&f, 4 * MB, libc::SEEK_HOLE), Ok(4 * MB + 4096));
}

fn sparse_copy_up_keeps_holes(b: Backend) {
    let l = Layers::new(1);
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(l.l(0, "sp"))
        .unwrap();
    f.write_all_at(b"start", 0).unwrap();
    f.write_all_at(b"end", 63 * MB as u64).unwrap();
    f.set_len(64 * MB as u64).unwrap();
    drop(f);
    let _m = mount(b, &l);
    OpenOptions::new().write(true).open(l.m("sp")).unwrap();
    let st = lstat(l.u("sp"));
    assert_eq!(st.st_size, 64 * MB);
    // The kernel skips holes (at 1 MiB granularity); a full copy would
    // allocate all 64 MiB.
    assert!(
        st.st_blocks * 512 <= 8 * MB,
        "upper allocated {} bytes",
        st.st_blocks * 512
    );
    let data = read(l.m("sp"));
    assert_eq!(&data[..5], b"start");
    assert_eq!(&data[63 * MB as usize..63 * MB as usize + 3], b"end");
    assert!(data[5..63 * MB as usize].iter().all(|&c| c == 0));
}

fn copy_file_range_in_mount(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "src"), "0123456789abcdef");
    let _m = mount(b, &l);
    write(l.m("dst"), "XXXXXXXXXX");
    let src = File::open(l.m("src")).unwrap();
    let dst = OpenOptions::new().write(true).open(l.m("dst")).unwrap();
    let mut off_in: i64 = 4;
    let mut off_out: i64 = 2;
    // SAFETY: valid fds and offset pointers.
    let n = unsafe {
        libc::copy_file_range(
            src.as_raw_fd(),
            &mut off_in,
            dst.as_raw_fd(),
            &mut off_out,
            8,
            0,
        )
    };
    assert_eq!(n, 8, "copy_file_range: {}", std::io::Error::last_os_error());
    assert_eq!((off_in, off_out), (12, 10));
    drop(dst);
    assert_eq!(read_string(l.m("dst")), "XX456789ab");
    // The source stayed in lower.
    assert!(!exists(l.u("src")));
    // Into a lower file: copies it up.
    write(l.l(0, "dst2"), "________");
    let dst2 = OpenOptions::new().write(true).open(l.m("dst2")).unwrap();
    let mut off_in: i64 = 0;
    let mut off_out: i64 = 4;
    // SAFETY: as above.
    let n = unsafe {
        libc::copy_file_range(
            src.as_raw_fd(),
            &mut off_in,
            dst2.as_raw_fd(),
            &mut off_out,
            6,
            0,
        )
    };
    assert_eq!(n, 6);
    drop(dst2);
    assert_eq!(read_string(l.m("dst2")), "____012345");
    assert_eq!(read_string(l.l(0, "dst2")), "________");
}

fn inode_numbers_stable_across_copy_up(b: Backend) {
    let l = Layers::new(2);
    write(l.l(1, "d/f"), "f");
    write(l.l(0, "g"), "g");
    let _m = mount(b, &l);
    let before_f = lstat(l.m("d/f")).st_ino;
    let before_d = lstat(l.m("d")).st_ino;
    let before_g = lstat(l.m("g")).st_ino;
    let mut f = OpenOptions::new().append(true).open(l.m("d/f")).unwrap();
    f.write_all(b"+").unwrap();
    drop(f);
    chmod(l.m("g"), 0o600);
    assert!(exists(l.u("d/f")));
    assert_eq!(lstat(l.m("d/f")).st_ino, before_f);
    assert_eq!(lstat(l.m("d")).st_ino, before_d);
    assert_eq!(lstat(l.m("g")).st_ino, before_g);
    // readdir agrees with stat.
    let ents = readdir_raw(l.m("d"));
    let e = ents.iter().find(|e| e.name == "f").unwrap();
    assert_eq!(e.ino, before_f);
    // Distinct files have distinct inode numbers.
    assert_ne!(before_f, before_g);
}

fn mkdir_mode_and_nested(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "a/x"), "x");
    let _m = mount(b, &l);
    let c = cstr(&l.m("a/b"));
    // SAFETY: valid path.
    assert_eq!(unsafe { libc::mkdir(c.as_ptr(), 0o750) }, 0);
    assert_eq!(
        lstat(l.u("a/b")).st_mode,
        libc::S_IFDIR | (0o750 & !umask())
    );
    mkdir(l.m("a/b/c/d"));
    assert_eq!(names(l.m("a")), vec!["b", "x"]);
    assert_eq!(errno(std::fs::create_dir(l.m("a"))), Some(libc::EEXIST));
    assert_eq!(errno(std::fs::create_dir(l.m("a/x"))), Some(libc::EEXIST));
    // Link count of a merged dir counts subdirs.
    assert!(lstat(l.m("a/b")).st_nlink >= 2);
}

fn fsync_and_fdatasync(b: Backend) {
    let l = Layers::new(1);
    write(l.l(0, "f"), "f");
    let _m = mount(b, &l);
    let f = OpenOptions::new().write(true).open(l.m("f")).unwrap();
    f.write_all_at(b"g", 0).unwrap();
    f.sync_all().unwrap();
    f.sync_data().unwrap();
    let d = File::open(&l.merged).unwrap();
    d.sync_all().unwrap();
    assert_eq!(read_string(l.u("f")), "g");
}

/// An O_TMPFILE file: opened in a lower dir (copied up first), written,
/// changed through its fd while it has no name, then named by linkat
/// through /proc; an O_EXCL one cannot be named; a setgid dir gives its
/// group; an unnamed one leaves nothing behind.
fn o_tmpfile(b: Backend) {
    let l = Layers::new(1);
    mkdir(l.l(0, "d"));
    write(l.l(0, "d/old"), "old");
    mkdir(l.l(0, "g"));
    lchown(l.l(0, "g"), 0, 4321);
    chmod(l.l(0, "g"), 0o2775);
    let m = mount(b, &l);
    let tmpfile = |dir: &str, flags: i32| -> File {
        let p = cstr(&l.m(dir));
        // SAFETY: a valid path; the fd is handed to a File that owns it.
        let fd = unsafe { libc::open(p.as_ptr(), libc::O_TMPFILE | flags, 0o640) };
        assert!(
            fd >= 0,
            "{b:?}: O_TMPFILE in {dir}: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a fresh fd owned by nobody else.
        unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) }
    };
    let name = |f: &File, to: &str| -> std::io::Result<()> {
        let from = cstr(std::path::Path::new(&format!(
            "/proc/self/fd/{}",
            f.as_raw_fd()
        )));
        let to = cstr(&l.m(to));
        // SAFETY: valid NUL-terminated paths.
        let r = unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                from.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    let mut f = tmpfile("d", libc::O_RDWR);
    assert!(exists(l.u("d")), "{b:?}: the parent was copied up");
    f.write_all(b"temporary data").unwrap();
    f.set_len(9).unwrap();
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o604))
        .unwrap();
    let st = f.metadata().unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::nlink(&st), 0);
    name(&f, "d/named").unwrap();
    f.write_all_at(b"!", 9).unwrap();
    drop(f);
    let named = lstat(l.m("d/named"));
    assert_eq!(named.st_nlink, 1);
    assert_eq!(
        named.st_ino,
        std::os::unix::fs::MetadataExt::ino(&st),
        "{b:?}: one inode"
    );
    assert_eq!(named.st_mode & 0o7777, 0o604);
    assert_eq!(read_string(l.m("d/named")), "temporary!");
    // The kernel itself refuses to name an O_EXCL tmpfile.
    let f = tmpfile("d", libc::O_WRONLY | libc::O_EXCL);
    assert_eq!(errno(name(&f, "d/excl")), Some(libc::ENOENT));
    drop(f);
    // A setgid dir gives its group, as to any new file.
    let f = tmpfile("g", libc::O_RDWR);
    assert_eq!(
        std::os::unix::fs::MetadataExt::gid(&f.metadata().unwrap()),
        4321
    );
    drop(f);
    // Naming it over an existing name fails as link does.
    let f = tmpfile("d", libc::O_RDWR);
    assert_eq!(errno(name(&f, "d/old")), Some(libc::EEXIST));
    drop(f);
    drop(m);
    let mut upper: Vec<String> = std::fs::read_dir(l.u("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    upper.sort();
    assert_eq!(upper, ["named"], "{b:?}: only the named tmpfile is left");
    assert_eq!(read_string(l.u("d/named")), "temporary!");
    assert!(std::fs::read_dir(l.u("g")).unwrap().next().is_none());
}
