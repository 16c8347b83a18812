//! Merged directory listings (the kernel's `readdir.c`): entries of every
//! merged layer, top layer first, de-duplicated, with whiteouts hidden.
//! A listing is read once at opendir, so an open directory sees a snapshot.

use crate::inode::Inode;
use crate::overlay::{dtype_kind, Overlay, Ox};
use crate::sys;
use crate::whiteout::{hidden_by, is_wh_name};
use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

pub struct DirEntry {
    pub name: OsString,
    pub ino: u64,
    pub kind: fuser::FileType,
}

impl Overlay {
    /// The merged listing of a directory, with `.` and `..` first. As the
    /// kernel, a directory of one layer is listed as it is (whiteouts show
    /// as character devices) unless `all_merged` asks for the merged view.
    pub fn read_merged(&self, node: &Arc<Inode>, all_merged: bool) -> io::Result<Vec<DirEntry>> {
        let layers = node.layers();
        let parent_ino = match node.alias() {
            Some((p, _)) => p.ino(),
            None => node.ino(),
        };
        let mut out = vec![
            DirEntry {
                name: ".".into(),
                ino: node.ino(),
                kind: fuser::FileType::Directory,
            },
            DirEntry {
                name: "..".into(),
                ino: parent_ino,
                kind: fuser::FileType::Directory,
            },
        ];
        let merged = layers.len() > 1;
        let hide_whiteouts = merged || all_merged;
        let mut seen: HashSet<OsString> = HashSet::new();
        // Names hidden by one layer's `.wh.` markers, from the layers below.
        let mut hidden: Vec<OsString> = Vec::new();
        for &l in &layers {
            let dfd = self.dir_fd(node, l)?;
            let rd = sys::openat(dfd.as_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
            let upper = self.layers.is_upper(l);
            // Only a dir marked `opaque=x` holds xattr whiteouts, as the kernel reads it.
            let xwhiteouts = hide_whiteouts && self.has_xwhiteouts(dfd.as_fd(), l);
            for e in sys::read_dir_all(&rd)? {
                if is_wh_name(e.name.as_bytes()) {
                    if let Some(n) = hidden_by(e.name.as_bytes()).filter(|_| merged) {
                        hidden.push(OsStr::from_bytes(n).to_os_string());
                    }
                    continue;
                }
                if merged && !seen.insert(e.name.clone()) {
                    continue;
                }
                let mut d_type = e.d_type;
                let maybe_xwhiteout = xwhiteouts && d_type == libc::DT_REG;
                if maybe_xwhiteout
                    || (hide_whiteouts && (d_type == libc::DT_CHR || d_type == libc::DT_UNKNOWN))
                {
                    let c = sys::cstr(&e.name)?;
                    match sys::fstatat(dfd.as_fd(), &c) {
                        Ok(st) if self.is_whiteout_at(dfd.as_fd(), &c, &st, l) => continue,
                        Ok(st) => d_type = mode_dtype(st.st_mode),
                        Err(_) => continue,
                    }
                }
                let dev = self.layers.get(l).dev;
                let ino = if upper {
                    self.copied_inos
                        .get(&e.ino)
                        .map(|v| *v)
                        .unwrap_or_else(|| self.xino(e.ino, dev))
                } else {
                    self.xino(e.ino, dev)
                };
                out.push(DirEntry {
                    name: e.name,
                    ino,
                    kind: dtype_kind(d_type),
                });
            }
            // A layer's markers hide names of the layers below it, not its own.
            seen.extend(hidden.drain(..));
        }
        if !merged && !all_merged && layers.first().is_some_and(|&l| self.layers.is_upper(l)) {
            self.drop_stale_impure(node, &out);
        }
        Ok(out)
    }

    /// As the kernel's impure-dir readdir: an upper dir marked impure whose
    /// entries no longer come from a lower layer loses the mark.
    fn drop_stale_impure(&self, node: &Arc<Inode>, entries: &[DirEntry]) {
        if self.read_only() {
            return;
        }
        let Ok(dfd) = self.dir_fd(node, crate::layer::UPPER) else {
            return;
        };
        let impure = self.xattr(Ox::Impure);
        if sys::getxattr(dfd.as_fd(), impure).is_err() {
            return;
        }
        let origin = self.xattr(Ox::Origin);
        let translated = entries.iter().skip(2).any(|e| {
            let Ok(c) = sys::cstr(&e.name) else {
                return true;
            };
            // A subdir keeps the mark when it merges lower dirs (through a
            // redirect), since its reported inode number is then theirs.
            if e.kind == fuser::FileType::Directory {
                return !matches!(self.find(node, &c), Ok(Some(f)) if f.layers.len() == 1);
            }
            match sys::openat(dfd.as_fd(), &c, libc::O_PATH, 0) {
                Ok(fd) => sys::getxattr(fd.as_fd(), origin).is_ok(),
                Err(_) => true,
            }
        });
        if !translated && sys::removexattr(dfd.as_fd(), impure).is_ok() {
            node.state.write().impure = false;
        }
    }

    /// Whether a merged directory holds nothing visible (rmdir's test).
    pub fn check_empty(&self, node: &Arc<Inode>) -> io::Result<()> {
        if self.read_merged(node, true)?.len() > 2 {
            return Err(sys::err(libc::ENOTEMPTY));
        }
        Ok(())
    }
}

fn mode_dtype(mode: u32) -> u8 {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => libc::DT_DIR,
        libc::S_IFLNK => libc::DT_LNK,
        libc::S_IFCHR => libc::DT_CHR,
        libc::S_IFBLK => libc::DT_BLK,
        libc::S_IFIFO => libc::DT_FIFO,
        libc::S_IFSOCK => libc::DT_SOCK,
        _ => libc::DT_REG,
    }
}
