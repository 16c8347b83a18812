//! `rovl apply`: an OCI image-spec layer (tar, gzip or zstd) extracted into
//! a dir in the kernel's overlay format, so that a stack of pulled layers
//! mounts with rovl or the kernel: `.wh.NAME` becomes a 0/0 device (or the
//! kernel's xattr whiteout where mknod is refused), `.wh..wh..opq` the
//! opaque xattr. Names users gave in the overlay xattr namespace are stored
//! escaped, so a layer cannot plant overlay markers.
//!
//! Nothing outside the target dir is ever written: the layer is extracted
//! into a fresh dir beside it and renamed into place only when every entry
//! went in; every path is walked one component at a time from that dir
//! without following symlinks; `..`, absolute names, hard links out of the
//! layer, 0/0 devices (a whiteout in disguise) and, unless allowed, other
//! device nodes are refused with the entry's name.

use crate::error::{Error, StartResult};
use crate::ondisk;
use crate::sys;
use crate::whiteout;
use crate::workdir::{lstat_at, remove_entry};
use std::ffi::{CStr, CString};
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use tar::EntryType;

#[derive(Debug, Clone, Copy, Default)]
pub struct ApplyOptions {
    /// Write `user.overlay.*` markers (an unprivileged or `userxattr`
    /// mount), instead of `trusted.overlay.*`.
    pub userxattr: bool,
    /// Create device nodes the layer holds (refused by default).
    pub allow_devices: bool,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct ApplySummary {
    pub entries: u64,
    pub whiteouts: u64,
    pub opaque_dirs: u64,
    pub bytes: u64,
}

/// The compressions a layer may come in, by magic number.
fn decompress<'a, R: Read + 'a>(input: R) -> std::io::Result<Box<dyn Read + 'a>> {
    let mut r = BufReader::with_capacity(256 * 1024, input);
    let head = r.fill_buf()?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(r))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(r)?)
    } else {
        Box::new(r)
    })
}

/// Extracts the layer read from `input` into `dir`, which must be missing
/// or empty. On any error nothing is left behind.
pub fn apply_layer<R: Read>(
    input: R,
    dir: &Path,
    opts: &ApplyOptions,
    progress: &mut dyn FnMut(u64),
) -> StartResult<ApplySummary> {
    let name = dir
        .file_name()
        .ok_or_else(|| Error::new(format!("apply: {}: give a dir to create", dir.display())))?;
    let parent_path = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let parent = sys::open_dir_path(parent_path).map_err(|e| Error::at("apply", parent_path, e))?;
    let cname = sys::cstr(name).map_err(|e| Error::at("apply", dir, e))?;
    let exists = match lstat_at(parent.as_fd(), &cname).map_err(|e| Error::at("apply", dir, e))? {
        None => false,
        Some(st) if sys::is_dir(st.st_mode) => {
            let d =
                ondisk::open_dir(parent.as_fd(), &cname).map_err(|e| Error::at("apply", dir, e))?;
            if !sys::read_dir_all(&d)
                .map_err(|e| Error::at("apply", dir, e))?
                .is_empty()
            {
                return Err(Error::new(format!(
                    "apply: {} is not empty: apply a layer into a new dir",
                    dir.display()
                )));
            }
            true
        }
        Some(_) => {
            return Err(Error::new(format!(
                "apply: {} exists and is not a dir",
                dir.display()
            )))
        }
    };
    let mut stage_name = b".".to_vec();
    stage_name.extend_from_slice(cname.to_bytes());
    stage_name.extend_from_slice(format!(".rovl-apply-{}", std::process::id()).as_bytes());
    let stage_name = CString::new(stage_name).map_err(|_| Error::new("apply: bad dir name"))?;
    let parent_st = sys::fstat(parent.as_fd()).map_err(|e| Error::at("apply", parent_path, e))?;
    sys::mkdirat(parent.as_fd(), &stage_name, 0o700)
        .map_err(|e| Error::at("apply: cannot create a dir beside", dir, e))?;
    let stage = Stage {
        parent: &parent,
        name: &stage_name,
        times: sys::stat_times(&parent_st),
        done: false,
    };
    let root =
        ondisk::open_dir(parent.as_fd(), &stage_name).map_err(|e| Error::at("apply", dir, e))?;
    let mut x = Extractor {
        root: Arc::new(root),
        opts: *opts,
        summary: ApplySummary::default(),
        cached: None,
        dir_times: Vec::new(),
        names: Names::new(opts.userxattr),
        root_meta: None,
    };
    let input = decompress(input).map_err(|e| Error::because("apply: reading the layer", e))?;
    x.extract(input, progress)?;
    x.finish()?;
    let Extractor { summary, root, .. } = x;
    drop(root);
    if exists {
        sys::renameat2(
            parent.as_fd(),
            &stage_name,
            parent.as_fd(),
            &cname,
            libc::RENAME_EXCHANGE,
        )
        .map_err(|e| Error::at("apply: cannot move the layer into", dir, e))?;
        // The empty dir it replaced now has the stage's name.
        sys::unlinkat(parent.as_fd(), &stage_name, libc::AT_REMOVEDIR)
            .map_err(|e| Error::at("apply", dir, e))?;
    } else {
        sys::renameat2(
            parent.as_fd(),
            &stage_name,
            parent.as_fd(),
            &cname,
            libc::RENAME_NOREPLACE,
        )
        .map_err(|e| Error::at("apply: cannot move the layer into", dir, e))?;
    }
    let mut stage = stage;
    stage.done = true;
    Ok(summary)
}

/// The dir a layer is extracted into, removed unless it was moved into
/// place; its parent then gets its times back, as if nothing happened.
struct Stage<'a> {
    parent: &'a OwnedFd,
    name: &'a CStr,
    times: [libc::timespec; 2],
    done: bool,
}

impl Drop for Stage<'_> {
    fn drop(&mut self) {
        if !self.done {
            match remove_entry(self.parent.as_fd(), self.name) {
                Ok(()) => {
                    let _ = sys::futimens_any(self.parent.as_fd(), &self.times);
                }
                Err(e) => log::warn!(
                    "apply: could not remove the partial layer {}: {e}",
                    self.name.to_string_lossy()
                ),
            }
        }
    }
}

/// The marker xattrs written.
struct Names {
    opaque: CString,
    whiteout: CString,
}

impl Names {
    fn new(user: bool) -> Names {
        let [t, u] = ondisk::overlay_names("opaque");
        let [wt, wu] = ondisk::overlay_names("whiteout");
        if user {
            Names {
                opaque: u,
                whiteout: wu,
            }
        } else {
            Names {
                opaque: t,
                whiteout: wt,
            }
        }
    }
}

/// An entry's name, split into checked components.
struct EntryPath {
    comps: Vec<CString>,
    shown: String,
}

/// Splits a name from the layer; `..`, absolute names, NULs and names too
/// long for a filesystem are refused.
fn parse_path(raw: &[u8]) -> Result<EntryPath, String> {
    let shown = String::from_utf8_lossy(raw).into_owned();
    if raw.starts_with(b"/") {
        return Err(format!("entry '{shown}': an absolute name"));
    }
    if raw.len() > libc::PATH_MAX as usize {
        return Err(format!("entry '{shown}': a name longer than PATH_MAX"));
    }
    let mut comps = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(format!("entry '{shown}': '..' in the name")),
            c if c.len() > crate::overlay::NAME_MAX => {
                return Err(format!(
                    "entry '{shown}': a component longer than 255 bytes"
                ))
            }
            c => comps
                .push(CString::new(c).map_err(|_| format!("entry '{shown}': a NUL in the name"))?),
        }
    }
    Ok(EntryPath { comps, shown })
}

struct Extractor {
    root: Arc<OwnedFd>,
    opts: ApplyOptions,
    summary: ApplySummary,
    /// The last parent dir walked to, by its components.
    cached: Option<(Vec<CString>, Arc<OwnedFd>)>,
    /// Dirs whose mtime is set last (their entries change it), by path.
    dir_times: Vec<(Vec<CString>, i64)>,
    names: Names,
    /// The layer's own root entry (`./`): owner, mode, mtime.
    root_meta: Option<(u32, u32, u32, i64)>,
}

impl Extractor {
    fn extract(
        &mut self,
        input: Box<dyn Read + '_>,
        progress: &mut dyn FnMut(u64),
    ) -> StartResult<()> {
        let mut ar = tar::Archive::new(input);
        let entries = ar.entries().map_err(|e| not_a_layer(0, e))?;
        for e in entries {
            let mut e = e.map_err(|e| not_a_layer(self.summary.entries, e))?;
            let raw = e.path_bytes().into_owned();
            let path = parse_path(&raw).map_err(|m| Error::new(format!("apply: {m}")))?;
            self.entry(&mut e, &path).map_err(|m| match m {
                Failure::Refused(m) => Error::new(format!("apply: entry '{}': {m}", path.shown)),
                Failure::Io(err) => Error::because(&format!("apply: entry '{}'", path.shown), err),
            })?;
            self.summary.entries += 1;
            progress(self.summary.entries);
        }
        Ok(())
    }

    /// The dir holding `comps`' last component, walked to from the root
    /// without following symlinks; missing dirs are made (0755, as
    /// engines do for parents a layer leaves out).
    fn parent_of(&mut self, comps: &[CString]) -> Result<Arc<OwnedFd>, Failure> {
        let parents = &comps[..comps.len() - 1];
        if parents.is_empty() {
            return Ok(self.root.clone());
        }
        if !matches!(&self.cached, Some((p, _)) if p.as_slice() == parents) {
            let mut cur = self.root.try_clone()?;
            for c in parents {
                cur = match ondisk::open_dir(cur.as_fd(), c) {
                    Ok(d) => d,
                    Err(e) if e.raw() == libc::ENOENT => {
                        sys::mkdirat(cur.as_fd(), c, 0o755)?;
                        ondisk::open_dir(cur.as_fd(), c)?
                    }
                    Err(e)
                        if e.raw() == libc::ENOTDIR
                            && self.is_whiteout(cur.as_fd(), c)? =>
                    {
                        // Whited out earlier in this layer, then filled:
                        // a new dir that hides the lower one.
                        sys::unlinkat(cur.as_fd(), c, 0)?;
                        sys::mkdirat(cur.as_fd(), c, 0o755)?;
                        let d = ondisk::open_dir(cur.as_fd(), c)?;
                        sys::setxattr(d.as_fd(), &self.names.opaque, b"y", 0)?;
                        d
                    }
                    Err(e) if matches!(e.raw(), libc::ELOOP | libc::ENOTDIR) => {
                        return Err(Failure::Refused(format!(
                            "'{}' in its path is not a dir (a symlink or file): refusing to write through it",
                            c.to_string_lossy()
                        )))
                    }
                    Err(e) => return Err(e.into()),
                };
            }
            self.cached = Some((parents.to_vec(), Arc::new(cur)));
        }
        Ok(self
            .cached
            .as_ref()
            .map(|(_, fd)| fd.clone())
            .expect("just cached"))
    }

    fn entry<R: Read>(
        &mut self,
        e: &mut tar::Entry<'_, R>,
        path: &EntryPath,
    ) -> Result<(), Failure> {
        let h = e.header();
        let kind = h.entry_type();
        if matches!(kind, EntryType::XGlobalHeader) {
            return Ok(());
        }
        let uid = h.uid()? as u32;
        let gid = h.gid()? as u32;
        let mode = h.mode()? & 0o7777;
        let mtime = h.mtime()? as i64;
        let Some(base) = path.comps.last() else {
            if !kind.is_dir() {
                return Err(Failure::Refused("the layer's root is not a dir".into()));
            }
            self.root_meta = Some((uid, gid, mode, mtime));
            return Ok(());
        };
        let base = base.clone();
        let b = base.to_bytes();
        // OCI whiteouts.
        if b == crate::diff::WH_OPAQUE {
            let pfd = self.parent_of(&path.comps)?;
            sys::setxattr(pfd.as_fd(), &self.names.opaque, b"y", 0)?;
            self.summary.opaque_dirs += 1;
            return Ok(());
        }
        if let Some(hidden) = b.strip_prefix(crate::diff::WH_PREFIX) {
            if hidden.starts_with(crate::diff::WH_PREFIX) {
                // AUFS metadata (`.wh..wh.plnk`, ...): not part of the tree.
                return Ok(());
            }
            let hidden = CString::new(hidden).expect("from a CString");
            let pfd = self.parent_of(&path.comps)?;
            if lstat_at(pfd.as_fd(), &hidden)?.is_some() {
                // The layer has the name too: it hides the lower one already.
                return Ok(());
            }
            if whiteout::make_whiteout(pfd.as_fd(), &hidden, &self.names.whiteout)? {
                whiteout::mark_xwhiteouts(pfd.as_fd(), &self.names.opaque)?;
            }
            chown(pfd.as_fd(), &hidden, uid, gid)?;
            self.summary.whiteouts += 1;
            return Ok(());
        }
        let xattrs: Vec<(CString, Vec<u8>)> = match e.pax_extensions()? {
            None => Vec::new(),
            Some(exts) => {
                let mut v = Vec::new();
                for x in exts {
                    let x = x?;
                    if let Some(n) = x.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                        let n = CString::new(ondisk::escape_xattr(n))
                            .map_err(|_| Failure::Refused("a NUL in an xattr name".into()))?;
                        v.push((n, x.value_bytes().to_vec()));
                    }
                }
                v
            }
        };
        let link = e.link_name_bytes().map(|l| l.into_owned());
        let size = e.header().size()?;
        let (devmaj, devmin) = if matches!(kind, EntryType::Char | EntryType::Block) {
            (
                e.header().device_major()?.unwrap_or(0),
                e.header().device_minor()?.unwrap_or(0),
            )
        } else {
            (0, 0)
        };
        let pfd = self.parent_of(&path.comps)?;
        let pfd = pfd.as_fd();
        // A later entry replaces an earlier one of the same name (a dir
        // stays, taking the new metadata). A dir in place of this layer's
        // whiteout hides the lower one: opaque.
        let mut opaque = false;
        if let Some(st) = lstat_at(pfd, &base)? {
            if !(sys::is_dir(st.st_mode) && kind.is_dir()) {
                opaque = kind.is_dir() && self.is_whiteout(pfd, &base)?;
                remove_entry(pfd, &base)?;
                self.cached = None;
            }
        }
        match kind {
            EntryType::Regular | EntryType::Continuous => {
                let fd = sys::openat(
                    pfd,
                    &base,
                    libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
                    0o600,
                )?;
                let mut f = std::fs::File::from(fd);
                let n = std::io::copy(e, &mut f)?;
                if n != size {
                    return Err(Failure::Refused("the layer ends inside this file".into()));
                }
                self.summary.bytes += n;
            }
            EntryType::Directory => {
                if lstat_at(pfd, &base)?.is_none() {
                    sys::mkdirat(pfd, &base, 0o700)?;
                }
                if opaque {
                    let d = ondisk::open_dir(pfd, &base)?;
                    sys::setxattr(d.as_fd(), &self.names.opaque, b"y", 0)?;
                }
                let mut comps = path.comps.clone();
                comps.shrink_to_fit();
                self.dir_times.push((comps, mtime));
            }
            EntryType::Symlink => {
                let t = link.ok_or_else(|| Failure::Refused("a symlink with no target".into()))?;
                let t = CString::new(t)
                    .map_err(|_| Failure::Refused("a NUL in a symlink target".into()))?;
                sys::symlinkat(&t, pfd, &base)?;
            }
            EntryType::Link => {
                let t =
                    link.ok_or_else(|| Failure::Refused("a hard link with no target".into()))?;
                let target = parse_path(&t)
                    .map_err(|m| Failure::Refused(format!("a hard link out of the layer ({m})")))?;
                let (tdir, tname) = self.existing_parent(&target)?;
                match sys::fstatat(tdir.as_fd(), &tname) {
                    Ok(st) if sys::is_dir(st.st_mode) => {
                        return Err(Failure::Refused(format!(
                            "a hard link to the dir '{}'",
                            target.shown
                        )))
                    }
                    Ok(_) => {}
                    Err(_) => {
                        return Err(Failure::Refused(format!(
                            "a hard link to '{}', which the layer does not hold before it",
                            target.shown
                        )))
                    }
                }
                sys::linkat(tdir.as_fd(), &tname, pfd, &base)?;
                // A link shares its target's metadata: set nothing more.
                return Ok(());
            }
            EntryType::Char | EntryType::Block => {
                let is_char = kind == EntryType::Char;
                if is_char && devmaj == 0 && devmin == 0 {
                    return Err(Failure::Refused(
                        "a 0/0 character device is an overlay whiteout: a layer says .wh.NAME instead".into(),
                    ));
                }
                if !self.opts.allow_devices {
                    return Err(Failure::Refused(format!(
                        "a device node ({} {devmaj}:{devmin}): pass --allow-devices to create it",
                        if is_char { "char" } else { "block" }
                    )));
                }
                let t = if is_char {
                    libc::S_IFCHR
                } else {
                    libc::S_IFBLK
                };
                sys::mknodat(pfd, &base, t | 0o600, libc::makedev(devmaj, devmin))?;
            }
            EntryType::Fifo => sys::mknodat(pfd, &base, libc::S_IFIFO | 0o600, 0)?,
            other => {
                return Err(Failure::Refused(format!(
                    "an entry of type '{}' (not supported)",
                    other.as_byte() as char
                )))
            }
        }
        let fd = sys::openat(pfd, &base, libc::O_PATH, 0)?;
        chown(pfd, &base, uid, gid)?;
        if !kind.is_symlink() {
            sys::fchmod_any(fd.as_fd(), mode)?;
        }
        for (n, v) in &xattrs {
            sys::setxattr(fd.as_fd(), n, v, 0).map_err(|err| {
                Failure::Refused(format!("cannot set xattr {}: {err}", n.to_string_lossy()))
            })?;
        }
        if !kind.is_dir() {
            let t = libc::timespec {
                tv_sec: mtime,
                tv_nsec: 0,
            };
            sys::utimensat(pfd, &base, &[t, t])?;
        }
        Ok(())
    }

    /// Whether `dir/name` is a whiteout this extraction made.
    fn is_whiteout(&self, dir: BorrowedFd<'_>, name: &CStr) -> Result<bool, Failure> {
        let st = sys::fstatat(dir, name)?;
        Ok(sys::is_whiteout(&st)
            || (sys::mode_type(st.st_mode) == libc::S_IFREG
                && st.st_size == 0
                && whiteout::is_xattr_whiteout(
                    dir,
                    name,
                    std::slice::from_ref(&self.names.whiteout),
                )))
    }

    /// The dir holding an existing entry of the layer, and its last name.
    fn existing_parent(&self, p: &EntryPath) -> Result<(OwnedFd, CString), Failure> {
        let Some((last, parents)) = p.comps.split_last() else {
            return Err(Failure::Refused("a hard link to the layer's root".into()));
        };
        let mut cur = self.root.try_clone()?;
        for c in parents {
            cur = ondisk::open_dir(cur.as_fd(), c).map_err(|_| {
                Failure::Refused(format!(
                    "a hard link to '{}', which is not a file of the layer",
                    p.shown
                ))
            })?;
        }
        Ok((cur, last.clone()))
    }

    /// Dir mtimes (deepest first: setting one changes no other), and the
    /// root's metadata.
    fn finish(&mut self) -> StartResult<()> {
        self.cached = None;
        let fail = |e: sys::Errno| Error::because("apply: setting dir times", e);
        let mut dirs = std::mem::take(&mut self.dir_times);
        dirs.sort_by_key(|(c, _)| std::cmp::Reverse(c.len()));
        for (comps, mtime) in dirs {
            let Some((last, parents)) = comps.split_last() else {
                continue;
            };
            let mut cur = self.root.try_clone().map_err(|e| fail(e.into()))?;
            for c in parents {
                cur = ondisk::open_dir(cur.as_fd(), c).map_err(fail)?;
            }
            let t = libc::timespec {
                tv_sec: mtime,
                tv_nsec: 0,
            };
            sys::utimensat(cur.as_fd(), last, &[t, t]).map_err(fail)?;
        }
        if let Some((uid, gid, mode, mtime)) = self.root_meta {
            let fail = |e: sys::Errno| Error::because("apply: the layer's root", e);
            sys::fchown_any(self.root.as_fd(), uid, gid)
                .or_else(|e| own_ids_or(e, uid, gid))
                .map_err(fail)?;
            sys::fchmod_any(self.root.as_fd(), mode).map_err(fail)?;
            let t = libc::timespec {
                tv_sec: mtime,
                tv_nsec: 0,
            };
            sys::futimens_any(self.root.as_fd(), &[t, t]).map_err(fail)?;
        } else {
            sys::fchmod_any(self.root.as_fd(), 0o755)
                .map_err(|e| Error::because("apply: the layer's root", e))?;
        }
        Ok(())
    }
}

/// A layer that is not a tar (or is cut short), in one printable line:
/// the tar crate's message may quote raw header bytes.
fn not_a_layer(entries: u64, e: std::io::Error) -> Error {
    let msg = e.to_string();
    let msg = msg.split([':', '\n']).next().unwrap_or_default();
    let msg = msg.split(" when ").next().unwrap_or_default();
    let mut clean: String = msg
        .chars()
        .map(|c| {
            if c.is_control() || c == '\u{fffd}' {
                '?'
            } else {
                c
            }
        })
        .collect();
    if clean.len() > 80 {
        let cut = (0..=80)
            .rev()
            .find(|&i| clean.is_char_boundary(i))
            .unwrap_or(0);
        clean.truncate(cut);
    }
    Error::new(format!(
        "apply: the layer is not a valid tar (gzip or zstd) after {entries} entries: {clean}"
    ))
}

/// Why an entry was not extracted.
enum Failure {
    /// The layer asks for something refused, or is malformed.
    Refused(String),
    Io(std::io::Error),
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Failure {
        Failure::Io(e)
    }
}

impl From<sys::Errno> for Failure {
    fn from(e: sys::Errno) -> Failure {
        Failure::Io(e.into())
    }
}

/// A chown refused to an unprivileged user is fine when it would change
/// nothing.
fn own_ids_or(e: sys::Errno, uid: u32, gid: u32) -> sys::Result<()> {
    if e.raw() == libc::EPERM && uid == sys::euid() && gid == sys::gid() {
        Ok(())
    } else {
        Err(e)
    }
}

fn chown(dir: BorrowedFd<'_>, name: &CStr, uid: u32, gid: u32) -> Result<(), Failure> {
    sys::fchownat(dir, name, uid, gid)
        .or_else(|e| own_ids_or(e, uid, gid))
        .map_err(|e| {
            if e.raw() == libc::EPERM {
                Failure::Refused(format!(
                    "cannot give it owner {uid}:{gid}: run as root (or as root in a user namespace, e.g. podman unshare)"
                ))
            } else {
                e.into()
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_paths() {
        let ok = |s: &str| {
            parse_path(s.as_bytes()).map(|p| {
                p.comps
                    .iter()
                    .map(|c| c.to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(ok("./a/b/").unwrap(), ["a", "b"]);
        assert_eq!(ok("a//./b").unwrap(), ["a", "b"]);
        assert!(ok("./").unwrap().is_empty());
        assert!(ok("/etc/passwd").is_err());
        assert!(ok("a/../../x").is_err());
        assert!(ok("..").is_err());
        assert!(ok(&"x".repeat(256)).is_err());
    }
}
