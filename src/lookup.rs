//! Name lookup across layers (the kernel's `namei.c`): the top layer wins for
//! non-directories, directories merge down to the first opaque one, and
//! whiteouts hide what lies below.

use crate::error::Result;
use crate::inode::{Inode, Key, Redirect};
use crate::layer::LayerIdx;
use crate::options::RedirectDir;
use crate::overlay::{Counted, Overlay, Ox};
use crate::sys::{self, Stat};
use crate::whiteout::{has_marker, is_wh_name, Entry};
use std::borrow::Cow;
use std::ffi::{CStr, CString, OsStr, OsString};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

/// What a name resolves to in a merged directory.
pub struct Found {
    /// Real stat of the top layer's object.
    pub st: Stat,
    /// Layers holding it, top-down (several only for a merged directory).
    pub layers: Vec<LayerIdx>,
    /// The redirect by which its lower layers were found (renamed dirs).
    pub redirect: Option<Redirect>,
    /// Inode number of the first lower dir merged under an upper one.
    pub lower_ino: Option<u64>,
    /// For a metadata-only copy (metacopy=on): the lower file holding its
    /// data, if found (O_PATH).
    pub lowerdata: Option<Arc<OwnedFd>>,
    /// The top object is a metadata-only copy.
    pub metacopy: bool,
    /// Made just now by this mount: it has no origin to read.
    pub fresh: bool,
    /// The top object carries no xattr (its list was read for the
    /// whiteout check of a zero-size file).
    pub bare: bool,
}

/// An absolute path walked in one layer.
pub struct Walked {
    /// The parent dir fd and last name, if the path's dirs are there.
    pub at: Option<(Arc<OwnedFd>, CString)>,
    /// No layer below this one takes part.
    pub stop: bool,
}

/// A lookup's walk down the layers (the kernel's `ovl_lookup_data`).
struct LookupState<'n> {
    /// What to find in the next layer.
    target: Target<'n>,
    /// The layers to search, top-down, and the next one's position.
    layers: Vec<LayerIdx>,
    next: usize,
    /// What the parent's listing says of the target name (reset when a
    /// redirect changes the name).
    holders: Option<crate::resolve::Holders>,
    /// What was found so far.
    found: Option<Found>,
    /// The layer whose whiteout ended the lookup.
    whiteout_in: Option<LayerIdx>,
}

#[derive(PartialEq, Eq)]
enum Step {
    /// Go on to the next layer.
    Next,
    /// The lookup is complete.
    Done,
}

/// Where the next layers are searched.
enum Target<'n> {
    /// This name in the parent's directory of each layer: the one asked
    /// for (borrowed: no allocation per lookup), or a redirect's.
    Name(Cow<'n, CStr>),
    /// This path from the root of each layer below.
    Path(Vec<OsString>),
}

impl Overlay {
    fn follow_redirects(&self) -> bool {
        self.cfg.redirect_dir != RedirectDir::NoFollow
    }

    /// Resolves `name` in `parent` without touching the inode table. Like
    /// the kernel's `ovl_lookup`, a directory's redirect xattr moves the
    /// search in the layers below it.
    pub(crate) fn find(&self, parent: &Arc<Inode>, name: &CStr) -> Result<Option<Found>> {
        self.find_over(parent, name).map(|(f, _)| f)
    }

    /// [`Self::find`], and whether a whiteout in the upper layer hides the
    /// name: a new object there then takes its place.
    pub(crate) fn find_over(
        &self,
        parent: &Arc<Inode>,
        name: &CStr,
    ) -> Result<(Option<Found>, bool)> {
        self.find_in(parent, name, parent.layers())
    }

    /// [`Self::find_over`] in some of the parent's layers only (top-down).
    pub(crate) fn find_in(
        &self,
        parent: &Arc<Inode>,
        name: &CStr,
        layers: Vec<LayerIdx>,
    ) -> Result<(Option<Found>, bool)> {
        let mut s = LookupState {
            target: Target::Name(Cow::Borrowed(name)),
            layers,
            next: 0,
            holders: None,
            found: None,
            whiteout_in: None,
        };
        while let Some(l) = s.layers.get(s.next).copied() {
            s.next += 1;
            if self.lookup_layer(parent, &mut s, l)? == Step::Done {
                break;
            }
        }
        let upper_whiteout = s.whiteout_in.is_some_and(|l| self.layers.is_upper(l));
        Ok((s.found, upper_whiteout))
    }

    /// One layer of a lookup (the kernel's `ovl_lookup_layer` and the body
    /// of `ovl_lookup`'s loop): finds the target in layer `l`, merges what
    /// is there into `s.found`, and follows an opaque mark or a redirect.
    fn lookup_layer(&self, parent: &Arc<Inode>, s: &mut LookupState, l: LayerIdx) -> Result<Step> {
        use Step::{Done, Next};
        // As the kernel: with redirect_dir=on an upper dir's redirect is
        // read even in a parent without lower layers (an absolute one
        // reaches every lower layer); otherwise only where layers remain.
        let last = if self.layers.is_upper(l) && self.cfg.redirect_dir == RedirectDir::On {
            self.layers.all.len() == 1
        } else {
            s.next == s.layers.len()
        };
        if !self.listed_in(parent, s, l) {
            return Ok(Next);
        }
        // `stop`: an opaque dir on an absolute redirect's way makes this
        // layer the last. The name is borrowed: no allocation per layer.
        let (dfd, cname, stop): (_, Cow<'_, CStr>, _) = match &s.target {
            Target::Name(n) => match self.dir_fd(parent, l) {
                Ok(fd) => (fd, Cow::Borrowed(n.as_ref()), false),
                Err(e) if e.is_missing() => return Ok(Next),
                Err(e) => return Err(e),
            },
            Target::Path(p) => match self.walk_path(l, p) {
                Ok(Walked {
                    at: Some((fd, n)),
                    stop,
                }) => (fd, Cow::Owned(n), stop),
                Ok(Walked { at: None, stop }) => return Ok(if stop { Done } else { Next }),
                Err(e) if e.is_missing() => return Ok(Next),
                Err(e) => return Err(e),
            },
        };
        // A `.wh.` marker hides a name from the layers below only.
        let below = !stop && s.next < s.layers.len();
        let by_name = matches!(s.target, Target::Name(_));
        let marked = || {
            below
                && match s.holders.as_ref().filter(|_| by_name) {
                    Some(h) => self.marked_in(parent, h, l, dfd.as_fd(), &cname),
                    None => has_marker(dfd.as_fd(), &cname),
                }
        };
        let (st, bare) = match self.probe(dfd.as_fd(), &cname, l, marked)? {
            Entry::Missing => {
                if let Some(h) = s.holders.as_ref().filter(|_| by_name) {
                    self.note_miss(parent, h, l, dfd.as_fd());
                }
                return Ok(if stop { Done } else { Next });
            }
            Entry::Whiteout => {
                s.whiteout_in = Some(l);
                return Ok(Done);
            }
            Entry::Marked => return Ok(Done),
            Entry::Present { st, bare } => (st, bare),
        };
        let is_dir = sys::is_dir(st.st_mode);
        match &mut s.found {
            Some(f) if f.metacopy => {
                // The data of a metadata-only copy: the first file below.
                if sys::mode_type(st.st_mode) == libc::S_IFREG {
                    f.lowerdata = sys::openat(dfd.as_fd(), &cname, libc::O_PATH, 0)
                        .ok()
                        .map(Arc::new);
                }
                return Ok(Done);
            }
            // A non-directory below a directory ends the merge.
            Some(_) if !is_dir => return Ok(Done),
            Some(f) => {
                if f.layers.len() == 1 {
                    f.lower_ino = Some(self.xino(st.st_ino, st.st_dev));
                }
                f.layers.push(l);
            }
            None => {
                let metacopy = self.cfg.metacopy
                    && self.layers.is_upper(l)
                    && sys::mode_type(st.st_mode) == libc::S_IFREG
                    && sys::getxattr_at(dfd.as_fd(), &cname, self.xattr(Ox::Metacopy)).is_ok();
                s.found = Some(Found {
                    st,
                    layers: vec![l],
                    redirect: None,
                    lower_ino: None,
                    lowerdata: None,
                    metacopy,
                    fresh: false,
                    bare,
                });
                if !is_dir && !metacopy {
                    return Ok(Done);
                }
            }
        }
        if last {
            return Ok(Done);
        }
        let marks = self.dir_marks(dfd.as_fd(), &cname, l);
        if marks.opaque {
            return Ok(Done);
        }
        if let Some(r) = marks.redirect.filter(|_| self.follow_redirects()) {
            if let Some(f) = s.found.as_mut().filter(|f| f.layers.len() == 1) {
                f.redirect = Some(r.clone());
            }
            match r {
                Redirect::Rel(n) => {
                    s.target = Target::Name(Cow::Owned(sys::cstr(&n)?));
                    s.holders = None;
                }
                Redirect::Abs(p) => {
                    // An absolute redirect searches every layer below.
                    s.target = Target::Path(p);
                    s.layers = self.layers.indices().filter(|&x| x > l).collect();
                    s.next = 0;
                }
            }
        }
        Ok(if stop { Done } else { Next })
    }

    /// Whether the parent's listing allows the target name in layer `l`
    /// (a name missing from the listing of a lower dir is not probed).
    fn listed_in(&self, parent: &Arc<Inode>, s: &mut LookupState, l: LayerIdx) -> bool {
        let Target::Name(n) = &s.target else {
            return true;
        };
        let h = s
            .holders
            .get_or_insert_with(|| self.holders(parent, &s.layers, n));
        self.may_hold(h, parent, l, n)
    }

    /// Where an absolute redirect leads in layer `l`, walked a component at
    /// a time as the kernel's `ovl_lookup_layer` walks it: a whiteout or a
    /// non-directory on the way ends the merge in this layer, and so does
    /// an opaque directory, after this layer is searched.
    pub(crate) fn walk_path(&self, l: LayerIdx, path: &[OsString]) -> Result<Walked> {
        let (last, dirs) = path.split_last().ok_or_else(|| sys::err(libc::ENOENT))?;
        let mut fd = self.layers.get(l).root.clone();
        let mut stop = false;
        for c in dirs {
            let cn = sys::cstr(c)?;
            match self.probe(fd.as_fd(), &cn, l, || has_marker(fd.as_fd(), &cn))? {
                Entry::Missing => return Ok(Walked { at: None, stop }),
                Entry::Present { st, .. } if sys::is_dir(st.st_mode) => {}
                Entry::Whiteout | Entry::Marked | Entry::Present { .. } => {
                    return Ok(Walked {
                        at: None,
                        stop: true,
                    })
                }
            }
            stop |= self.dir_marks(fd.as_fd(), &cn, l).opaque;
            fd = Arc::new(sys::openat(
                fd.as_fd(),
                &cn,
                libc::O_PATH | libc::O_DIRECTORY,
                0,
            )?);
        }
        Ok(Walked {
            at: Some((fd, sys::cstr(last)?)),
            stop,
        })
    }

    /// Whether a directory entry carries the opaque xattr.
    pub(crate) fn is_opaque_at(&self, dir: std::os::fd::BorrowedFd<'_>, name: &CStr) -> bool {
        match sys::openat(dir, name, libc::O_PATH | libc::O_DIRECTORY, 0) {
            Ok(fd) => self.is_opaque_fd(fd.as_fd()),
            Err(_) => false,
        }
    }

    pub(crate) fn is_opaque_fd(&self, fd: std::os::fd::BorrowedFd<'_>) -> bool {
        matches!(sys::getxattr(fd, self.xattr(Ox::Opaque)), Ok(v) if v == b"y")
    }

    /// Whether `name` is visible in a lower layer of `parent`: removing it
    /// from the upper layer then needs a whiteout.
    pub(crate) fn lower_positive(&self, parent: &Arc<Inode>, name: &CStr) -> Result<bool> {
        let layers = parent.layers();
        let mut holders = self.holders(parent, &layers, name);
        for (i, &l) in layers.iter().enumerate() {
            if self.layers.is_upper(l) || !self.may_hold(&mut holders, parent, l, name) {
                continue;
            }
            let pfd = match self.dir_fd(parent, l) {
                Ok(fd) => fd,
                Err(_) => continue,
            };
            let below = i + 1 < layers.len();
            let marked = || below && self.marked_in(parent, &holders, l, pfd.as_fd(), name);
            match self.probe(pfd.as_fd(), name, l, marked)? {
                Entry::Present { .. } => return Ok(true),
                Entry::Whiteout | Entry::Marked => return Ok(false),
                Entry::Missing => self.note_miss(parent, &holders, l, pfd.as_fd()),
            }
        }
        Ok(false)
    }

    /// The key and reported inode number for a found object.
    pub(crate) fn key_of(&self, parent: &Arc<Inode>, name: &OsStr, f: &Found) -> (Key, u64) {
        let top = f.layers[0];
        let dev = self.layers.get(top).dev;
        let real = f.st.st_ino;
        if self.layers.is_upper(top) {
            return (Key::Real(dev, real), self.upper_ino(parent, name, f));
        }
        let ino = self.xino(real, f.st.st_dev);
        let is_dir = sys::is_dir(f.st.st_mode);
        if !is_dir && f.st.st_nlink > 1 && self.layers.has_upper {
            // Copy-up splits lower hard links: one node per name.
            return (
                Key::Name(Box::new((parent.nodeid, name.to_os_string()))),
                ino,
            );
        }
        (Key::Real(dev, real), ino)
    }

    /// The inode number the kernel reports for an upper object: that of
    /// its copy-up origin (a merged dir's first lower dir; a file's decoded
    /// origin if not a split hard link), so it stays the same across
    /// copy-up and remount; with layers on several filesystems, mapped
    /// into one number space (xino).
    fn upper_ino(&self, parent: &Arc<Inode>, name: &OsStr, f: &Found) -> u64 {
        let real = f.st.st_ino;
        if let Some(i) = self.copied_inos.get(&real) {
            return *i;
        }
        let mapped = self.xino(real, f.st.st_dev);
        if let Some(lower) = f.lower_ino {
            return lower;
        }
        if f.fresh || sys::is_dir(f.st.st_mode) || self.layers.all.len() < 2 {
            return mapped;
        }
        let Ok(pfd) = self.dir_fd(parent, crate::layer::UPPER) else {
            return mapped;
        };
        let Ok(cname) = sys::cstr(name) else {
            return mapped;
        };
        match sys::getxattr_at(pfd.as_fd(), &cname, self.xattr(Ox::Origin)) {
            Ok(fb) => match self.decode_origin(&fb) {
                // An indexed copy keeps its lower hard link's number.
                Some(lst)
                    if (lst.st_nlink == 1 || self.index.is_some()) && !sys::is_dir(lst.st_mode) =>
                {
                    self.xino(lst.st_ino, lst.st_dev)
                }
                _ => mapped,
            },
            Err(_) => mapped,
        }
    }

    /// The FUSE lookup: resolves and counts a kernel reference.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<(Counted<'_>, Stat)> {
        let parent = self.node(parent)?;
        if !parent.is_dir() {
            return Err(sys::err(libc::ENOTDIR));
        }
        let c = Self::check_name(name)?;
        // `.wh.` markers are never looked up through the mount.
        if is_wh_name(c.to_bytes()) {
            return Err(sys::err(libc::ENOENT));
        }
        let f = self
            .find(&parent, &c)?
            .ok_or_else(|| sys::err(libc::ENOENT))?;
        if f.layers.len() > 1 && self.layers.is_upper(f.layers[0]) && !self.read_only() {
            self.fix_origin(&parent, &c, f.layers[1]);
        }
        Ok(self.instantiate(&parent, name, f))
    }

    /// As the kernel's `ovl_fix_origin`: a merged dir whose upper lacks an
    /// origin gets that of its first lower dir, and its parent turns impure.
    fn fix_origin(&self, parent: &Arc<Inode>, name: &CStr, lower: LayerIdx) {
        let Ok(ufd) = self.dir_fd(parent, crate::layer::UPPER) else {
            return;
        };
        let Ok(upper) = sys::openat(ufd.as_fd(), name, libc::O_PATH | libc::O_DIRECTORY, 0) else {
            return;
        };
        let origin = self.xattr(Ox::Origin);
        if sys::getxattr(upper.as_fd(), origin).is_ok() {
            return;
        }
        let Ok(lfd) = self.dir_fd(parent, lower) else {
            return;
        };
        let Ok(ldir) = sys::openat(lfd.as_fd(), name, libc::O_PATH | libc::O_DIRECTORY, 0) else {
            return;
        };
        if let Some(fh) = self.encode_fh(ldir.as_fd(), false) {
            if sys::setxattr(upper.as_fd(), origin, &fh, 0).is_ok() {
                self.set_impure(parent, ufd.as_fd());
            }
        }
    }

    /// With index=on, the index entry name of a found non-dir: a lower hard
    /// link's, or an upper file's that is a copy of one.
    fn index_name_for(
        &self,
        parent: &Arc<Inode>,
        name: &OsStr,
        top: LayerIdx,
        st: &Stat,
    ) -> Option<CString> {
        let upper = self.layers.is_upper(top);
        if !upper && !self.indexes(st) {
            return None;
        }
        let dfd = self.dir_fd(parent, top).ok()?;
        let fd = sys::openat(dfd.as_fd(), &sys::cstr(name).ok()?, libc::O_PATH, 0).ok()?;
        if upper {
            self.index_name_of_upper(fd.as_fd())
        } else {
            self.index_name(fd.as_fd())
        }
    }

    /// A lower name of an indexed hard link whose index entry is a
    /// metadata-only copy reads its own lower file: the entry has no data.
    pub(crate) fn own_lower_data(&self, node: &Arc<Inode>) -> Option<Arc<OwnedFd>> {
        if !self.cfg.metacopy || self.index.is_none() {
            return None;
        }
        let top = node.top()?;
        if self.layers.is_upper(top) || !node.has_index() {
            return None;
        }
        let (idir, iname) = self.index_dir_entry(node)?;
        sys::getxattr_at(idir.as_fd(), &iname, self.xattr(Ox::Metacopy)).ok()?;
        let (parent, name) = node.alias()?;
        let dir = self.dir_fd(&parent, top).ok()?;
        let fd = sys::openat(dir.as_fd(), &sys::cstr(&name).ok()?, libc::O_PATH, 0).ok()?;
        Some(Arc::new(fd))
    }

    /// Enters a found object into the inode table.
    pub(crate) fn instantiate(
        &self,
        parent: &Arc<Inode>,
        name: &OsStr,
        f: Found,
    ) -> (Counted<'_>, Stat) {
        let (key, ino) = self.key_of(parent, name, &f);
        let Found {
            st,
            layers,
            redirect,
            lowerdata,
            metacopy,
            bare,
            ..
        } = f;
        let top = layers[0];
        let node = self.table.lookup(
            key,
            sys::mode_type(st.st_mode),
            layers,
            ino,
            parent,
            &name.to_os_string(),
        );
        self.note_named(parent.nodeid, name, node.nodeid);
        if node.is_dir() {
            if node.redirect() != redirect {
                node.set_redirect(redirect);
            }
        } else {
            if self.index.is_some() && !node.has_index() {
                let index = self.index_name_for(parent, name, top, &st);
                node.set_index(index);
            }
            if !metacopy {
                if let Some(own) = self.own_lower_data(&node) {
                    node.set_lowerdata(Some(own));
                }
            }
            if metacopy {
                node.set_lowerdata(lowerdata);
                node.set_redirect(redirect);
            }
            // Its list, read for the whiteout check, spares GETXATTR one.
            if bare {
                self.note_no_xattrs(&node, top);
            }
        }
        (Counted::new(self, node), st)
    }
}
