//! containers/storage's `containers.override_stat` xattr, as fuse-overlayfs
//! reads and writes it with `xattr_permissions=1|2`: where real ownership
//! and modes cannot be set (rootless, `force_mask`), a file carries the
//! owner, mode and type it stands for as `uid:gid:mode[:type]`.

use crate::error::Result;
use crate::inode::Inode;
use crate::overlay::Overlay;
use crate::sys::{self, Stat};
use std::ffi::CStr;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

/// Every name the override is stored under, as `xattr_permissions=1|2`
/// write it and as fuse-overlayfs before 1.14 wrote it.
pub const NAMES: [&CStr; 3] = [
    c"security.containers.override_stat",
    c"user.containers.override_stat",
    c"user.fuseoverlayfs.override_stat",
];

/// What one override xattr says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OverrideStat {
    pub uid: u32,
    pub gid: u32,
    /// Permission bits (`0o7777`).
    pub perm: u32,
    /// The file type and device it stands for, when given.
    pub kind: Option<(u32, u64)>,
}

impl OverrideStat {
    pub fn parse(v: &[u8]) -> Option<OverrideStat> {
        let s = std::str::from_utf8(v).ok()?;
        let mut f = s.trim_end_matches('\0').split(':');
        let uid = f.next()?.parse().ok()?;
        let gid = f.next()?.parse().ok()?;
        let perm = u32::from_str_radix(f.next()?, 8).ok()? & 0o7777;
        let kind = match f.next() {
            None => None,
            Some(t) => Some(parse_kind(t)?),
        };
        Some(OverrideStat {
            uid,
            gid,
            perm,
            kind,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut s = format!("{}:{}:{:04o}", self.uid, self.gid, self.perm);
        if let Some((t, rdev)) = self.kind {
            let (maj, min) = (libc::major(rdev), libc::minor(rdev));
            s.push(':');
            s.push_str(&match t {
                libc::S_IFDIR => "dir".to_string(),
                libc::S_IFLNK => "symlink".to_string(),
                libc::S_IFIFO => "pipe".to_string(),
                libc::S_IFSOCK => "socket".to_string(),
                libc::S_IFBLK => format!("block-{maj}-{min}"),
                libc::S_IFCHR => format!("char-{maj}-{min}"),
                _ => "file".to_string(),
            });
        }
        s.into_bytes()
    }

    /// Applies it to a real stat.
    pub fn apply(&self, st: &mut Stat) {
        st.st_uid = self.uid;
        st.st_gid = self.gid;
        let kind = self.kind.map_or(st.st_mode & libc::S_IFMT, |(t, _)| t);
        st.st_mode = kind | self.perm;
        if let Some((_, rdev)) = self.kind {
            st.st_rdev = rdev;
        }
    }
}

fn parse_kind(t: &str) -> Option<(u32, u64)> {
    let dev = |rest: &str| -> Option<u64> {
        let (a, b) = rest.split_once('-')?;
        Some(libc::makedev(a.parse().ok()?, b.parse().ok()?))
    };
    Some(match t {
        "file" => (libc::S_IFREG, 0),
        "dir" => (libc::S_IFDIR, 0),
        "symlink" => (libc::S_IFLNK, 0),
        "pipe" => (libc::S_IFIFO, 0),
        "socket" => (libc::S_IFSOCK, 0),
        _ => match t.split_once('-')? {
            ("block", rest) => (libc::S_IFBLK, dev(rest)?),
            ("char", rest) => (libc::S_IFCHR, dev(rest)?),
            _ => return None,
        },
    })
}

impl Overlay {
    /// The override xattr's name with `xattr_permissions=1|2`.
    pub(crate) fn override_name(&self) -> Option<&'static CStr> {
        match self.cfg.xattr_permissions {
            1 => Some(NAMES[0]),
            2 => Some(NAMES[1]),
            _ => None,
        }
    }

    /// The mode users see of `node`, whose real stat is `st`.
    pub(crate) fn visible_mode(&self, node: &Arc<Inode>, st: &Stat) -> u32 {
        let mut own = *st;
        self.overridden(node, &mut own);
        own.st_mode
    }

    /// A real stat of `node` with its override applied, if it has one.
    pub(crate) fn overridden(&self, node: &Arc<Inode>, st: &mut Stat) {
        let Some(name) = self.override_name() else {
            return;
        };
        let Some(top) = node.top() else {
            return;
        };
        let read = |x: &CStr| {
            if node.nodeid == crate::inode::ROOT {
                sys::getxattr(self.layers.get(top).root.as_fd(), x)
            } else {
                self.entry_in(node, top)
                    .and_then(|(d, n)| sys::getxattr_at(d.as_fd(), &n, x))
            }
        };
        // fuse-overlayfs before 1.14 wrote its own name.
        let v = read(name).or_else(|e| match self.cfg.xattr_permissions {
            2 => read(NAMES[2]),
            _ => Err(e),
        });
        if let Some(o) = v.ok().and_then(|v| OverrideStat::parse(&v)) {
            o.apply(st);
        }
    }

    /// Records a change of owner or mode in the override xattr of the
    /// (copied-up) object at `fd`, instead of on the object itself.
    pub(crate) fn set_override(
        &self,
        fd: BorrowedFd<'_>,
        uid: Option<u32>,
        gid: Option<u32>,
        perm: Option<u32>,
    ) -> Result<()> {
        let name = self.override_name().ok_or_else(|| sys::err(libc::EINVAL))?;
        let st = sys::fstat(fd)?;
        let mut o = sys::getxattr(fd, name)
            .ok()
            .and_then(|v| OverrideStat::parse(&v))
            .unwrap_or(OverrideStat {
                uid: st.st_uid,
                gid: st.st_gid,
                perm: st.st_mode & 0o7777,
                kind: None,
            });
        o.uid = uid.filter(|&u| u != u32::MAX).unwrap_or(o.uid);
        o.gid = gid.filter(|&g| g != u32::MAX).unwrap_or(o.gid);
        o.perm = perm.map_or(o.perm, |p| p & 0o7777);
        sys::setxattr(fd, name, &o.encode(), 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        let o = OverrideStat::parse(b"0:0:0755").unwrap();
        assert_eq!((o.uid, o.gid, o.perm, o.kind), (0, 0, 0o755, None));
        assert_eq!(o.encode(), b"0:0:0755");
        let d = OverrideStat::parse(b"5:6:0620:char-1-3").unwrap();
        assert_eq!(d.kind, Some((libc::S_IFCHR, libc::makedev(1, 3))));
        assert_eq!(d.encode(), b"5:6:0620:char-1-3");
        let mut st: Stat = crate::sys::zeroed_stat();
        st.st_mode = libc::S_IFREG | 0o600;
        d.apply(&mut st);
        assert_eq!(st.st_mode, libc::S_IFCHR | 0o620);
        assert_eq!((st.st_uid, st.st_gid), (5, 6));
        for bad in [
            &b"x:0:0755"[..],
            b"0:0",
            b"0:0:9",
            b"0:0:0755:char-1",
            b"0:0:0755:weird",
        ] {
            assert!(OverrideStat::parse(bad).is_none(), "{bad:?}");
        }
    }
}
