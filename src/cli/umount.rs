//! `rovl umount`: only rovl's own mounts, symlinks resolved as util-linux
//! does, `fusermount3 -u` for users, a hint when busy.

use super::CmdResult;
use rovl::sys::umount2;
use std::io;
use std::path::Path;

pub fn umount_cmd(mountpoint: &Path, lazy: bool) -> CmdResult {
    let cwd =
        std::env::current_dir().map_err(|e| format!("rovl: cannot get current directory: {e}"))?;
    let mut abs = cwd.join(mountpoint);
    // A symlink to the mountpoint names the mount, as util-linux takes it.
    if std::fs::symlink_metadata(&abs).is_ok_and(|m| m.file_type().is_symlink()) {
        abs = std::fs::canonicalize(&abs)
            .map_err(|e| format!("rovl: {}: {e}", mountpoint.display()))?;
    }
    // Resolve all but the last component: stat on a dead FUSE mount fails.
    let target = match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => std::fs::canonicalize(parent)
            .map(|p| p.join(name))
            .map_err(|e| format!("rovl: {}: {e}", mountpoint.display()))?,
        _ => std::fs::canonicalize(&abs)
            .map_err(|e| format!("rovl: {}: {e}", mountpoint.display()))?,
    };
    match rovl::mountinfo::top_at(&target).map(|m| m.map(|m| m.fstype)) {
        Ok(None) => return Err(format!("rovl: {}: not mounted", mountpoint.display())),
        Ok(Some(t)) if t != "fuse.rovl" => {
            return Err(format!(
                "rovl: {}: not a rovl mount (filesystem type {t}); use umount or fusermount3 -u",
                mountpoint.display()
            ))
        }
        Ok(Some(_)) => {}
        Err(e) => log::warn!("cannot read /proc/self/mountinfo: {e}"),
    }
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    match umount2(&target, flags) {
        Ok(()) => Ok(()),
        Err(e) if e.raw() == libc::EPERM => fusermount_unmount(&target, lazy),
        Err(e) if e.raw() == libc::EBUSY => Err(format!(
            "rovl: cannot unmount {}: busy (files open or a process's cwd inside; \
             see fuser -vm {0}, or detach now with rovl umount -l)",
            mountpoint.display()
        )),
        Err(e) if e.raw() == libc::EINVAL => {
            Err(format!("rovl: {}: not mounted", mountpoint.display()))
        }
        Err(e) => Err(format!(
            "rovl: cannot unmount {}: {e}",
            mountpoint.display()
        )),
    }
}

/// Unprivileged users unmount through the setuid helper.
pub fn fusermount_unmount(target: &Path, lazy: bool) -> CmdResult {
    rovl::session::helper_unmount(target, lazy).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => format!(
            "rovl: cannot unmount {}: permission denied (fusermount3: {e})",
            target.display()
        ),
        _ => format!("rovl: cannot unmount {}: {e}", target.display()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn umount_not_mounted() {
        let t = tempfile::tempdir().unwrap();
        let e = umount_cmd(t.path(), false).unwrap_err();
        assert!(e.contains("not mounted"), "{e}");
        let e = umount_cmd(&t.path().join("missing/dir"), false).unwrap_err();
        assert!(e.starts_with("rovl: "), "{e}");
    }
}
