//! Thin, safe wrappers over the fd-relative system calls rovl uses.
//!
//! Everything here takes a directory fd and a single path component, so no
//! string path is ever resolved through a symlink inside a layer. It is
//! the one place with `unsafe` (see `lib.rs`), each block with its reason.

#![warn(clippy::undocumented_unsafe_blocks)]

use std::ffi::{CStr, CString, OsStr, OsString};
use std::io;

pub use crate::error::{Errno, Result};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::atomic::{AtomicBool, Ordering};

pub type Stat = libc::stat;

/// Converts a libc return value into a [`Result`].
fn check(ret: libc::c_int) -> Result<libc::c_int> {
    if ret < 0 {
        Err(Errno::last())
    } else {
        Ok(ret)
    }
}

fn check_size(ret: libc::ssize_t) -> Result<usize> {
    if ret < 0 {
        Err(Errno::last())
    } else {
        Ok(ret as usize)
    }
}

pub fn err(errno: i32) -> Errno {
    Errno::new(errno)
}

pub fn cstr(name: &OsStr) -> Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| err(libc::EINVAL))
}

/// `openat` with `O_NOFOLLOW | O_CLOEXEC` always added.
pub fn openat(dir: BorrowedFd<'_>, name: &CStr, flags: i32, mode: u32) -> Result<OwnedFd> {
    // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
    let fd = check(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    })?;
    // SAFETY: a descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens `path` (mount time only: layer roots and the workdir, whose
/// symlinks are followed as the kernel's option parsing does).
pub fn open_path(path: &std::path::Path, flags: i32) -> Result<OwnedFd> {
    let c = cstr(path.as_os_str())?;
    // SAFETY: a valid C string; the new fd is owned at once.
    let fd = check(unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) })?;
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens a directory by absolute path (mount time only).
pub fn open_dir_path(path: &std::path::Path) -> Result<OwnedFd> {
    let c = cstr(path.as_os_str())?;
    // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
    let fd = check(unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: a descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A private, non-recursive clone of the mount at `path` (`open_tree`
/// with `OPEN_TREE_CLONE`): the dir as its own filesystem has it, with no
/// mounts stacked inside it, the way kernel overlayfs sees a layer.
pub fn open_tree_clone(path: &std::path::Path) -> Result<OwnedFd> {
    // The syscall number is the same on every architecture.
    const SYS_OPEN_TREE: libc::c_long = 428;
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    let c = cstr(path.as_os_str())?;
    // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
    let fd = unsafe {
        libc::syscall(
            SYS_OPEN_TREE,
            libc::AT_FDCWD,
            c.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: a descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Re-opens an `O_PATH` fd with real access flags, through its /proc magic link
/// (which names the inode, not a path inside the layer).
pub fn reopen(fd: BorrowedFd<'_>, flags: i32) -> Result<OwnedFd> {
    let p = proc_path(fd);
    // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
    let r = check(unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC) })?;
    // SAFETY: a descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

pub fn proc_path(fd: BorrowedFd<'_>) -> CString {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL in a number")
}

pub fn fstatat(dir: BorrowedFd<'_>, name: &CStr) -> Result<Stat> {
    let mut st = MaybeUninit::<Stat>::uninit();
    // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
    check(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    // SAFETY: the call above succeeded, so the kernel filled the value.
    Ok(unsafe { st.assume_init() })
}

/// The id of the mount `fd` is on (`statx` with `STATX_MNT_ID`).
pub fn mount_id(fd: BorrowedFd<'_>) -> Result<u64> {
    // SAFETY: statx only writes into `stx`; the path is an empty C string.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
    check(unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_MNT_ID,
            &mut stx,
        )
    })?;
    if stx.stx_mask & libc::STATX_MNT_ID == 0 {
        return Err(err(libc::ENOSYS));
    }
    Ok(stx.stx_mnt_id)
}

pub fn fstat(fd: BorrowedFd<'_>) -> Result<Stat> {
    let mut st = MaybeUninit::<Stat>::uninit();
    // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
    check(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: the call above succeeded, so the kernel filled the value.
    Ok(unsafe { st.assume_init() })
}

pub fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> Result<()> {
    // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) }).map(drop)
}

pub fn mknodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32, rdev: u64) -> Result<()> {
    // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
    check(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, rdev) }).map(drop)
}

pub fn symlinkat(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> Result<()> {
    // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
    check(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

pub fn readlinkat(dir: BorrowedFd<'_>, name: &CStr) -> Result<OsString> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
    let n = check_size(unsafe {
        libc::readlinkat(
            dir.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })?;
    buf.truncate(n);
    Ok(OsString::from_vec(buf))
}

pub fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, flags: i32) -> Result<()> {
    // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
}

pub fn renameat2(
    olddir: BorrowedFd<'_>,
    old: &CStr,
    newdir: BorrowedFd<'_>,
    new: &CStr,
    flags: u32,
) -> Result<()> {
    // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
    check(unsafe {
        libc::renameat2(
            olddir.as_raw_fd(),
            old.as_ptr(),
            newdir.as_raw_fd(),
            new.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

pub fn linkat(
    olddir: BorrowedFd<'_>,
    old: &CStr,
    newdir: BorrowedFd<'_>,
    new: &CStr,
) -> Result<()> {
    // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
    check(unsafe {
        libc::linkat(
            olddir.as_raw_fd(),
            old.as_ptr(),
            newdir.as_raw_fd(),
            new.as_ptr(),
            0,
        )
    })
    .map(drop)
}

/// Gives the object behind `fd` the name `newdir/new`, through its /proc
/// magic link: how an O_TMPFILE file (still linkable) gets its first name.
pub fn link_fd(fd: BorrowedFd<'_>, newdir: BorrowedFd<'_>, new: &CStr) -> Result<()> {
    let p = proc_path(fd);
    // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
    check(unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            p.as_ptr(),
            newdir.as_raw_fd(),
            new.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    })
    .map(drop)
}

pub fn fchownat(dir: BorrowedFd<'_>, name: &CStr, uid: u32, gid: u32) -> Result<()> {
    // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
    check(unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            name.as_ptr(),
            uid,
            gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// chmod of `dir/name`, never through a symlink: `fchmodat2` (Linux 6.6),
/// else through an O_PATH fd's /proc link.
pub fn fchmodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> Result<()> {
    static NO_FCHMODAT2: AtomicBool = AtomicBool::new(false);
    if !NO_FCHMODAT2.load(Ordering::Relaxed) {
        // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
        let r = check(unsafe {
            libc::syscall(
                libc::SYS_fchmodat2,
                dir.as_raw_fd(),
                name.as_ptr(),
                mode,
                libc::AT_SYMLINK_NOFOLLOW,
            ) as libc::c_int
        });
        match r {
            Err(e) if e.raw() == libc::ENOSYS => NO_FCHMODAT2.store(true, Ordering::Relaxed),
            r => return r.map(drop),
        }
    }
    fchmod_any(openat(dir, name, libc::O_PATH, 0)?.as_fd(), mode)
}

/// chmod of the inode an fd (O_PATH allowed) refers to.
pub fn fchmod_any(fd: BorrowedFd<'_>, mode: u32) -> Result<()> {
    let p = proc_path(fd);
    // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
    check(unsafe { libc::chmod(p.as_ptr(), mode) }).map(drop)
}

/// chown of the object behind `fd` (an unlinked file too), through its
/// /proc magic link.
pub fn fchown_any(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> Result<()> {
    let p = proc_path(fd);
    // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
    check(unsafe { libc::chown(p.as_ptr(), uid, gid) }).map(drop)
}

pub fn utimensat(dir: BorrowedFd<'_>, name: &CStr, times: &[libc::timespec; 2]) -> Result<()> {
    // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
    check(unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            name.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// Sets times of the inode an fd (O_PATH allowed) refers to.
pub fn futimens_any(fd: BorrowedFd<'_>, times: &[libc::timespec; 2]) -> Result<()> {
    let p = proc_path(fd);
    // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
    check(unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), times.as_ptr(), 0) }).map(drop)
}

pub fn ftruncate(fd: BorrowedFd<'_>, size: u64) -> Result<()> {
    // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
    check(unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) }).map(drop)
}

pub fn fsync(fd: BorrowedFd<'_>, datasync: bool) -> Result<()> {
    let r = if datasync {
        // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
        unsafe { libc::fdatasync(fd.as_raw_fd()) }
    } else {
        // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
        unsafe { libc::fsync(fd.as_raw_fd()) }
    };
    // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
    check(r).map(drop)
}

pub fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], off: u64) -> Result<usize> {
    check_size(unsafe {
        // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
        libc::pread(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            off as libc::off_t,
        )
    })
}

pub fn pwrite(fd: BorrowedFd<'_>, buf: &[u8], off: u64) -> Result<usize> {
    // SAFETY: live fds for the call; the kernel reads and writes only the given lengths.
    check_size(unsafe {
        libc::pwrite(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            off as libc::off_t,
        )
    })
}

pub fn fallocate(fd: BorrowedFd<'_>, mode: i32, off: u64, len: u64) -> Result<()> {
    // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
    check(unsafe { libc::fallocate(fd.as_raw_fd(), mode, off as libc::off_t, len as libc::off_t) })
        .map(drop)
}

pub fn lseek(fd: BorrowedFd<'_>, off: i64, whence: i32) -> Result<i64> {
    // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), off, whence) };
    if r < 0 {
        Err(Errno::last())
    } else {
        // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
        Ok(r)
    }
}

pub fn copy_file_range(
    fd_in: BorrowedFd<'_>,
    off_in: &mut i64,
    fd_out: BorrowedFd<'_>,
    off_out: &mut i64,
    len: usize,
) -> Result<usize> {
    // SAFETY: live fds for the call; the kernel reads and writes only the given lengths.
    check_size(unsafe {
        libc::copy_file_range(
            fd_in.as_raw_fd(),
            off_in,
            fd_out.as_raw_fd(),
            off_out,
            len,
            0,
        )
    })
}

pub fn ficlone(dst: BorrowedFd<'_>, src: BorrowedFd<'_>) -> Result<()> {
    // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
    check(unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) }).map(drop)
}

pub fn fstatfs(fd: BorrowedFd<'_>) -> Result<libc::statfs> {
    let mut st = MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
    check(unsafe { libc::fstatfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: the call above succeeded, so the kernel filled the value.
    Ok(unsafe { st.assume_init() })
}

pub fn faccessat(dir: BorrowedFd<'_>, name: &CStr, mask: i32) -> Result<()> {
    // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
    check(unsafe {
        libc::faccessat(
            dir.as_raw_fd(),
            name.as_ptr(),
            mask,
            libc::AT_EACCESS | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

// Extended attributes go through the fd's /proc magic link: it names the
// inode itself (symlinks included), never a path inside a layer.

/// Runs a size-probing call (`buf` empty asks for the size) until the value
/// fits: the value may grow between the two calls.
fn read_sized(mut call: impl FnMut(&mut [u8]) -> libc::ssize_t) -> Result<Vec<u8>> {
    // Most values and lists are small: one call usually does.
    let mut small = [0u8; 256];
    match check_size(call(&mut small)) {
        Ok(n) => return Ok(small[..n].to_vec()),
        Err(e) if e.raw() == libc::ERANGE => {}
        Err(e) => return Err(e),
    }
    loop {
        let size = check_size(call(&mut []))?;
        let mut buf = vec![0u8; size];
        match check_size(call(&mut buf)) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(e) if e.raw() == libc::ERANGE => continue,
            Err(e) => return Err(e),
        }
    }
}

pub fn getxattr(fd: BorrowedFd<'_>, name: &CStr) -> Result<Vec<u8>> {
    // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
    let p = proc_path(fd);
    // SAFETY: a valid C string; the kernel writes at most the buffer's length into it.
    read_sized(|b| unsafe {
        libc::getxattr(p.as_ptr(), name.as_ptr(), b.as_mut_ptr().cast(), b.len())
    })
}

pub fn setxattr(fd: BorrowedFd<'_>, name: &CStr, value: &[u8], flags: i32) -> Result<()> {
    let p = proc_path(fd);
    // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
    check(unsafe {
        libc::setxattr(
            p.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

pub fn removexattr(fd: BorrowedFd<'_>, name: &CStr) -> Result<()> {
    let p = proc_path(fd);
    // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
    check(unsafe { libc::removexattr(p.as_ptr(), name.as_ptr()) }).map(drop)
}

// Since Linux 6.13 xattrs can be read relative to a dir fd in one call.
const SYS_GETXATTRAT: libc::c_long = 464;
const SYS_LISTXATTRAT: libc::c_long = 465;

#[repr(C)]
struct XattrArgs {
    value: u64,
    size: u32,
    flags: u32,
}

static NO_XATTRAT: AtomicBool = AtomicBool::new(false);

fn xattrat_missing(e: &Errno) -> bool {
    if e.raw() == libc::ENOSYS {
        NO_XATTRAT.store(true, Ordering::Relaxed);
        return true;
    }
    false
}

/// `getxattr` of `dir/name` without following a symlink, in one system call
/// where the kernel has `getxattrat`.
pub fn getxattr_at(dir: BorrowedFd<'_>, name: &CStr, attr: &CStr) -> Result<Vec<u8>> {
    if !NO_XATTRAT.load(Ordering::Relaxed) {
        let r = read_sized(|b| {
            let mut args = XattrArgs {
                value: b.as_mut_ptr() as u64,
                size: b.len() as u32,
                flags: 0,
            };
            // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
            unsafe {
                libc::syscall(
                    SYS_GETXATTRAT,
                    dir.as_raw_fd(),
                    name.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                    attr.as_ptr(),
                    &mut args as *mut XattrArgs,
                    std::mem::size_of::<XattrArgs>(),
                ) as libc::ssize_t
            }
        });
        match r {
            Err(e) if xattrat_missing(&e) => {}
            r => return r,
        }
    }
    let fd = openat(dir, name, libc::O_PATH, 0)?;
    getxattr(fd.as_fd(), attr)
}

/// `listxattr` of `dir/name` without following a symlink.
pub fn listxattr_at(dir: BorrowedFd<'_>, name: &CStr) -> Result<Vec<u8>> {
    if !NO_XATTRAT.load(Ordering::Relaxed) {
        // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
        let r = read_sized(|b| unsafe {
            libc::syscall(
                SYS_LISTXATTRAT,
                dir.as_raw_fd(),
                name.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
                b.as_mut_ptr(),
                b.len(),
            ) as libc::ssize_t
        });
        match r {
            Err(e) if xattrat_missing(&e) => {}
            r => return r,
        }
    }
    let fd = openat(dir, name, libc::O_PATH, 0)?;
    listxattr(fd.as_fd())
}

/// The raw NUL-separated name list.
pub fn listxattr(fd: BorrowedFd<'_>) -> Result<Vec<u8>> {
    // SAFETY: a live fd and valid C strings; the kernel writes at most the buffer's length into it.
    let p = proc_path(fd);
    // SAFETY: a valid C string; the kernel writes at most the buffer's length into it.
    read_sized(|b| unsafe { libc::listxattr(p.as_ptr(), b.as_mut_ptr().cast(), b.len()) })
}

/// A directory entry as read from a real layer directory.
pub struct RawDirent {
    pub ino: u64,
    pub d_type: u8,
    pub name: OsString,
}

/// Reads all entries of a directory (opened O_RDONLY|O_DIRECTORY), "." and ".." excluded.
pub fn read_dir_all(fd: &OwnedFd) -> Result<Vec<RawDirent>> {
    let mut out = Vec::new();
    // Not zeroed: only the bytes the kernel wrote are read.
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    loop {
        // SAFETY: a live fd and a buffer of `capacity` writable bytes.
        let n = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                fd.as_raw_fd(),
                buf.as_mut_ptr(),
                buf.capacity(),
            )
        };
        if n < 0 {
            return Err(Errno::last());
        }
        if n == 0 {
            break;
        }
        // SAFETY: getdents64 filled the first `n` bytes.
        let filled = unsafe { std::slice::from_raw_parts(buf.as_ptr(), n as usize) };
        let mut off = 0usize;
        while off < filled.len() {
            // struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
            let rec = &filled[off..];
            let ino = u64::from_ne_bytes(rec[0..8].try_into().unwrap_or([0; 8]));
            let reclen = u16::from_ne_bytes([rec[16], rec[17]]) as usize;
            let d_type = rec[18];
            let name_bytes = &rec[19..reclen];
            let len = name_bytes
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(name_bytes.len());
            let name = &name_bytes[..len];
            if name != b"." && name != b".." {
                out.push(RawDirent {
                    ino,
                    d_type,
                    name: OsStr::from_bytes(name).to_os_string(),
                });
            }
            if reclen == 0 {
                break;
            }
            off += reclen;
        }
    }
    Ok(out)
}

/// `name_to_handle_at(fd, "", AT_EMPTY_PATH)`: (handle type, handle bytes).
pub fn file_handle(fd: BorrowedFd<'_>) -> Result<(i32, Vec<u8>)> {
    const MAX: usize = 128;
    #[repr(C)]
    struct Fh {
        bytes: u32,
        typ: i32,
        data: [u8; MAX],
    }
    let mut fh = Fh {
        bytes: MAX as u32,
        typ: 0,
        data: [0; MAX],
    };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
    check(unsafe {
        libc::name_to_handle_at(
            fd.as_raw_fd(),
            c"".as_ptr(),
            (&mut fh as *mut Fh).cast(),
            &mut mount_id,
            libc::AT_EMPTY_PATH,
        )
    })?;
    let n = (fh.bytes as usize).min(MAX);
    Ok((fh.typ, fh.data[..n].to_vec()))
}

/// `open_by_handle_at` (needs CAP_DAC_READ_SEARCH), as an `O_PATH` fd.
pub fn open_by_handle(mount: BorrowedFd<'_>, typ: i32, handle: &[u8]) -> Result<OwnedFd> {
    let mut buf = Vec::with_capacity(8 + handle.len());
    buf.extend_from_slice(&(handle.len() as u32).to_ne_bytes());
    buf.extend_from_slice(&typ.to_ne_bytes());
    buf.extend_from_slice(handle);
    // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
    let fd = unsafe {
        libc::open_by_handle_at(
            mount.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            libc::O_PATH | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: a descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn flock(fd: BorrowedFd<'_>, op: i32) -> Result<()> {
    // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
    check(unsafe { libc::flock(fd.as_raw_fd(), op) }).map(drop)
}

pub fn mode_type(mode: u32) -> u32 {
    mode & libc::S_IFMT
}

pub fn is_dir(mode: u32) -> bool {
    mode_type(mode) == libc::S_IFDIR
}

/// A whiteout is a character device 0/0.
pub fn is_whiteout(st: &Stat) -> bool {
    mode_type(st.st_mode) == libc::S_IFCHR && st.st_rdev == 0
}

/// Timespec pair (atime, mtime) taken from a stat.
pub fn stat_times(st: &Stat) -> [libc::timespec; 2] {
    [
        libc::timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec,
        },
        libc::timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec,
        },
    ]
}

/// Mounts through the setuid `fusermount3` (the `_FUSE_COMMFD` handshake,
/// as libfuse does): it mounts `/dev/fuse` at `mountpoint` with `opts` and
/// hands back the fd over a socket pair.
pub fn fusermount(helper: &str, opts: &str, mountpoint: &std::path::Path) -> io::Result<OwnedFd> {
    use std::os::unix::net::UnixStream;
    use std::os::unix::process::CommandExt;
    let (ours, theirs) = UnixStream::pair()?;
    let their_fd = theirs.as_raw_fd();
    let mut cmd = std::process::Command::new(helper);
    cmd.arg("-o")
        .arg(opts)
        .arg("--")
        .arg(mountpoint)
        .env("_FUSE_COMMFD", their_fd.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // SAFETY: between fork and exec only fcntl runs, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let flags = libc::fcntl(their_fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(their_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop(theirs);
    let received = recv_fd(ours.as_fd());
    drop(ours);
    let out = child.wait_with_output()?;
    match received {
        Ok(fd) if out.status.success() => Ok(fd),
        _ => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let line = stderr.lines().next().unwrap_or("").trim();
            Err(io::Error::other(if line.is_empty() {
                format!("{helper} failed ({})", out.status)
            } else {
                line.to_string()
            }))
        }
    }
}

/// Receives one fd sent with SCM_RIGHTS.
fn recv_fd(sock: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // Room for one cmsghdr with one int, aligned as the kernel wants it.
    let mut cbuf = [0u64; 8];
    // SAFETY: msghdr is plain data; every pointer in it points at live buffers
    // above, with their lengths.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
    let n = loop {
        // SAFETY: `msg` describes valid buffers (see above).
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 && Errno::last().raw() == libc::EINTR {
            continue;
        }
        break n;
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: CMSG_FIRSTHDR reads the control buffer the kernel filled in.
    let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    if cmsg.is_null() {
        return Err(io::Error::other("no fd received from the mount helper"));
    }
    // SAFETY: `cmsg` points into `cbuf`; an SCM_RIGHTS message carries ints.
    unsafe {
        if (*cmsg).cmsg_level != libc::SOL_SOCKET || (*cmsg).cmsg_type != libc::SCM_RIGHTS {
            return Err(io::Error::other("unexpected message from the mount helper"));
        }
        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Opens `/dev/fuse` and mounts it at `target` with mount(2).
pub fn mount_fuse(
    source: &CStr,
    target: &CStr,
    fstype: &CStr,
    flags: libc::c_ulong,
    data: impl FnOnce(RawFd) -> String,
) -> Result<OwnedFd> {
    // SAFETY: live fds and NUL-terminated names; the kernel touches only what the arguments describe.
    let fd = check(unsafe { libc::open(c"/dev/fuse".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) })?;
    // SAFETY: `fd` is a fresh descriptor we own.
    let fuse = unsafe { OwnedFd::from_raw_fd(fd) };
    let cdata = CString::new(data(fd)).map_err(|_| err(libc::EINVAL))?;
    // SAFETY: every pointer is a valid C string for the duration of the call.
    check(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            cdata.as_ptr().cast(),
        )
    })?;
    Ok(fuse)
}

// ---------------------------------------------------------------------------
// Process-level calls (the daemon, the CLI, mount time).

pub fn uid() -> u32 {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() }
}

pub fn gid() -> u32 {
    // SAFETY: getgid has no preconditions.
    unsafe { libc::getgid() }
}

pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// Sets the umask; returns the old one.
pub fn set_umask(mask: u32) -> u32 {
    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(mask as libc::mode_t) }
}

pub fn umount2(path: &std::path::Path, flags: i32) -> Result<()> {
    let c = cstr(path.as_os_str())?;
    // SAFETY: a valid C string.
    check(unsafe { libc::umount2(c.as_ptr(), flags) }).map(drop)
}

pub fn kill(pid: u32, sig: i32) -> Result<()> {
    // SAFETY: kill has no memory-safety preconditions.
    check(unsafe { libc::kill(pid as libc::pid_t, sig) }).map(drop)
}

/// Fills `buf` from the kernel's random source.
pub fn getrandom(buf: &mut [u8]) -> Result<()> {
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(Errno::last());
    }
    if n as usize != buf.len() {
        return Err(err(libc::EIO));
    }
    Ok(())
}

/// Fixes the size of free memory a malloc arena keeps at its top.
/// `malloc_trim` releases the top of the main arena only; another thread's
/// arena gives its top back on `free` once it passes this threshold, which
/// glibc otherwise raises up to 64 MiB after large blocks are freed.
/// Fixing it also keeps blocks over 128 KiB in mappings of their own.
pub fn fix_malloc_trim_threshold(bytes: usize) {
    let bytes = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: mallopt only changes a tunable of the allocator.
    unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, bytes) };
}

/// Gives freed heap memory back to the system.
pub fn malloc_trim() {
    // SAFETY: malloc_trim only releases memory the allocator holds free.
    unsafe { libc::malloc_trim(0) };
}

/// Raises the soft limit on open files to the hard one; returns the limit.
pub fn raise_fd_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into `r`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return 1024;
    }
    if r.rlim_cur < r.rlim_max {
        let want = libc::rlimit {
            rlim_cur: r.rlim_max,
            rlim_max: r.rlim_max,
        };
        // SAFETY: setrlimit reads `want`.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            r.rlim_cur = r.rlim_max;
        }
    }
    r.rlim_cur
}

/// The mount id of `path` (statx `STATX_MNT_ID`), when the kernel reports it.
pub fn mount_id_of_path(path: &std::path::Path) -> Option<u64> {
    let c = cstr(path.as_os_str()).ok()?;
    let mut stx = MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: statx writes into `stx`, zeroed so every field is defined.
    let rc = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            0,
            libc::STATX_MNT_ID,
            stx.as_mut_ptr(),
        )
    };
    // SAFETY: zero-initialized and possibly filled by statx.
    let stx = unsafe { stx.assume_init() };
    (rc == 0 && stx.stx_mask & libc::STATX_MNT_ID != 0).then_some(stx.stx_mnt_id)
}

pub fn statvfs(path: &std::path::Path) -> Result<libc::statvfs> {
    let c = cstr(path.as_os_str())?;
    let mut sv = MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: statvfs writes into `sv`.
    check(unsafe { libc::statvfs(c.as_ptr(), sv.as_mut_ptr()) })?;
    // SAFETY: filled by statvfs.
    Ok(unsafe { sv.assume_init() })
}

/// An all-zero `stat`, to fill in (tests, templates).
pub fn zeroed_stat() -> Stat {
    // SAFETY: `stat` is plain data; all zeroes is a valid value.
    unsafe { std::mem::zeroed() }
}

/// `FS_IOC_GETFSUUID` of the fs holding the dir `fd`.
pub fn fs_uuid(fd: BorrowedFd<'_>) -> Result<[u8; 16]> {
    #[repr(C)]
    struct FsUuid2 {
        len: u8,
        uuid: [u8; 16],
    }
    // _IOR(0x15, 0, struct fsuuid2)
    const FS_IOC_GETFSUUID: libc::c_ulong = (2 << 30) | (17 << 16) | (0x15 << 8);
    let dir = reopen(fd, libc::O_RDONLY | libc::O_DIRECTORY)?;
    let mut u = FsUuid2 {
        len: 0,
        uuid: [0; 16],
    };
    // SAFETY: the ioctl writes one `struct fsuuid2` into `u`.
    check(unsafe { libc::ioctl(dir.as_raw_fd(), FS_IOC_GETFSUUID as _, &mut u) })?;
    Ok(u.uuid)
}

/// A set of signals, blocked in every thread started after `block`.
pub struct SigSet(libc::sigset_t);

impl SigSet {
    pub fn new(sigs: &[i32]) -> SigSet {
        let mut set = MaybeUninit::<libc::sigset_t>::zeroed();
        // SAFETY: sigemptyset initializes the set; sigaddset only edits it.
        unsafe {
            libc::sigemptyset(set.as_mut_ptr());
            for &s in sigs {
                libc::sigaddset(set.as_mut_ptr(), s);
            }
            SigSet(set.assume_init())
        }
    }

    /// Blocks the set in this thread (and the threads it starts later).
    pub fn block(&self) -> io::Result<()> {
        // SAFETY: the set is initialized; the old mask is not needed.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &self.0, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(())
    }

    /// Waits for one of the (blocked) signals; its number.
    pub fn wait(&self) -> io::Result<i32> {
        let mut sig = 0;
        // SAFETY: the set is initialized and `sig` is written on success.
        let rc = unsafe { libc::sigwait(&self.0, &mut sig) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(sig)
    }
}

/// A pipe, both ends close-on-exec: (read, write).
pub fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills `fds` with two new descriptors on success.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: both descriptors are fresh and owned from here on.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Forks, refusing when the process has more than one thread (a child
/// of a threaded process may only call async-signal-safe functions).
/// `Some(pid)` in the parent, `None` in the child.
pub fn fork_single_threaded() -> io::Result<Option<u32>> {
    let threads = std::fs::read_dir("/proc/self/task")?.count();
    if threads != 1 {
        return Err(io::Error::other(format!(
            "fork with {threads} threads running"
        )));
    }
    // SAFETY: one thread: the child is a full copy and may do anything.
    let pid = check(unsafe { libc::fork() })?;
    Ok((pid > 0).then_some(pid as u32))
}

/// Makes `fd` the standard descriptor `target` (0, 1 or 2).
pub fn dup_onto_std(fd: BorrowedFd<'_>, target: i32) -> Result<()> {
    assert!((0..3).contains(&target), "only the standard descriptors");
    // SAFETY: dup2 onto a standard descriptor, which std never owns.
    check(unsafe { libc::dup2(fd.as_raw_fd(), target) }).map(drop)
}

/// Closes every descriptor from 3 up except `keep`: a daemon drops what
/// it inherited. Errors (old kernels) are harmless.
pub fn close_inherited_except(keep: BorrowedFd<'_>) {
    let keep = keep.as_raw_fd() as libc::c_uint;
    // SAFETY: the caller owns no descriptor >= 3 other than `keep` (it runs
    // right after fork, before anything else is opened).
    unsafe {
        if keep > 3 {
            libc::syscall(
                libc::SYS_close_range,
                3 as libc::c_uint,
                keep - 1,
                0 as libc::c_uint,
            );
        }
        libc::syscall(
            libc::SYS_close_range,
            keep + 1,
            libc::c_uint::MAX,
            0 as libc::c_uint,
        );
    }
}

pub fn setsid() -> Result<()> {
    // SAFETY: setsid has no preconditions.
    check(unsafe { libc::setsid() }).map(drop)
}

/// Waits for child `pid`; its raw wait status.
pub fn waitpid(pid: u32) -> Result<i32> {
    let mut status = 0;
    // SAFETY: reaps our own child; `status` is written on success.
    check(unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) })?;
    Ok(status)
}
