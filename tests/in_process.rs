//! The overlay driven in-process through the library, without FUSE, root
//! or a kernel overlay: lookup, every whiteout and opaque format, copy-up,
//! unlink and rename, checked on disk. `userxattr` keeps every xattr in
//! `user.*`, so this tier runs as any user (`cargo test --test in_process`).

use rovl::overlay::Overlay;
use rovl::workdir::WorkDir;
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

const ROOT: u64 = 1;

/// Temp layers (`l0` on top) with an upper and a work dir, and the overlay
/// over them, made as `rovl mount` makes it.
struct InProcess {
    t: tempfile::TempDir,
    ovl: Overlay,
    _wd: Option<WorkDir>,
}

impl InProcess {
    /// `fill` writes the lower layers before the overlay opens them.
    fn new(lowers: usize, extra: &str, fill: impl FnOnce(&[PathBuf])) -> InProcess {
        let t = tempfile::tempdir().expect("temp dir");
        let ls: Vec<PathBuf> = (0..lowers)
            .map(|i| t.path().join(format!("l{i}")))
            .collect();
        let own = ["u", "w", "m"].map(|d| t.path().join(d));
        for d in ls.iter().chain(&own) {
            fs::create_dir(d).expect("layer dir");
        }
        fill(&ls);
        let lower: Vec<String> = ls.iter().map(|p| p.display().to_string()).collect();
        let opts = format!(
            "lowerdir={},upperdir={},workdir={},userxattr{extra}",
            lower.join(":"),
            t.path().join("u").display(),
            t.path().join("w").display(),
        );
        let split = rovl::options::split_options(&opts);
        let cfg = rovl::options::parse(&split, &t.path().join("m"), None, t.path())
            .expect("valid options");
        rovl::options::validate(&cfg).expect("usable layers");
        let p = rovl::prepare::prepare(&cfg).expect("prepare");
        let ovl = Overlay::new(&cfg, p.layers, p.workdir.as_ref()).expect("overlay");
        InProcess {
            t,
            ovl,
            _wd: p.workdir,
        }
    }

    fn u(&self, p: &str) -> PathBuf {
        self.t.path().join("u").join(p)
    }

    fn w(&self) -> PathBuf {
        self.t.path().join("w/work")
    }

    /// The node id of `path`, looked up a component at a time.
    fn resolve(&self, path: &str) -> rovl::error::Result<u64> {
        let mut id = ROOT;
        for c in path.split('/').filter(|c| !c.is_empty()) {
            // The kernel's count stays with the node, as for a cached dentry.
            let (n, _) = self.ovl.lookup(id, OsStr::new(c))?;
            id = n.keep().nodeid;
        }
        Ok(id)
    }

    fn exists(&self, path: &str) -> bool {
        match self.resolve(path) {
            Ok(_) => true,
            Err(e) if e.raw() == libc::ENOENT => false,
            Err(e) => panic!("lookup {path}: {e}"),
        }
    }

    /// The merged listing of a dir, without `.` and `..`.
    fn list(&self, path: &str) -> Vec<String> {
        let node = self.ovl.node(self.resolve(path).unwrap()).unwrap();
        let mut v: Vec<String> = self
            .ovl
            .read_merged(&node, false)
            .expect("listing")
            .iter()
            .map(|e| e.name.to_string_lossy().into_owned())
            .filter(|n| n != "." && n != "..")
            .collect();
        v.sort();
        v
    }

    /// Splits `path` into (parent node, last name).
    fn parent_of<'a>(&self, path: &'a str) -> (u64, &'a OsStr) {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        (self.resolve(dir).unwrap(), OsStr::new(name))
    }

    fn unlink(&self, path: &str) -> rovl::error::Result<()> {
        let (p, n) = self.parent_of(path);
        self.ovl.remove(p, n, false)
    }

    fn rmdir(&self, path: &str) -> rovl::error::Result<()> {
        let (p, n) = self.parent_of(path);
        self.ovl.remove(p, n, true)
    }

    fn rename(&self, from: &str, to: &str) -> rovl::error::Result<()> {
        let (p1, n1) = self.parent_of(from);
        let (p2, n2) = self.parent_of(to);
        self.ovl.rename(p1, n1, p2, n2, 0)
    }
}

fn write(p: impl AsRef<Path>, data: &str) {
    if let Some(d) = p.as_ref().parent() {
        fs::create_dir_all(d).unwrap();
    }
    fs::write(p, data).unwrap();
}

fn setxattr(p: impl AsRef<Path>, name: &str, value: &[u8]) {
    let c = std::ffi::CString::new(p.as_ref().as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C strings and a buffer valid for its length.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "setxattr {name} on {}: {}",
        p.as_ref().display(),
        io::Error::last_os_error()
    );
}

fn getxattr(p: impl AsRef<Path>, name: &str) -> Option<Vec<u8>> {
    let c = std::ffi::CString::new(p.as_ref().as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid C strings and a buffer valid for its length.
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (r >= 0).then(|| {
        buf.truncate(r as usize);
        buf
    })
}

/// A 0/0 character device, or (where mknod is refused) the kernel's xattr
/// whiteout: what rovl leaves for a removed lower name.
fn is_whiteout(p: &Path) -> bool {
    match fs::symlink_metadata(p) {
        Ok(m) if m.file_type().is_char_device() => m.rdev() == 0,
        Ok(m) if m.is_file() => getxattr(p, "user.overlay.whiteout").is_some(),
        _ => false,
    }
}

#[test]
fn upper_wins_and_dirs_merge() {
    let o = InProcess::new(2, "", |l| {
        write(l[0].join("d/top"), "top");
        write(l[1].join("d/bottom"), "bottom");
        write(l[1].join("d/top"), "hidden");
        write(l[1].join("f"), "lower f");
    });
    write(o.u("f"), "upper f");
    assert_eq!(o.list(""), ["d", "f"]);
    assert_eq!(o.list("d"), ["bottom", "top"]);
    let d = o.ovl.node(o.resolve("d").unwrap()).unwrap();
    assert_eq!(d.layers().len(), 2, "d merges both lower dirs");
    let (f, st) = o.ovl.lookup(ROOT, OsStr::new("f")).unwrap();
    assert_eq!(f.layers(), [0], "the upper file wins");
    assert_eq!(st.st_size, 7);
    assert!(!o.exists("d/missing"));
}

/// Each whiteout and opaque format rovl reads hides what lies below.
#[test]
fn every_whiteout_format_hides() {
    let o = InProcess::new(2, "", |l| {
        for n in ["chr", "xattr", "aufs", "kept"] {
            write(l[1].join(n), "lower");
        }
        for d in ["opq_xattr", "opq_aufs", "opq_fuse"] {
            write(l[1].join(d).join("below"), "lower");
            write(l[0].join(d).join("above"), "upper");
        }
        // The kernel's xattr whiteout: a zero-size file in a dir marked opaque=x.
        fs::write(l[0].join("xattr"), "").unwrap();
        setxattr(l[0].join("xattr"), "user.overlay.whiteout", b"y");
        setxattr(&l[0], "user.overlay.opaque", b"x");
        // containers/storage's .wh. files.
        fs::write(l[0].join(".wh.aufs"), "").unwrap();
        fs::write(l[0].join("opq_aufs/.wh..wh..opq"), "").unwrap();
        setxattr(l[0].join("opq_xattr"), "user.overlay.opaque", b"y");
        setxattr(l[0].join("opq_fuse"), "user.fuseoverlayfs.opaque", b"y");
    });
    // A 0/0 device in the upper layer (mknod of one is unprivileged).
    let c = std::ffi::CString::new(o.u("chr").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid path.
    let made = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, 0) } == 0;
    for n in ["xattr", "aufs"] {
        assert!(!o.exists(n), "{n}: whiteout ignored");
    }
    assert_eq!(o.exists("chr"), !made, "chr");
    assert!(o.exists("kept"));
    for d in ["opq_xattr", "opq_aufs", "opq_fuse"] {
        assert_eq!(o.list(d), ["above"], "{d}: not opaque");
    }
    let root = o.list("");
    assert!(
        !root.iter().any(|n| n.starts_with(".wh.")),
        "markers listed: {root:?}"
    );
}

#[test]
fn copy_up_keeps_data_and_records_origin() {
    let o = InProcess::new(1, "", |l| {
        write(l[0].join("a/b/f"), "lower data");
        fs::set_permissions(l[0].join("a/b/f"), fs::Permissions::from_mode(0o640)).unwrap();
    });
    let f = o.ovl.node(o.resolve("a/b/f").unwrap()).unwrap();
    o.ovl.copy_up(&f).unwrap();
    assert_eq!(fs::read_to_string(o.u("a/b/f")).unwrap(), "lower data");
    assert_eq!(fs::metadata(o.u("a/b/f")).unwrap().mode() & 0o7777, 0o640);
    assert!(o.u("a/b").is_dir(), "ancestors copied up first");
    assert!(getxattr(o.u("a/b/f"), "user.overlay.origin").is_some());
    assert_eq!(f.layers(), [0], "the node now reads the upper file");
    assert_eq!(fs::read_dir(o.w()).unwrap().count(), 0, "W/work left clean");
}

/// Ancestors are copied up top-down in a loop, as the kernel does: 1,500
/// levels copy up on a 256 KiB stack (a recursion per level overflows it).
#[test]
fn copy_up_of_a_deep_tree() {
    const DEPTH: usize = 1500;
    let rel = format!("{}f", "d/".repeat(DEPTH));
    let o = InProcess::new(1, "", |l| write(l[0].join(&rel), "deep"));
    let f = o.ovl.node(o.resolve(&rel).unwrap()).unwrap();
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn_scoped(s, || o.ovl.copy_up(&f))
            .unwrap()
            .join()
            .expect("copy-up thread")
            .expect("copy-up");
    });
    assert_eq!(fs::read_to_string(o.u(&rel)).unwrap(), "deep");
    assert_eq!(fs::read_dir(o.w()).unwrap().count(), 0, "W/work left clean");
}

#[test]
fn unlink_and_rmdir_leave_whiteouts() {
    let o = InProcess::new(1, "", |l| {
        write(l[0].join("f"), "x");
        write(l[0].join("d/g"), "y");
    });
    o.unlink("f").unwrap();
    assert!(is_whiteout(&o.u("f")), "no whiteout for f");
    assert!(!o.exists("f"));
    assert_eq!(
        o.rmdir("d").map_err(|e| Some(e.raw())),
        Err(Some(libc::ENOTEMPTY))
    );
    o.unlink("d/g").unwrap();
    o.rmdir("d").unwrap();
    assert!(is_whiteout(&o.u("d")), "no whiteout for d");
    assert_eq!(o.list(""), Vec::<String>::new());
}

/// With `userxattr` (no redirects, as the kernel's option), a dir with
/// lower layers cannot move (EXDEV: `mv` copies it); an upper dir can,
/// and a lower file is copied up under its new name.
#[test]
fn rename_without_redirects() {
    let o = InProcess::new(1, "", |l| {
        write(l[0].join("old/f"), "in old");
    });
    assert_eq!(
        o.rename("old", "new").map_err(|e| Some(e.raw())),
        Err(Some(libc::EXDEV))
    );
    o.rename("old/f", "g").unwrap();
    assert_eq!(fs::read_to_string(o.u("g")).unwrap(), "in old");
    assert!(is_whiteout(&o.u("old/f")));
    fs::create_dir(o.u("up")).unwrap();
    write(o.u("up/h"), "h");
    o.rename("up", "moved").unwrap();
    assert_eq!(o.list("moved"), ["h"]);
    assert_eq!(o.list(""), ["g", "moved", "old"]);
}

/// The tier's point: as root (CI), the other tests run again as `nobody`,
/// from a copy of this binary any user can run.
#[test]
fn passes_as_a_plain_user() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return; // Already one.
    }
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let exe = dir.path().join("in_process");
    fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&exe)
        .args(["--skip", "passes_as_a_plain_user", "--test-threads=2"])
        .env("TMPDIR", "/tmp")
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) if e.kind() == io::ErrorKind::NotFound && std::env::var("CI").is_err() => {
            eprintln!("skipped: setpriv (util-linux) is not installed");
            return;
        }
        Err(e) => panic!("setpriv: {e}"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("6 passed"),
        "as nobody: {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
