//! Overlay dirs read offline, with no mount (for `diff` and `fsck`): what
//! an entry of a layer is, as the kernel's lookup reads it, in every format
//! `whiteout` reads; which xattrs are the overlay's own; and the lower dirs
//! merged at a path.
//!
//! Offline there is no mount option to tell which xattr namespace a dir was
//! written with, so both `trusted.overlay.` and `user.overlay.` are read,
//! as rovl reads lower layers.

use crate::error::Result;
use crate::inode::Redirect;
use crate::sys::{self, Stat};
use crate::whiteout;
use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

/// The overlay's xattr namespaces, privileged first.
pub const OVERLAY_PREFIXES: [&[u8]; 2] = [b"trusted.overlay.", b"user.overlay."];

/// Other tools' private xattrs: fuse-overlayfs' and containers/storage's.
const FOREIGN_PRIVATE: [&[u8]; 3] = [
    b"user.fuseoverlayfs.",
    b"user.containers.override_stat",
    b"security.containers.override_stat",
];

/// `overlay.NAME` under both prefixes.
pub fn overlay_names(suffix: &str) -> [CString; 2] {
    OVERLAY_PREFIXES.map(|p| {
        let mut v = p.to_vec();
        v.extend_from_slice(suffix.as_bytes());
        CString::new(v).expect("no NUL")
    })
}

/// What an xattr name found in a layer is.
#[derive(Debug, PartialEq, Eq)]
pub enum XattrName {
    /// The overlay's (or another overlay tool's) own: not the file's.
    Private,
    /// A user's name in the overlay namespace, stored escaped
    /// (`trusted.overlay.overlay.X`): the name the user set.
    Escaped(Vec<u8>),
    /// Any other name: the file's own.
    Plain,
}

pub fn classify_xattr(name: &[u8]) -> XattrName {
    for p in OVERLAY_PREFIXES {
        if let Some(rest) = name.strip_prefix(p) {
            return match rest.strip_prefix(b"overlay.") {
                Some(r) if !r.is_empty() => {
                    let mut v = p.to_vec();
                    v.extend_from_slice(r);
                    XattrName::Escaped(v)
                }
                _ => XattrName::Private,
            };
        }
    }
    if FOREIGN_PRIVATE.iter().any(|p| name.starts_with(p)) {
        return XattrName::Private;
    }
    XattrName::Plain
}

/// The name under which a file's own xattr is stored in a layer: names in
/// the overlay namespace escaped, as the kernel stores what users set.
pub fn escape_xattr(name: &[u8]) -> Vec<u8> {
    for p in OVERLAY_PREFIXES {
        if let Some(rest) = name.strip_prefix(p) {
            let mut v = p.to_vec();
            v.extend_from_slice(b"overlay.");
            v.extend_from_slice(rest);
            return v;
        }
    }
    name.to_vec()
}

/// What one entry of a layer dir is.
#[derive(Debug)]
pub enum Kind {
    /// A whiteout: a 0/0 device, or the kernel's xattr whiteout.
    Whiteout,
    /// An AUFS marker `.wh.NAME`: NAME is whited out.
    Marker(Vec<u8>),
    /// An AUFS opaque marker (`.wh..wh..opq`): its dir is opaque.
    OpaqueMarker,
    Dir {
        opaque: bool,
        redirect: Option<Redirect>,
    },
    /// A regular file; `metacopy` when its data is in a lower layer,
    /// reached by `redirect` when it moved.
    File {
        metacopy: bool,
        redirect: Option<Redirect>,
    },
    /// Symlinks, devices, fifos, sockets.
    Other,
}

/// The NUL-separated xattr names of `dir/name` (none where the
/// filesystem has no xattrs).
pub fn xattr_list(dir: BorrowedFd<'_>, name: &CStr) -> Result<Vec<u8>> {
    match sys::listxattr_at(dir, name) {
        Err(e) if e.raw() == libc::EOPNOTSUPP => Ok(Vec::new()),
        r => r,
    }
}

/// Reads what `dir/name` (with `st`, its lstat) is; `list`, its xattr
/// names, when the caller has them already.
pub fn classify(dir: BorrowedFd<'_>, name: &CStr, st: &Stat, list: Option<&[u8]>) -> Kind {
    let list = || -> std::borrow::Cow<'_, [u8]> {
        match list {
            Some(l) => l.into(),
            None => xattr_list(dir, name).unwrap_or_default().into(),
        }
    };
    let n = name.to_bytes();
    if whiteout::is_wh_name(n) && !sys::is_dir(st.st_mode) {
        return match whiteout::hidden_by(n) {
            Some(h) => Kind::Marker(h.to_vec()),
            None => Kind::OpaqueMarker,
        };
    }
    match sys::mode_type(st.st_mode) {
        libc::S_IFDIR => {
            let list = list();
            let value = |suffix: &str| -> Option<Vec<u8>> {
                overlay_names(suffix).iter().find_map(|x| {
                    has_name(&list, x.to_bytes())
                        .then(|| sys::getxattr_at(dir, name, x).ok())
                        .flatten()
                })
            };
            let opaque = value("opaque").is_some_and(|v| v == b"y")
                || (has_name(&list, whiteout::FOREIGN_OPAQUE.to_bytes())
                    && matches!(sys::getxattr_at(dir, name, whiteout::FOREIGN_OPAQUE), Ok(v) if v == b"y"))
                || whiteout::has_opaque_marker(dir, name);
            let redirect = value("redirect").and_then(|v| Redirect::parse(&v));
            Kind::Dir { opaque, redirect }
        }
        libc::S_IFREG => {
            let list = list();
            let has = |suffix: &str| {
                overlay_names(suffix)
                    .iter()
                    .any(|x| has_name(&list, x.to_bytes()))
            };
            if st.st_size == 0 && has("whiteout") {
                return Kind::Whiteout;
            }
            let metacopy = has("metacopy");
            let redirect = if metacopy {
                overlay_names("redirect").iter().find_map(|x| {
                    has_name(&list, x.to_bytes())
                        .then(|| sys::getxattr_at(dir, name, x).ok())
                        .flatten()
                        .and_then(|v| Redirect::parse(&v))
                })
            } else {
                None
            };
            Kind::File { metacopy, redirect }
        }
        _ if sys::is_whiteout(st) => Kind::Whiteout,
        _ => Kind::Other,
    }
}

/// Whether a raw `listxattr` list (NUL-separated) holds `name`.
pub(crate) fn has_name(list: &[u8], name: &[u8]) -> bool {
    list.split(|&b| b == 0).any(|n| n == name)
}

/// One directory of a layer, opened for reading.
pub fn open_dir(dir: BorrowedFd<'_>, name: &CStr) -> Result<OwnedFd> {
    sys::openat(dir, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)
}

/// A layer's root, opened for reading by the path given (its symlinks
/// followed, as a mount's option parsing does).
pub fn open_root(path: &std::path::Path) -> Result<OwnedFd> {
    sys::open_path(path, libc::O_RDONLY | libc::O_DIRECTORY)
}

/// The names in a layer dir, sorted bytewise (the order every tool here
/// walks in, so that its output is the same each time).
pub fn sorted_names(dir: &OwnedFd) -> Result<Vec<CString>> {
    let mut names: Vec<CString> = sys::read_dir_all(dir)?
        .into_iter()
        .filter_map(|e| sys::cstr(&e.name).ok())
        .collect();
    names.sort_unstable();
    Ok(names)
}

/// The lower dirs merged at one path, top-down, as the kernel's lookup
/// finds them: a whiteout or a non-directory ends the stack, an opaque dir
/// is its last member, a dir's redirect sends the layers below it to
/// another name (a relative one) or path (an absolute one, from their
/// roots).
#[derive(Default, Clone)]
pub struct Stack {
    /// (lower layer index, dir), top-down.
    pub dirs: Vec<(usize, Arc<OwnedFd>)>,
    /// Every lower layer's root, for absolute redirects.
    roots: Arc<Vec<Arc<OwnedFd>>>,
}

/// What the lower layers hold under a name.
pub enum Found {
    Missing,
    Dir(Stack),
    /// A non-directory, in the layer dir `dir`, under `name` (which a
    /// redirect may have changed).
    NonDir {
        dir: Arc<OwnedFd>,
        name: CString,
        st: Stat,
    },
}

/// Where the layers below are looked up, once a redirect was met.
enum Target {
    Name(CString),
    Path(Vec<CString>),
}

impl Stack {
    /// The roots of lower layers, given top-down.
    pub fn roots(dirs: Vec<OwnedFd>) -> Stack {
        let roots: Vec<Arc<OwnedFd>> = dirs.into_iter().map(Arc::new).collect();
        Stack {
            dirs: roots.iter().cloned().enumerate().collect(),
            roots: Arc::new(roots),
        }
    }

    /// An empty stack below this one (nothing shows through).
    pub fn empty(&self) -> Stack {
        Stack {
            dirs: Vec::new(),
            roots: self.roots.clone(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.dirs.is_empty()
    }

    /// What the stack holds under `name`.
    pub fn child(&self, name: &CStr) -> Result<Found> {
        let mut below = self.empty();
        let mut target = Target::Name(name.to_owned());
        // Layers above this index were looked at already.
        let mut next = 0;
        loop {
            // The next layer's dir holding the target, and the target's
            // last name there.
            let (layer, dir, last) = match &target {
                Target::Name(n) => match self.dirs.iter().find(|(l, _)| *l >= next) {
                    Some((l, d)) => (*l, d.clone(), n.clone()),
                    None => break,
                },
                Target::Path(comps) => {
                    let l = next;
                    if l >= self.roots.len() {
                        break;
                    }
                    let Some((last, parents)) = comps.split_last() else {
                        break;
                    };
                    match walk(&self.roots[l], parents)? {
                        Walk::Dir(d) => (l, Arc::new(d), last.clone()),
                        Walk::Missing => {
                            next = l + 1;
                            continue;
                        }
                        Walk::Stop => break,
                    }
                }
            };
            next = layer + 1;
            let st = match sys::fstatat(dir.as_fd(), &last) {
                Ok(st) => st,
                Err(e) if e.is_missing() => {
                    if whiteout::marker_for(&last)
                        .is_some_and(|m| sys::fstatat(dir.as_fd(), &m).is_ok())
                    {
                        break;
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            match classify(dir.as_fd(), &last, &st, None) {
                Kind::Whiteout | Kind::Marker(_) | Kind::OpaqueMarker => break,
                Kind::Dir { opaque, redirect } => {
                    below
                        .dirs
                        .push((layer, Arc::new(open_dir(dir.as_fd(), &last)?)));
                    if opaque {
                        break;
                    }
                    match redirect {
                        Some(r @ Redirect::Abs(_)) => target = Target::Path(redirect_comps(&r)),
                        Some(Redirect::Rel(n)) => {
                            use std::os::unix::ffi::OsStrExt;
                            let n =
                                CString::new(n.as_bytes()).map_err(|_| sys::err(libc::EINVAL))?;
                            // A sibling: of the name, or of the path's end.
                            target = match target {
                                Target::Name(_) => Target::Name(n),
                                Target::Path(mut comps) => {
                                    comps.pop();
                                    comps.push(n);
                                    Target::Path(comps)
                                }
                            };
                        }
                        None => {}
                    }
                }
                _ if below.is_empty() => {
                    return Ok(Found::NonDir {
                        dir,
                        name: last,
                        st,
                    });
                }
                _ => break,
            }
        }
        Ok(if below.is_empty() {
            Found::Missing
        } else {
            Found::Dir(below)
        })
    }

    /// What the stack holds at a path of components below it.
    pub fn lookup(&self, comps: &[CString]) -> Result<Found> {
        let Some((last, parents)) = comps.split_last() else {
            return Ok(Found::Dir(self.clone()));
        };
        let mut cur = self.clone();
        for c in parents {
            cur = match cur.child(c)? {
                Found::Dir(s) => s,
                _ => return Ok(Found::Missing),
            };
        }
        cur.child(last)
    }

    /// The names visible in the merged dir, sorted: markers, whiteouts
    /// and what they hide left out.
    pub fn merged_names(&self) -> Result<Vec<CString>> {
        let mut seen = std::collections::BTreeMap::<CString, bool>::new();
        for (_, d) in &self.dirs {
            let mut hidden_here = Vec::new();
            for name in sorted_names(d)? {
                if seen.contains_key(&name) {
                    continue;
                }
                let st = sys::fstatat(d.as_fd(), &name)?;
                match classify(d.as_fd(), &name, &st, None) {
                    Kind::OpaqueMarker => {}
                    Kind::Marker(h) => hidden_here.push(h),
                    Kind::Whiteout => {
                        seen.insert(name, false);
                    }
                    _ => {
                        seen.insert(name, true);
                    }
                }
            }
            // A marker hides its name in the layers below only.
            for h in hidden_here {
                if let Ok(c) = CString::new(h) {
                    seen.entry(c).or_insert(false);
                }
            }
        }
        Ok(seen
            .into_iter()
            .filter(|(_, v)| *v)
            .map(|(k, _)| k)
            .collect())
    }
}

/// A walk down one layer, for an absolute redirect's path.
enum Walk {
    Dir(OwnedFd),
    /// Not in this layer: the next one may have it.
    Missing,
    /// A whiteout or a non-dir on the way: nothing below has it.
    Stop,
}

fn walk(root: &OwnedFd, comps: &[CString]) -> Result<Walk> {
    let mut cur = root.try_clone().map_err(sys::Errno::from)?;
    for c in comps {
        let st = match sys::fstatat(cur.as_fd(), c) {
            Ok(st) => st,
            Err(e) if e.is_missing() => return Ok(Walk::Missing),
            Err(e) => return Err(e),
        };
        match classify(cur.as_fd(), c, &st, None) {
            Kind::Dir { .. } => cur = open_dir(cur.as_fd(), c)?,
            _ => return Ok(Walk::Stop),
        }
    }
    Ok(Walk::Dir(cur))
}

/// A layer path joined with one more name (`dir` empty: the root).
pub fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = dir.to_vec();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// A layer path for a message.
pub fn show(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

/// The lower layers given by path, top-down.
pub struct Lowers {
    pub roots: Stack,
}

impl Lowers {
    pub fn open(paths: &[std::path::PathBuf]) -> crate::error::StartResult<Lowers> {
        let dirs = paths
            .iter()
            .map(|l| open_root(l).map_err(|e| crate::error::Error::at("lower dir", l, e)))
            .collect::<crate::error::StartResult<_>>()?;
        Ok(Lowers {
            roots: Stack::roots(dirs),
        })
    }

    /// What the lowers hold where a redirect points: an absolute one from
    /// the roots, a relative one (a sibling's name) in `parent`, the stack
    /// merged at the redirected object's parent.
    pub fn redirected(&self, parent: &Stack, r: &Redirect) -> Result<Found> {
        let base = match r {
            Redirect::Abs(_) => &self.roots,
            Redirect::Rel(_) => parent,
        };
        base.lookup(&redirect_comps(r))
    }

    /// The lower object a metacopy file's data is in: where its redirect
    /// points, else the same name in `parent`.
    pub fn data_of(
        &self,
        parent: &Stack,
        name: &CStr,
        redirect: Option<&Redirect>,
    ) -> Result<Found> {
        match redirect {
            Some(r) => self.redirected(parent, r),
            None => parent.child(name),
        }
    }
}

/// The components of a redirect: absolute from the layer root, or a
/// sibling's name (relative).
pub fn redirect_comps(r: &Redirect) -> Vec<CString> {
    use std::os::unix::ffi::OsStrExt;
    match r {
        Redirect::Rel(n) => vec![CString::new(n.as_bytes()).unwrap_or_default()],
        Redirect::Abs(c) => c
            .iter()
            .map(|x| CString::new(x.as_bytes()).unwrap_or_default())
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xattr_names() {
        assert_eq!(
            classify_xattr(b"trusted.overlay.opaque"),
            XattrName::Private
        );
        assert_eq!(classify_xattr(b"user.overlay.redirect"), XattrName::Private);
        assert_eq!(
            classify_xattr(b"user.fuseoverlayfs.opaque"),
            XattrName::Private
        );
        assert_eq!(
            classify_xattr(b"user.containers.override_stat"),
            XattrName::Private
        );
        assert_eq!(
            classify_xattr(b"trusted.overlay.overlay.foo"),
            XattrName::Escaped(b"trusted.overlay.foo".to_vec())
        );
        assert_eq!(classify_xattr(b"user.foo"), XattrName::Plain);
        assert_eq!(classify_xattr(b"security.capability"), XattrName::Plain);
        assert_eq!(escape_xattr(b"user.overlay.x"), b"user.overlay.overlay.x");
        assert_eq!(escape_xattr(b"user.x"), b"user.x");
    }
}
