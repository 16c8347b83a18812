//! `rovl check`: an fsck for the dirs of an unmounted overlay, after
//! overlayfs-progs' `fsck.overlay`. It reads the upper dir (and the lower
//! layers, when given) and the workdir, reports each inconsistency with the
//! path and what is wrong, and with `repair` fixes what is safe to fix:
//!
//! - leftovers of interrupted copy-ups in `W/work` (removed);
//! - whiteouts the kernel would not read: AUFS `.wh.` markers in the upper
//!   dir (made 0/0 whiteouts and opaque xattrs), xattr whiteouts in a dir
//!   not marked `opaque=x` (marked), the whiteout xattr on a file with data
//!   (xattr removed);
//! - orphan whiteouts, hiding nothing in any lower layer (removed);
//! - redirects that are malformed or point nowhere (xattr removed); two
//!   dirs redirected from one origin (reported). A redirect cannot loop:
//!   each is looked up only in the layers below the one holding it;
//! - metacopy files whose lower data is gone (reported: the data is lost);
//! - `W/index` entries that are leftovers, not file handles, not matching
//!   their origin, or used by no name (removed);
//! - `nlink` xattrs that are malformed or count fewer names than the upper
//!   inode has (reset).

use crate::error::{Error, StartResult};
use crate::inode::Redirect;
use crate::ondisk::{self, join, show, Found, Kind, Lowers, Stack};
use crate::sys::{self, Stat};
use crate::whiteout;
use crate::workdir::{lstat_at, remove_entry};
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

/// One inconsistency.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Finding {
    /// Where: `upper/...`, `work/...` or `index/...`.
    pub path: String,
    /// A short tag, for tools.
    pub kind: &'static str,
    /// What is wrong, for people.
    pub problem: String,
    /// What the repair did; None when not repaired.
    pub repaired: Option<String>,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    /// fsck's exit status: 0 clean, 1 all fixed, 4 errors left.
    pub fn exit_code(&self) -> u8 {
        if self.findings.is_empty() {
            0
        } else if self.findings.iter().all(|f| f.repaired.is_some()) {
            1
        } else {
            4
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct CheckOptions {
    /// Fix what is safe to fix.
    pub repair: bool,
    /// Repairs write `user.overlay.*` markers (a `userxattr` overlay).
    pub userxattr: bool,
}

/// Checks `upper` and `work` (the workdir) against `lowers` (top-down,
/// when given).
pub fn check(
    upper: &Path,
    work: &Path,
    lowers: Option<&[PathBuf]>,
    opts: &CheckOptions,
) -> StartResult<Report> {
    let root = ondisk::open_root(upper).map_err(|e| Error::at("upper dir", upper, e))?;
    let workdir = ondisk::open_root(work).map_err(|e| Error::at("workdir", work, e))?;
    let lower = lowers.map(Lowers::open).transpose()?;
    let mut c = Checker {
        repair: opts.repair,
        own: usize::from(opts.userxattr),
        report: Report::default(),
        roots: lower,
        redirects: HashMap::new(),
    };
    c.work(&workdir)
        .map_err(|e| Error::at("checking", work, e))?;
    c.index(&workdir)
        .map_err(|e| Error::at("checking", &work.join("index"), e))?;
    let below = c.roots.as_ref().map(|l| l.roots.clone());
    c.upper_dir(&root, b"", below.as_ref())
        .map_err(|e| Error::at("checking", upper, e))?;
    let mut dups: Vec<_> = c.redirects.iter().filter(|(_, v)| v.len() > 1).collect();
    dups.sort();
    let dups: Vec<Finding> = dups
        .into_iter()
        .map(|(target, dirs)| Finding {
            path: format!("upper/{}", dirs.join(", upper/")),
            kind: "duplicate-redirect",
            problem: format!(
                "these dirs are all redirected from /{target}: at most one can be its rename (remove the redirect xattr of the others)"
            ),
            repaired: None,
        })
        .collect();
    c.report.findings.extend(dups);
    Ok(c.report)
}

struct Checker {
    repair: bool,
    /// Which of `ondisk::OVERLAY_PREFIXES` repairs write.
    own: usize,
    report: Report,
    roots: Option<Lowers>,
    /// Dirs by the absolute path their redirect names.
    redirects: HashMap<String, Vec<String>>,
}

impl Checker {
    /// Records a finding; with `repair`, runs `fix` and records what it did.
    fn found(
        &mut self,
        path: String,
        kind: &'static str,
        problem: String,
        fix: Option<(&str, &mut dyn FnMut() -> sys::Result<()>)>,
    ) {
        let repaired = match fix {
            Some((what, f)) if self.repair => match f() {
                Ok(()) => Some(what.to_string()),
                Err(e) => {
                    log::warn!("check: {path}: repair failed: {e}");
                    None
                }
            },
            _ => None,
        };
        self.report.findings.push(Finding {
            path,
            kind,
            problem,
            repaired,
        });
    }

    /// `W/work` must be empty but for `incompat`.
    fn work(&mut self, workdir: &OwnedFd) -> sys::Result<()> {
        let Some(st) = lstat_at(workdir.as_fd(), c"work")? else {
            return Ok(());
        };
        if !sys::is_dir(st.st_mode) {
            return Ok(());
        }
        let w = ondisk::open_dir(workdir.as_fd(), c"work")?;
        for name in ondisk::sorted_names(&w)? {
            let path = format!("work/work/{}", name.to_string_lossy());
            if name.as_bytes() == b"incompat" {
                let inc = ondisk::open_dir(w.as_fd(), &name)?;
                if lstat_at(inc.as_fd(), c"volatile")?.is_some() {
                    self.found(
                        format!("{path}/volatile"),
                        "volatile-unclean",
                        "a volatile mount ended without a clean unmount: the upper dir may have lost writes, and the kernel will not mount it; if its data is fine, remove work/work/incompat/volatile".into(),
                        None,
                    );
                }
                continue;
            }
            if sys::is_whiteout(&sys::fstatat(w.as_fd(), &name)?) {
                // The kernel's shared whiteout, linked for each new one.
                continue;
            }
            let wfd = w.as_fd();
            self.found(
                path,
                "work-leftover",
                "left in the work dir by an interrupted copy-up or rename".into(),
                Some(("removed", &mut || remove_entry(wfd, &name))),
            );
        }
        Ok(())
    }

    /// The inodes index `W/index` (index=on).
    fn index(&mut self, workdir: &OwnedFd) -> sys::Result<()> {
        match lstat_at(workdir.as_fd(), c"index")? {
            Some(st) if sys::is_dir(st.st_mode) => {}
            _ => return Ok(()),
        }
        let idx = ondisk::open_dir(workdir.as_fd(), c"index")?;
        let origins = ondisk::overlay_names("origin");
        for name in ondisk::sorted_names(&idx)? {
            let path = format!("work/index/{}", name.to_string_lossy());
            let st = sys::fstatat(idx.as_fd(), &name)?;
            let d = idx.as_fd();
            let problem = if sys::is_whiteout(&st) {
                // The kernel's shared whiteout (index=on makes the index
                // its work dir), or a whiteout index entry.
                None
            } else if name.as_bytes().first() == Some(&b'#') {
                Some((
                    "index-leftover",
                    "left by an interrupted copy-up".to_string(),
                ))
            } else if let Some(fh) = crate::index::unhex(name.as_bytes()) {
                if sys::is_dir(st.st_mode) {
                    None
                } else {
                    let origin = origins
                        .iter()
                        .find_map(|x| sys::getxattr_at(d, &name, x).ok());
                    match origin {
                        Some(o) if o != fh => Some((
                            "index-mismatch",
                            "its origin xattr is not the file handle its name says".into(),
                        )),
                        None => Some(("index-mismatch", "no origin xattr".into())),
                        Some(_) if st.st_nlink == 1 && union_nlink(d, &name, &st) <= 0 => {
                            Some(("index-orphan", "no name uses it any more".into()))
                        }
                        Some(_) => None,
                    }
                }
            } else {
                Some(("index-bad-name", "its name is not a file handle".into()))
            };
            if let Some((kind, problem)) = problem {
                self.found(
                    path,
                    kind,
                    problem,
                    Some(("removed", &mut || remove_entry(d, &name))),
                );
            }
        }
        Ok(())
    }

    fn upper_dir(&mut self, fd: &OwnedFd, path: &[u8], lower: Option<&Stack>) -> sys::Result<()> {
        let mut xwhiteouts = false;
        for name in ondisk::sorted_names(fd)? {
            let n = name.to_bytes();
            let p = join(path, n);
            let shown = format!("upper/{}", show(&p));
            let d = fd.as_fd();
            let st = sys::fstatat(d, &name)?;
            match ondisk::classify(d, &name, &st, None) {
                Kind::Marker(hidden) => {
                    let hidden = CString::new(hidden).expect("from a name");
                    let own = self.own;
                    self.found(
                        shown,
                        "aufs-whiteout",
                        "an AUFS whiteout marker, which the kernel does not read".into(),
                        Some(("made a whiteout", &mut || {
                            aufs_to_whiteout(d, &name, &hidden, own)
                        })),
                    );
                }
                Kind::OpaqueMarker => {
                    let o = &ondisk::overlay_names("opaque")[self.own];
                    self.found(
                        shown,
                        "aufs-opaque",
                        "an AUFS opaque marker, which the kernel does not read".into(),
                        Some(("made the dir opaque", &mut || {
                            sys::setxattr(d, o, b"y", 0)?;
                            sys::unlinkat(d, &name, 0)
                        })),
                    );
                }
                Kind::Whiteout => {
                    let is_xattr = !sys::is_whiteout(&st);
                    xwhiteouts |= is_xattr;
                    let orphan = match lower {
                        Some(s) => matches!(s.child(&name)?, Found::Missing),
                        None => false,
                    };
                    if orphan {
                        self.found(
                            shown,
                            "orphan-whiteout",
                            "a whiteout that hides nothing in any lower layer".into(),
                            Some(("removed", &mut || sys::unlinkat(d, &name, 0))),
                        );
                    }
                }
                Kind::Dir { opaque, .. } => {
                    let redirect = self.check_redirect(d, &name, &p, &shown)?;
                    let below = match lower {
                        None => None,
                        Some(_) if opaque => Some(Stack::default()),
                        Some(s) => {
                            let found = match (&redirect, &self.roots) {
                                (Some(r), Some(l)) => l.redirected(s, r)?,
                                _ => s.child(&name)?,
                            };
                            match found {
                                Found::Dir(s) => Some(s),
                                _ => Some(Stack::default()),
                            }
                        }
                    };
                    let sub = ondisk::open_dir(d, &name)?;
                    self.upper_dir(&sub, &p, below.as_ref())?;
                }
                Kind::File { metacopy, redirect } => {
                    self.check_file(d, &name, &st, &shown)?;
                    if let (true, Some(s), Some(l)) = (metacopy, lower, &self.roots) {
                        let found = l.data_of(s, &name, redirect.as_ref())?;
                        let has_data = matches!(found, Found::NonDir { st, .. } if sys::mode_type(st.st_mode) == libc::S_IFREG);
                        if !has_data {
                            self.found(
                                shown,
                                "metacopy-data-gone",
                                "a metadata-only copy whose data is in no lower layer: its data is lost".into(),
                                None,
                            );
                        }
                    }
                }
                Kind::Other => {}
            }
        }
        if xwhiteouts {
            let opaque = &ondisk::overlay_names("opaque");
            let marked = opaque
                .iter()
                .any(|x| matches!(sys::getxattr(fd.as_fd(), x), Ok(v) if v == b"x" || v == b"y"));
            if !marked {
                let d = fd.as_fd();
                let own = &opaque[self.own];
                self.found(
                    format!("upper/{}", show(path)),
                    "xwhiteout-unmarked",
                    "holds xattr whiteouts but is not marked opaque=x: listings show them".into(),
                    Some(("marked opaque=x", &mut || whiteout::mark_xwhiteouts(d, own))),
                );
            }
        }
        Ok(())
    }

    /// A dir's redirect: malformed, pointing nowhere or into itself.
    /// Returns the redirect the kernel would follow.
    fn check_redirect(
        &mut self,
        d: BorrowedFd<'_>,
        name: &CStr,
        p: &[u8],
        shown: &str,
    ) -> sys::Result<Option<Redirect>> {
        let Some((xname, raw)) = ondisk::overlay_names("redirect")
            .into_iter()
            .find_map(|x| sys::getxattr_at(d, name, &x).ok().map(|v| (x, v)))
        else {
            return Ok(None);
        };
        let mut remove = || {
            let fd = sys::openat(d, name, libc::O_PATH, 0)?;
            sys::removexattr(fd.as_fd(), &xname)
        };
        let Some(r) = Redirect::parse(&raw) else {
            self.found(
                shown.to_string(),
                "redirect-malformed",
                format!("its redirect xattr is malformed ({:?})", show(&raw)),
                Some(("removed the redirect", &mut remove)),
            );
            return Ok(None);
        };
        if let Redirect::Abs(comps) = &r {
            let target: Vec<u8> = comps
                .iter()
                .map(|c| {
                    use std::os::unix::ffi::OsStrExt;
                    c.as_bytes().to_vec()
                })
                .collect::<Vec<_>>()
                .join(&b'/');
            self.redirects
                .entry(show(&target))
                .or_default()
                .push(show(p));
        }
        if let Some(Lowers { roots }) = &self.roots {
            // A relative redirect names a sibling; resolved from the root
            // by the dir's own parent path.
            let comps = match &r {
                Redirect::Abs(_) => ondisk::redirect_comps(&r),
                Redirect::Rel(_) => {
                    let mut c: Vec<CString> = p
                        .split(|&b| b == b'/')
                        .map(|x| CString::new(x).expect("from names"))
                        .collect();
                    c.pop();
                    c.extend(ondisk::redirect_comps(&r));
                    c
                }
            };
            if !matches!(roots.lookup(&comps)?, Found::Dir(_)) {
                self.found(
                    shown.to_string(),
                    "redirect-nowhere",
                    format!(
                        "redirected from {:?}, which no lower layer holds as a dir",
                        show(&r.encode())
                    ),
                    Some(("removed the redirect", &mut remove)),
                );
                return Ok(None);
            }
        }
        Ok(Some(r))
    }

    /// The whiteout xattr on a file with data; an `nlink` xattr that is
    /// malformed or counts fewer names than the upper inode has.
    fn check_file(
        &mut self,
        d: BorrowedFd<'_>,
        name: &CStr,
        st: &Stat,
        shown: &str,
    ) -> sys::Result<()> {
        let list = sys::listxattr_at(d, name).unwrap_or_default();
        let has = |x: &CString| ondisk::has_name(&list, x.to_bytes());
        for x in ondisk::overlay_names("whiteout") {
            if has(&x) {
                self.found(
                    shown.to_string(),
                    "whiteout-with-data",
                    "a file with data carries the whiteout xattr".into(),
                    Some(("removed the xattr", &mut || {
                        let fd = sys::openat(d, name, libc::O_PATH, 0)?;
                        sys::removexattr(fd.as_fd(), &x)
                    })),
                );
            }
        }
        for x in ondisk::overlay_names("nlink") {
            if !has(&x) {
                continue;
            }
            let v = sys::getxattr_at(d, name, &x)?;
            let problem = match crate::index::parse_nlink(&v) {
                None => format!("its nlink xattr is malformed ({:?})", show(&v)),
                Some((b'U', diff)) if (st.st_nlink as i64 + diff) < st.st_nlink as i64 - 1 => {
                    format!(
                        "its nlink xattr ({}) counts fewer names than the {} the upper inode has",
                        show(&v),
                        st.st_nlink.saturating_sub(1)
                    )
                }
                Some(_) => continue,
            };
            self.found(
                shown.to_string(),
                "nlink-xattr",
                problem,
                Some(("reset it to the upper names", &mut || {
                    let fd = sys::openat(d, name, libc::O_PATH, 0)?;
                    sys::setxattr(fd.as_fd(), &x, b"U-1", 0)
                })),
            );
        }
        Ok(())
    }
}

/// The union count an index entry stands for (its `nlink` xattr applied).
fn union_nlink(d: BorrowedFd<'_>, name: &CStr, st: &Stat) -> i64 {
    let v = ondisk::overlay_names("nlink")
        .iter()
        .find_map(|x| sys::getxattr_at(d, name, x).ok());
    match v.and_then(|v| crate::index::parse_nlink(&v)) {
        Some((b'U', diff)) => st.st_nlink as i64 + diff,
        _ => st.st_nlink as i64,
    }
}

/// An AUFS `.wh.NAME` in an upper dir made the kernel's 0/0 whiteout at
/// NAME (unless NAME exists: then it hides the lower one already).
fn aufs_to_whiteout(
    d: BorrowedFd<'_>,
    marker: &CStr,
    hidden: &CStr,
    own: usize,
) -> sys::Result<()> {
    if lstat_at(d, hidden)?.is_none() {
        let x = &ondisk::overlay_names("whiteout")[own];
        if whiteout::make_whiteout(d, hidden, x)? {
            whiteout::mark_xwhiteouts(d, &ondisk::overlay_names("opaque")[own])?;
        }
    }
    sys::unlinkat(d, marker, 0)
}
