//! The tests' one set of libc wrappers, returning raw errnos: the
//! differential comparison is about exact errno values, which `std::io`
//! would partly hide (e.g. d_type fallbacks). `common`'s `try_*` helpers
//! are these with an `io::Error`.

use std::ffi::{CStr, CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

pub type Sys<T> = Result<T, i32>;

pub fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

pub fn cstr(s: &str) -> CString {
    CString::new(s).expect("string without NUL")
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn check(r: libc::c_int) -> Sys<()> {
    if r < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

fn check_len(r: libc::ssize_t) -> Sys<usize> {
    if r < 0 {
        Err(errno())
    } else {
        Ok(r as usize)
    }
}

pub fn errno_name(e: i32) -> String {
    let name = match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::EBADF => "EBADF",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::ETXTBSY => "ETXTBSY",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::EMLINK => "EMLINK",
        libc::ERANGE => "ERANGE",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ENODATA => "ENODATA",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ESTALE => "ESTALE",
        libc::ENOTCONN => "ENOTCONN",
        libc::E2BIG => "E2BIG",
        _ => return format!("errno {e}"),
    };
    name.to_string()
}

pub fn lstat(p: &Path) -> Sys<libc::stat> {
    let c = cpath(p);
    // SAFETY: valid C string and a zeroed out-struct.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        check(libc::lstat(c.as_ptr(), &mut st))?;
        Ok(st)
    }
}

pub fn stat(p: &Path) -> Sys<libc::stat> {
    let c = cpath(p);
    // SAFETY: as above.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        check(libc::stat(c.as_ptr(), &mut st))?;
        Ok(st)
    }
}

pub fn open(p: &Path, flags: libc::c_int, mode: u32) -> Sys<Fd> {
    let c = cpath(p);
    // SAFETY: valid C string.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, mode as libc::c_uint) };
    if fd < 0 {
        Err(errno())
    } else {
        Ok(Fd(fd))
    }
}

/// An owned fd; `close` reports the close errno (FUSE flush errors surface there).
pub struct Fd(libc::c_int);

impl Fd {
    pub fn pwrite(&self, data: &[u8], off: u64) -> Sys<usize> {
        // SAFETY: buffer valid for its length.
        check_len(unsafe {
            libc::pwrite(self.0, data.as_ptr().cast(), data.len(), off as libc::off_t)
        })
    }

    pub fn write(&self, data: &[u8]) -> Sys<usize> {
        // SAFETY: buffer valid for its length.
        check_len(unsafe { libc::write(self.0, data.as_ptr().cast(), data.len()) })
    }

    pub fn read_all(&self, limit: usize) -> Sys<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        while out.len() < limit {
            // SAFETY: buffer valid for its length.
            let n = check_len(unsafe { libc::read(self.0, buf.as_mut_ptr().cast(), buf.len()) })?;
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        Ok(out)
    }

    pub fn close(self) -> Sys<()> {
        let fd = self.0;
        std::mem::forget(self);
        // SAFETY: we own fd and close it exactly once.
        check(unsafe { libc::close(fd) })
    }
}

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.0) };
    }
}

pub fn truncate(p: &Path, len: u64) -> Sys<()> {
    let c = cpath(p);
    // SAFETY: valid C string.
    check(unsafe { libc::truncate(c.as_ptr(), len as libc::off_t) })
}

pub fn unlink(p: &Path) -> Sys<()> {
    let c = cpath(p);
    // SAFETY: valid C string.
    check(unsafe { libc::unlink(c.as_ptr()) })
}

pub fn mkdir(p: &Path, mode: u32) -> Sys<()> {
    let c = cpath(p);
    // SAFETY: valid C string.
    check(unsafe { libc::mkdir(c.as_ptr(), mode as libc::mode_t) })
}

pub fn rmdir(p: &Path) -> Sys<()> {
    let c = cpath(p);
    // SAFETY: valid C string.
    check(unsafe { libc::rmdir(c.as_ptr()) })
}

pub fn renameat2(from: &Path, to: &Path, flags: u32) -> Sys<()> {
    let (f, t) = (cpath(from), cpath(to));
    // SAFETY: valid C strings; raw syscall so flags reach the kernel unchanged.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            flags,
        )
    };
    if r < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

pub fn link(from: &Path, to: &Path) -> Sys<()> {
    let (f, t) = (cpath(from), cpath(to));
    // SAFETY: valid C strings.
    check(unsafe { libc::link(f.as_ptr(), t.as_ptr()) })
}

/// Names an fd's file (an O_TMPFILE one) by linkat through /proc.
pub fn link_fd(fd: &Fd, to: &Path) -> Sys<()> {
    let from = CString::new(format!("/proc/self/fd/{}", fd.0)).expect("no NUL");
    let t = cpath(to);
    // SAFETY: valid C strings.
    check(unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    })
}

pub fn symlink(target: &[u8], p: &Path) -> Sys<()> {
    let t = CString::new(target).expect("target without NUL");
    let c = cpath(p);
    // SAFETY: valid C strings.
    check(unsafe { libc::symlink(t.as_ptr(), c.as_ptr()) })
}

pub fn readlink(p: &Path) -> Sys<Vec<u8>> {
    let c = cpath(p);
    let mut buf = vec![0u8; 4096];
    // SAFETY: buffer valid for its length.
    let n = check_len(unsafe { libc::readlink(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })?;
    buf.truncate(n);
    Ok(buf)
}

/// The filesystem type of the fs holding `p` (`statfs`'s `f_type`).
pub fn fs_magic(p: &Path) -> Sys<i64> {
    let c = cpath(p);
    // SAFETY: zeroed is a valid statfs.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and a statfs to fill.
    check(unsafe { libc::statfs(c.as_ptr(), &mut s) })?;
    Ok(s.f_type as i64)
}

pub fn mknod(p: &Path, mode: u32, dev: libc::dev_t) -> Sys<()> {
    let c = cpath(p);
    // SAFETY: valid C string.
    check(unsafe { libc::mknod(c.as_ptr(), mode as libc::mode_t, dev) })
}

pub fn chmod(p: &Path, mode: u32) -> Sys<()> {
    let c = cpath(p);
    // SAFETY: valid C string.
    check(unsafe { libc::chmod(c.as_ptr(), mode as libc::mode_t) })
}

pub fn chown(p: &Path, uid: u32, gid: u32, nofollow: bool) -> Sys<()> {
    let c = cpath(p);
    let flags = if nofollow {
        libc::AT_SYMLINK_NOFOLLOW
    } else {
        0
    };
    // SAFETY: valid C string.
    check(unsafe { libc::fchownat(libc::AT_FDCWD, c.as_ptr(), uid, gid, flags) })
}

pub fn utimens(p: &Path, times: [libc::timespec; 2], nofollow: bool) -> Sys<()> {
    let c = cpath(p);
    let flags = if nofollow {
        libc::AT_SYMLINK_NOFOLLOW
    } else {
        0
    };
    // SAFETY: valid C string and a two-element array.
    check(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), flags) })
}

pub fn lsetxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> Sys<()> {
    let (c, n) = (cpath(p), cstr(name));
    // SAFETY: valid C strings and buffer.
    check(unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
}

pub fn lremovexattr(p: &Path, name: &str) -> Sys<()> {
    let (c, n) = (cpath(p), cstr(name));
    // SAFETY: valid C strings.
    check(unsafe { libc::lremovexattr(c.as_ptr(), n.as_ptr()) })
}

pub fn lgetxattr(p: &Path, name: &str) -> Sys<Vec<u8>> {
    let (c, n) = (cpath(p), cstr(name));
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: buffer valid for its length.
    let len = check_len(unsafe {
        libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
    })?;
    buf.truncate(len);
    Ok(buf)
}

/// Sorted names from llistxattr.
pub fn llistxattr(p: &Path) -> Sys<Vec<String>> {
    let c = cpath(p);
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: buffer valid for its length.
    let len =
        check_len(unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })?;
    let mut names: Vec<String> = buf[..len]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    names.sort();
    Ok(names)
}

/// Sorted (name, d_type) pairs without `.` and `..`, straight from readdir.
pub fn readdir(p: &Path) -> Sys<Vec<(String, u8)>> {
    readdir_ino(p).map(|v| v.into_iter().map(|(n, t, _)| (n, t)).collect())
}

/// Sorted (name, d_type, d_ino) without `.` and `..`.
pub fn readdir_ino(p: &Path) -> Sys<Vec<(String, u8, u64)>> {
    let mut out = readdir_raw(p)?;
    out.retain(|(n, _, _)| n != "." && n != "..");
    out.sort();
    Ok(out)
}

/// Every (name, d_type, d_ino) as readdir(3) returns them, `.` and `..`
/// included, in its order.
pub fn readdir_raw(p: &Path) -> Sys<Vec<(String, u8, u64)>> {
    let c = cpath(p);
    // SAFETY: valid C string; the DIR stream is closed on every path below,
    // and each entry is copied out before the next readdir.
    unsafe {
        let dir = libc::opendir(c.as_ptr());
        if dir.is_null() {
            return Err(errno());
        }
        let mut out = Vec::new();
        loop {
            *libc::__errno_location() = 0;
            let ent = libc::readdir(dir);
            if ent.is_null() {
                let e = errno();
                libc::closedir(dir);
                if e != 0 {
                    return Err(e);
                }
                return Ok(out);
            }
            let name = CStr::from_ptr((*ent).d_name.as_ptr());
            let name = OsStr::from_bytes(name.to_bytes())
                .to_string_lossy()
                .into_owned();
            out.push((name, (*ent).d_type, (*ent).d_ino));
        }
    }
}

pub fn set_umask(mask: u32) {
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(mask as libc::mode_t) };
}

/// Drops `cap` from this thread's effective capabilities (capabilities are
/// per thread): the thread's later calls run as a caller without it.
pub fn drop_effective_cap(cap: u32) -> Sys<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut h = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut d = [Data::default(); 2];
    // SAFETY: a version 3 header and two data words, as capget expects.
    check(unsafe { libc::syscall(libc::SYS_capget, &mut h, d.as_mut_ptr()) } as libc::c_int)?;
    d[(cap / 32) as usize].effective &= !(1 << (cap % 32));
    // SAFETY: as above.
    check(unsafe { libc::syscall(libc::SYS_capset, &h, d.as_ptr()) } as libc::c_int)
}
