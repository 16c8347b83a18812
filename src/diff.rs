//! `rovl diff`: an upper dir as an OCI image-spec layer.
//!
//! The layer holds what the upper holds, in the OCI format: whiteouts of
//! every form become `.wh.NAME`; an opaque dir gets `.wh..wh..opq` where a
//! lower has the dir (containers/storage's rule: elsewhere there is nothing
//! to hide); a renamed dir (redirect) is written whole at its new name,
//! its lower content read from where the redirect points; a metacopy
//! file's data is read from its lower file. The overlay's own xattrs and
//! `containers.override_stat` are left out (the override's owner and mode
//! applied); names users set in the overlay namespace are unescaped.
//!
//! The output is deterministic: entries depth-first in bytewise name order,
//! ustar headers with only what identifies a file (type, mode, owner,
//! mtime in seconds, size, link target, device), xattrs and long names in
//! PAX records. The same upper gives the same bytes.

use crate::error::{Error, StartResult};
use crate::inode::Redirect;
use crate::ondisk::{self, join, show, Found, Kind, Lowers, Stack, XattrName};
use crate::override_stat::{self, OverrideStat};
use crate::sys::{self, Stat};
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use tar::{EntryType, Header};

/// The OCI whiteout prefix and opaque marker.
pub const WH_PREFIX: &[u8] = b".wh.";
pub const WH_OPAQUE: &[u8] = b".wh..wh..opq";

/// A file's own xattrs, by the names users see.
type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// What a diff wrote.
#[derive(Debug, Default, Clone, Copy)]
pub struct Summary {
    /// Tar entries (PAX records not counted).
    pub entries: u64,
    /// File data bytes.
    pub bytes: u64,
}

/// Writes the layer of `upper` to `out` as an uncompressed tar. `lowers`
/// (top-down) are the layers the upper was mounted over; without them,
/// redirects and metacopy files cannot be resolved and are refused, and
/// every opaque dir is marked. `progress` sees the entry count grow.
pub fn write_layer<W: Write>(
    upper: &Path,
    lowers: Option<&[PathBuf]>,
    out: W,
    progress: &mut dyn FnMut(u64),
) -> StartResult<Summary> {
    let root = ondisk::open_root(upper).map_err(|e| Error::at("upper dir", upper, e))?;
    let roots = lowers.map(Lowers::open).transpose()?;
    let mut w = Writer {
        tar: tar::Builder::new(out),
        links: HashMap::new(),
        summary: Summary::default(),
        progress,
        upper,
        roots,
    };
    let lower = w.roots.as_ref().map(|l| l.roots.clone());
    w.upper_dir(&root, b"", lower.as_ref(), false)?;
    w.tar
        .finish()
        .map_err(|e| Error::because("writing the layer", e))?;
    Ok(w.summary)
}

struct Writer<'a, W: Write> {
    tar: tar::Builder<W>,
    /// The first path written of each multiply-linked file, by dev:ino.
    links: HashMap<(u64, u64), Vec<u8>>,
    summary: Summary,
    progress: &'a mut dyn FnMut(u64),
    upper: &'a Path,
    /// The lower layers, when given.
    roots: Option<Lowers>,
}

/// A reader that fails unless it gives exactly `left` bytes: a file that
/// changes size while it is read must not make a corrupt archive.
struct Exact<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let max = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..max])?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the file shrank while it was read",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// One PAX record: `LEN key=value\n`, LEN counting itself.
fn pax_record(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    let body = key.len() + value.len() + 3;
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    out.extend_from_slice(format!("{len} {key}=").as_bytes());
    out.extend_from_slice(value);
    out.push(b'\n');
}

impl<W: Write> Writer<'_, W> {
    fn fail(&self, path: &[u8], e: impl Into<std::io::Error>) -> Error {
        Error::at("diff", &self.upper.join(show(path)), e)
    }

    fn refuse(&self, path: &[u8], why: &str) -> Error {
        Error::new(format!(
            "diff {}: {why}",
            self.upper.join(show(path)).display()
        ))
    }

    /// One upper dir at `path`. `lower` is what it merges with (None when
    /// no lowers were given); `whole` (inside a renamed dir): nothing below
    /// shows through, so lower entries are written too and whiteouts are
    /// not needed.
    fn upper_dir(
        &mut self,
        fd: &OwnedFd,
        path: &[u8],
        lower: Option<&Stack>,
        whole: bool,
    ) -> StartResult<()> {
        let names = ondisk::sorted_names(fd).map_err(|e| self.fail(path, e))?;
        // In a renamed dir, the lower names the upper does not decide
        // (hold, or hide with a whiteout) are written too, in name order.
        let below = match (whole, lower) {
            (true, Some(s)) => {
                let mut v = s.merged_names().map_err(|e| self.fail(path, e))?;
                v.retain(|n| {
                    let hidden = [WH_PREFIX, n.to_bytes()].concat();
                    names.binary_search(n).is_err()
                        && names
                            .binary_search_by(|u| u.to_bytes().cmp(&hidden))
                            .is_err()
                });
                v
            }
            _ => Vec::new(),
        };
        let mut below = below.into_iter().peekable();
        for name in &names {
            while let Some(b) = below.next_if(|b| b < name) {
                self.lower_entry(
                    lower.expect("whole has lowers"),
                    &b,
                    &join(path, b.to_bytes()),
                )?;
            }
            let n = name.to_bytes();
            let p = join(path, n);
            let st = sys::fstatat(fd.as_fd(), name).map_err(|e| self.fail(&p, e))?;
            let list = ondisk::xattr_list(fd.as_fd(), name).map_err(|e| self.fail(&p, e))?;
            match ondisk::classify(fd.as_fd(), name, &st, Some(&list)) {
                Kind::OpaqueMarker => {}
                Kind::Whiteout => {
                    if !whole {
                        self.whiteout(&join(path, &[WH_PREFIX, n].concat()), &st)?;
                    }
                }
                Kind::Marker(_) => {
                    if !whole {
                        self.whiteout(&p, &st)?;
                    }
                }
                Kind::Dir { opaque, redirect } => {
                    if redirect.is_some() && self.roots.is_none() {
                        return Err(self.refuse(
                            &p,
                            "a renamed dir (redirect xattr): give the lower layers with --lower to resolve it",
                        ));
                    }
                    let here = match lower {
                        Some(s) => s.child(name).map_err(|e| self.fail(&p, e))?,
                        None => Found::Missing,
                    };
                    // Marked opaque in the layer where lowers have the
                    // name (or might: none given).
                    let mark = (opaque || redirect.is_some())
                        && !whole
                        && (lower.is_none() || !matches!(here, Found::Missing));
                    let below = match (&redirect, here) {
                        _ if opaque => Some(Stack::default()),
                        (Some(r), _) => Some(self.redirected(&p, lower, r)?),
                        (None, Found::Dir(s)) => Some(s),
                        (None, _) => lower.map(|_| Stack::default()),
                    };
                    self.entry(fd.as_fd(), name, &p, &st, None, Some(&list))?;
                    if mark {
                        self.opaque_marker(&p, &st)?;
                    }
                    let d = ondisk::open_dir(fd.as_fd(), name).map_err(|e| self.fail(&p, e))?;
                    self.upper_dir(&d, &p, below.as_ref(), whole || redirect.is_some())?;
                }
                Kind::File {
                    metacopy: true,
                    redirect,
                } => {
                    let data = self.metacopy_data(&p, name, lower, redirect.as_ref())?;
                    self.entry(fd.as_fd(), name, &p, &st, Some(data), Some(&list))?;
                }
                Kind::File { .. } | Kind::Other => {
                    self.entry(fd.as_fd(), name, &p, &st, None, Some(&list))?;
                }
            }
        }
        for b in below {
            self.lower_entry(
                lower.expect("whole has lowers"),
                &b,
                &join(path, b.to_bytes()),
            )?;
        }
        Ok(())
    }

    /// The lower dirs a renamed dir's redirect points at.
    fn redirected(&self, p: &[u8], lower: Option<&Stack>, r: &Redirect) -> StartResult<Stack> {
        let (Some(l), Some(parent)) = (&self.roots, lower) else {
            return Ok(Stack::default());
        };
        match l.redirected(parent, r) {
            Ok(Found::Dir(s)) => Ok(s),
            Ok(_) => Ok(Stack::default()),
            Err(e) => Err(self.fail(p, e)),
        }
    }

    /// The lower file (opened for reading) holding a metacopy file's data.
    fn metacopy_data(
        &self,
        p: &[u8],
        name: &CStr,
        lower: Option<&Stack>,
        redirect: Option<&Redirect>,
    ) -> StartResult<OwnedFd> {
        let (Some(l), Some(parent)) = (&self.roots, lower) else {
            return Err(self.refuse(
                p,
                "a metadata-only copy (metacopy xattr): give the lower layers with --lower to read its data",
            ));
        };
        let found = l
            .data_of(parent, name, redirect)
            .map_err(|e| self.fail(p, e))?;
        match found {
            Found::NonDir { dir, name, st } if sys::mode_type(st.st_mode) == libc::S_IFREG => {
                sys::openat(dir.as_fd(), &name, libc::O_RDONLY, 0).map_err(|e| self.fail(p, e))
            }
            _ => Err(self.refuse(
                p,
                "a metadata-only copy whose data is in no lower layer (wrong --lower?)",
            )),
        }
    }

    /// A name the lowers hold, written whole (below a renamed dir).
    fn lower_entry(&mut self, s: &Stack, name: &CStr, p: &[u8]) -> StartResult<()> {
        match s.child(name).map_err(|e| self.fail(p, e))? {
            Found::Missing => Ok(()),
            Found::NonDir { dir, name, st } => self.entry(dir.as_fd(), &name, p, &st, None, None),
            Found::Dir(below) => {
                let top = &below.dirs[0].1;
                let st = sys::fstat(top.as_fd()).map_err(|e| self.fail(p, e))?;
                self.entry(top.as_fd(), c".", p, &st, None, None)?;
                for n in below.merged_names().map_err(|e| self.fail(p, e))? {
                    self.lower_entry(&below, &n, &join(p, n.to_bytes()))?;
                }
                Ok(())
            }
        }
    }

    /// `.wh.NAME` for a whiteout of any form, with the whiteout's owner
    /// and mode (as containers/storage writes it).
    fn whiteout(&mut self, p: &[u8], st: &Stat) -> StartResult<()> {
        let mut h = Header::new_ustar();
        h.set_entry_type(EntryType::Regular);
        h.set_mode(st.st_mode & 0o7777);
        self.ids_and_time(&mut h, st);
        self.append(h, p, None, Vec::new(), std::io::empty())
    }

    /// `DIR/.wh..wh..opq`, with its dir's owner and mode.
    fn opaque_marker(&mut self, dir: &[u8], st: &Stat) -> StartResult<()> {
        let mut h = Header::new_ustar();
        h.set_entry_type(EntryType::Regular);
        h.set_mode(st.st_mode & 0o777);
        self.ids_and_time(&mut h, st);
        self.append(h, &join(dir, WH_OPAQUE), None, Vec::new(), std::io::empty())
    }

    fn ids_and_time(&self, h: &mut Header, st: &Stat) {
        h.set_uid(st.st_uid as u64);
        h.set_gid(st.st_gid as u64);
        h.set_mtime(st.st_mtime.max(0) as u64);
        h.set_size(0);
        // Zeros, not blanks, as other writers fill them for any entry.
        let _ = h.set_device_major(0);
        let _ = h.set_device_minor(0);
    }

    /// One object: `dir/name` with lstat `st`, written as `p`; its data
    /// read from `data` instead when given (a metacopy file).
    fn entry(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &CStr,
        p: &[u8],
        st: &Stat,
        data: Option<OwnedFd>,
        list: Option<&[u8]>,
    ) -> StartResult<()> {
        let mut st = *st;
        let (xattrs, over) = self.xattrs(dir, name, p, list)?;
        if let Some(o) = over {
            o.apply(&mut st);
        }
        let mut pax = Vec::new();
        for (k, v) in &xattrs {
            let mut key = b"SCHILY.xattr.".to_vec();
            key.extend_from_slice(k);
            pax_record(&mut pax, &String::from_utf8_lossy(&key), v);
        }
        let mut h = Header::new_ustar();
        h.set_mode(st.st_mode & 0o7777);
        self.ids_and_time(&mut h, &st);
        let kind = sys::mode_type(st.st_mode);
        match kind {
            libc::S_IFDIR => {
                h.set_entry_type(EntryType::Directory);
                let mut dp = p.to_vec();
                dp.push(b'/');
                return self.append(h, &dp, None, pax, std::io::empty());
            }
            libc::S_IFLNK => {
                h.set_entry_type(EntryType::Symlink);
                let target = sys::readlinkat(dir, name).map_err(|e| self.fail(p, e))?;
                use std::os::unix::ffi::OsStrExt;
                return self.append(h, p, Some(target.as_bytes()), pax, std::io::empty());
            }
            libc::S_IFCHR | libc::S_IFBLK => {
                h.set_entry_type(if kind == libc::S_IFCHR {
                    EntryType::Char
                } else {
                    EntryType::Block
                });
                let _ = h.set_device_major(libc::major(st.st_rdev));
                let _ = h.set_device_minor(libc::minor(st.st_rdev));
                return self.append(h, p, None, pax, std::io::empty());
            }
            libc::S_IFIFO => {
                h.set_entry_type(EntryType::Fifo);
                return self.append(h, p, None, pax, std::io::empty());
            }
            libc::S_IFREG => {}
            _ => {
                // As tar and containers/storage: a socket cannot be stored.
                log::warn!("diff: {}: a socket, left out of the layer", show(p));
                return Ok(());
            }
        }
        if st.st_nlink > 1 {
            let key = (st.st_dev, st.st_ino);
            if let Some(first) = self.links.get(&key).cloned() {
                h.set_entry_type(EntryType::Link);
                return self.append(h, p, Some(&first), pax, std::io::empty());
            }
            self.links.insert(key, p.to_vec());
        }
        h.set_entry_type(EntryType::Regular);
        let size = st.st_size.max(0) as u64;
        h.set_size(size);
        let fd = match data {
            Some(fd) => fd,
            None => sys::openat(dir, name, libc::O_RDONLY, 0).map_err(|e| self.fail(p, e))?,
        };
        let reader = Exact {
            inner: std::fs::File::from(fd),
            left: size,
        };
        self.summary.bytes += size;
        self.append(h, p, None, pax, reader)
    }

    /// The file's own xattrs, sorted, and its override, if any.
    fn xattrs(
        &self,
        dir: BorrowedFd<'_>,
        name: &CStr,
        p: &[u8],
        list: Option<&[u8]>,
    ) -> StartResult<(Xattrs, Option<OverrideStat>)> {
        let list: std::borrow::Cow<'_, [u8]> = match list {
            Some(l) => l.into(),
            None => ondisk::xattr_list(dir, name)
                .map_err(|e| self.fail(p, e))?
                .into(),
        };
        let mut out = Vec::new();
        let mut over = None;
        for n in list.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            let shown = match ondisk::classify_xattr(n) {
                XattrName::Private => {
                    if over.is_none() && override_stat::NAMES.iter().any(|o| o.to_bytes() == n) {
                        let c = CString::new(n).map_err(|_| self.refuse(p, "a bad xattr name"))?;
                        over = sys::getxattr_at(dir, name, &c)
                            .ok()
                            .and_then(|v| OverrideStat::parse(&v));
                    }
                    continue;
                }
                XattrName::Escaped(shown) => shown,
                XattrName::Plain => n.to_vec(),
            };
            let c = CString::new(n).map_err(|_| self.refuse(p, "a bad xattr name"))?;
            match sys::getxattr_at(dir, name, &c) {
                Ok(v) => out.push((shown, v)),
                // Gone since the listing, or not ours to read.
                Err(e) if matches!(e.raw(), libc::ENODATA | libc::EPERM | libc::EACCES) => {}
                Err(e) => return Err(self.fail(p, e)),
            }
        }
        out.sort();
        Ok((out, over))
    }

    /// Appends one entry: a PAX header first when it has xattrs, or a
    /// name or link target too long for ustar.
    fn append(
        &mut self,
        mut h: Header,
        p: &[u8],
        link: Option<&[u8]>,
        mut pax: Vec<u8>,
        data: impl Read,
    ) -> StartResult<()> {
        use std::os::unix::ffi::OsStrExt;
        let path = Path::new(std::ffi::OsStr::from_bytes(p));
        if h.set_path(path).is_err() {
            pax_record(&mut pax, "path", p);
            let cut = &p[p.len().saturating_sub(99)..];
            h.set_path(Path::new(std::ffi::OsStr::from_bytes(cut)))
                .map_err(|e| self.fail(p, e))?;
        }
        if let Some(t) = link {
            if h.set_link_name_literal(t).is_err() {
                pax_record(&mut pax, "linkpath", t);
            }
        }
        if !pax.is_empty() {
            let mut x = Header::new_ustar();
            x.set_entry_type(EntryType::XHeader);
            x.set_path("PaxHeader").map_err(|e| self.fail(p, e))?;
            x.set_mode(0o644);
            x.set_size(pax.len() as u64);
            x.set_mtime(0);
            x.set_cksum();
            self.tar
                .append(&x, pax.as_slice())
                .map_err(|e| self.fail(p, e))?;
        }
        h.set_cksum();
        self.tar.append(&h, data).map_err(|e| self.fail(p, e))?;
        self.summary.entries += 1;
        (self.progress)(self.summary.entries);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_lengths() {
        let mut v = Vec::new();
        pax_record(&mut v, "path", b"a");
        assert_eq!(v, b"9 path=a\n");
        // Where the length's own digits push it over a power of ten.
        let mut v = Vec::new();
        pax_record(&mut v, "k", &[b'x'; 94]);
        assert_eq!(v.len(), 101);
        assert!(v.starts_with(b"101 k="));
    }
}
