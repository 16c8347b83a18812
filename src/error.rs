//! The two kinds of failure: an [`Errno`], what every filesystem operation
//! fails with and what its FUSE reply carries; and an [`Error`], why a
//! mount cannot start, as one line that says what and where.

use std::fmt;
use std::io;
use std::path::Path;

/// An errno value. Operations return it, not `io::Error`: every failure
/// has one, so a reply never has to guess.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Errno(i32);

/// The result of an operation.
pub type Result<T> = std::result::Result<T, Errno>;

impl Errno {
    pub const fn new(n: i32) -> Errno {
        Errno(n)
    }

    /// The errno the last failed system call of this thread left.
    pub fn last() -> Errno {
        Errno(
            io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        )
    }

    pub fn raw(self) -> i32 {
        self.0
    }

    /// The name is not there (ENOENT), or a path to it crosses a non-dir.
    pub fn is_missing(self) -> bool {
        matches!(self.0, libc::ENOENT | libc::ENOTDIR)
    }
}

/// An `io::Error` from std (fd cloning, spawning) carries an errno; one
/// that does not is an I/O failure to the caller.
impl From<io::Error> for Errno {
    fn from(e: io::Error) -> Errno {
        Errno(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

impl From<Errno> for io::Error {
    fn from(e: Errno) -> io::Error {
        io::Error::from_raw_os_error(e.0)
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&io::Error::from_raw_os_error(self.0), f)
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Errno({}: {self})", self.0)
    }
}

impl std::error::Error for Errno {}

/// Why a mount cannot start: bad options, a layer or workdir that cannot
/// be used, a failed mount(2). Shown as one line, `rovl: …`.
#[derive(Debug)]
pub struct Error {
    msg: String,
    errno: Option<i32>,
}

/// The result of a mount-time step.
pub type StartResult<T> = std::result::Result<T, Error>;

impl Error {
    /// A failure rovl itself found (no system call failed).
    pub fn new(msg: impl Into<String>) -> Error {
        Error {
            msg: msg.into(),
            errno: None,
        }
    }

    /// A dir another mount holds (EBUSY, as the kernel's "in use").
    pub fn busy(msg: impl Into<String>) -> Error {
        Error {
            msg: msg.into(),
            errno: Some(libc::EBUSY),
        }
    }

    /// `what PATH: cause`, for a system call that failed on a path.
    pub fn at(what: &str, path: &Path, cause: impl Into<io::Error>) -> Error {
        let cause = cause.into();
        Error {
            msg: format!("{what} {}: {cause}", path.display()),
            errno: cause.raw_os_error(),
        }
    }

    /// `what: cause`, for a failure that concerns no one path.
    pub fn because(what: &str, cause: impl Into<io::Error>) -> Error {
        let cause = cause.into();
        Error {
            msg: format!("{what}: {cause}"),
            errno: cause.raw_os_error(),
        }
    }

    /// The errno of the system call that failed, if one did.
    pub fn errno(&self) -> Option<i32> {
        self.errno
    }

    /// The line without its `rovl: ` prefix.
    pub fn message(&self) -> &str {
        &self.msg
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rovl: {}", self.msg)
    }
}

impl std::error::Error for Error {}
