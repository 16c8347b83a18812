//! Counters for `rovl stats` (SIGUSR1 to the daemon): requests and errors
//! by type, copy-ups and the bytes they copied, and the caches' sizes.

use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! ops {
    ($($op:ident $name:literal),* $(,)?) => {
        /// The requests rovl serves, as counted and logged.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Op { $($op),* }
        const NAMES: &[&str] = &[$($name),*];
    };
}

ops! {
    Lookup "lookup", Forget "forget", Getattr "getattr", Setattr "setattr",
    Readlink "readlink", Mknod "mknod", Mkdir "mkdir", Unlink "unlink",
    Rmdir "rmdir", Symlink "symlink", Rename "rename", Link "link",
    Open "open", Read "read", Write "write", Flush "flush", Release "release",
    Fsync "fsync", Opendir "opendir", Readdir "readdir",
    Readdirplus "readdirplus", Releasedir "releasedir", Fsyncdir "fsyncdir",
    Statfs "statfs", Setxattr "setxattr", Getxattr "getxattr",
    Listxattr "listxattr", Removexattr "removexattr", Access "access",
    Create "create", Tmpfile "tmpfile", Fallocate "fallocate", Lseek "lseek",
    CopyFileRange "copy_file_range",
}

const N: usize = NAMES.len();

impl Op {
    pub fn name(self) -> &'static str {
        NAMES[self as usize]
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

pub struct Counters {
    requests: [AtomicU64; N],
    errors: [AtomicU64; N],
    copy_ups: AtomicU64,
    copy_up_bytes: AtomicU64,
}

/// The process's counters (one mount per daemon).
pub static COUNTERS: Counters = Counters {
    requests: [const { AtomicU64::new(0) }; N],
    errors: [const { AtomicU64::new(0) }; N],
    copy_ups: AtomicU64::new(0),
    copy_up_bytes: AtomicU64::new(0),
};

impl Counters {
    pub fn request(&self, op: Op) {
        self.requests[op as usize].fetch_add(1, Relaxed);
    }

    pub fn error(&self, op: Op) {
        self.errors[op as usize].fetch_add(1, Relaxed);
    }

    /// One object copied up (data or not).
    pub fn copy_up(&self) {
        self.copy_ups.fetch_add(1, Relaxed);
    }

    /// File data copied up (a full copy-up, or a metadata-only copy's data).
    pub fn copied(&self, bytes: u64) {
        self.copy_up_bytes.fetch_add(bytes, Relaxed);
    }
}

/// What `rovl stats` shows.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct Snapshot {
    pub pid: u32,
    /// Requests by type (only those seen).
    pub requests: BTreeMap<String, u64>,
    /// Failed requests by type (only those seen).
    pub errors: BTreeMap<String, u64>,
    pub copy_ups: u64,
    pub copy_up_bytes: u64,
    /// Nodes the kernel holds (the inode table).
    pub nodes: usize,
    /// Cached directory fds, and lower-dir listings, with their bound.
    pub dir_fds: usize,
    pub listings: usize,
    pub cache_entries: usize,
    /// How requests come: "io_uring" or "/dev/fuse".
    #[serde(default)]
    pub transport: String,
}

impl Snapshot {
    pub fn take(ovl: &crate::overlay::Overlay, io_uring: bool) -> Snapshot {
        let c = &COUNTERS;
        let seen = |a: &[AtomicU64; N]| {
            a.iter()
                .enumerate()
                .map(|(i, v)| (NAMES[i].to_string(), v.load(Relaxed)))
                .filter(|(_, v)| *v > 0)
                .collect()
        };
        let (nodes, dir_fds, listings) = ovl.cache_sizes();
        Snapshot {
            pid: std::process::id(),
            requests: seen(&c.requests),
            errors: seen(&c.errors),
            copy_ups: c.copy_ups.load(Relaxed),
            copy_up_bytes: c.copy_up_bytes.load(Relaxed),
            nodes,
            dir_fds,
            listings,
            cache_entries: ovl.cfg.cache_entries,
            transport: if io_uring { "io_uring" } else { "/dev/fuse" }.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_ops() {
        assert_eq!(Op::Lookup.name(), "lookup");
        assert_eq!(Op::CopyFileRange.name(), "copy_file_range");
        assert_eq!(NAMES.len(), Op::CopyFileRange as usize + 1);
    }
}
