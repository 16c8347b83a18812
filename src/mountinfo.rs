//! `/proc/self/mountinfo`, read once for every user: the CLI's umount check,
//! the session's readahead, the tests' and the benchmark's mount checks.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// One line of mountinfo, as far as anyone here needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountInfo {
    /// The mount id (statx's `STATX_MNT_ID`).
    pub id: u64,
    /// `major:minor` of the mounted filesystem.
    pub dev: String,
    pub mount_point: PathBuf,
    pub options: String,
    pub fstype: String,
    pub source: String,
    pub super_options: String,
}

/// Undoes the octal escapes of mount tables (`\040` for a space).
pub fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |a, c| a * 8 + u32::from(c - b'0'));
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// The lines of a mountinfo text, in order; malformed lines are skipped.
pub fn parse(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let post: Vec<&str> = post.split(' ').collect();
            if pre.len() < 6 || post.len() < 3 {
                return None;
            }
            Some(MountInfo {
                id: pre[0].parse().ok()?,
                dev: pre[2].to_string(),
                mount_point: PathBuf::from(OsString::from_vec(unescape(pre[4]))),
                options: pre[5].to_string(),
                fstype: post[0].to_string(),
                source: String::from_utf8_lossy(&unescape(post[1])).into_owned(),
                super_options: post[2].to_string(),
            })
        })
        .collect()
}

/// This process's mount table.
pub fn read() -> io::Result<Vec<MountInfo>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// The topmost mount at exactly `p` (the last one listed), if any.
pub fn top_at(p: &Path) -> io::Result<Option<MountInfo>> {
    Ok(read()?.into_iter().rev().find(|m| m.mount_point == p))
}

/// Unmounts `p` for a tool that owns the mount (tests, benches, examples):
/// retried while busy (a process just forked may hold files in it until it
/// execs), detached lazily as a last resort. Ok once nothing is mounted there.
pub fn unmount_retry(p: &Path) -> io::Result<()> {
    for _ in 0..40 {
        match crate::sys::umount2(p, 0) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw() == libc::EBUSY => {
                std::thread::sleep(std::time::Duration::from_millis(50))
            }
            // Not a mount point: already gone.
            Err(e) if e.raw() == libc::EINVAL => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
    crate::sys::umount2(p, libc::MNT_DETACH).map_err(Into::into)
}

/// The ids of this process's idmapped mounts (their ids are shown shifted).
pub fn idmapped_ids() -> Vec<u64> {
    read()
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.options.split(',').any(|o| o == "idmapped"))
        .map(|m| m.id)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes() {
        assert_eq!(unescape(r"/a\040b\134c"), b"/a b\\c");
        assert_eq!(unescape(r"/x\04"), b"/x\\04");
        assert_eq!(unescape(r"/x\0a9"), b"/x\\0a9");
    }

    #[test]
    fn lines() {
        let text = "36 35 0:42 / /mnt/a\\040b rw,relatime shared:1 - fuse.rovl rovl rw,user_id=0\n\
                    bad line\n";
        let v = parse(text);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].id, 36);
        assert_eq!(v[0].dev, "0:42");
        assert_eq!(v[0].mount_point, Path::new("/mnt/a b"));
        assert_eq!(v[0].options, "rw,relatime");
        assert_eq!(v[0].fstype, "fuse.rovl");
        assert_eq!(v[0].source, "rovl");
        assert_eq!(v[0].super_options, "rw,user_id=0");
    }
}
