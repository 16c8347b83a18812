//! Mount options: the kernel's `-o` syntax, parsing and validation.
//!
//! Parsing and validation never touch the disk, so bad input changes nothing.

use std::path::PathBuf;

/// `redirect_dir=` values, as the kernel spells them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedirectDir {
    On,
    Follow,
    NoFollow,
    Off,
}

/// Everything a mount needs, resolved to absolute paths.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountConfig {
    /// Lower layers, topmost first (the kernel's left-to-right order).
    pub lowerdirs: Vec<PathBuf>,
    pub upperdir: Option<PathBuf>,
    pub workdir: Option<PathBuf>,
    pub mountpoint: PathBuf,
    /// Shown as the source in /proc/mounts.
    pub source: String,
    /// `ro` was given (a mount without upperdir is read-only regardless).
    pub read_only: bool,
    pub allow_other: bool,
    pub default_permissions: bool,
    /// Generic VFS flags passed through to the FUSE mount
    /// (`dev`, `nodev`, `suid`, `nosuid`, `exec`, `noexec`, `atime`, `noatime`, `lazytime`, ...).
    pub vfs_flags: Vec<String>,
    /// Bound of the name-lookup cache (`cache_entries=N`).
    pub cache_entries: usize,
    /// FUSE worker threads (`threads=N`); 0 picks one per core.
    pub threads: usize,
    /// `userxattr`: keep overlay xattrs in `user.overlay.*` instead of `trusted.overlay.*`.
    pub userxattr: bool,
    pub redirect_dir: RedirectDir,
    pub index: bool,
    pub metacopy: bool,
}
