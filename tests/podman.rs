//! podman with rovl as containers/storage's `mount_program`, rootful and
//! rootless, against fuse-overlayfs and the kernel driver: a build of five
//! layers that delete, rename and replace, a container that changes files,
//! a commit, a run of the committed image, `--uidmap` and `--userns=keep-id`.
//! The scenario is `tests/podman/scenario.sh`; it prints the trees the
//! containers see, compared here.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The scripts, copied into each test's dir (a test user must read them).
const SCRIPTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/podman");

/// podman, runc, busybox and fuse-overlayfs, or a skip.
fn require_podman() -> Option<PathBuf> {
    for p in ["podman", "runc", "busybox"] {
        require_program(p)?;
    }
    require_program("fuse-overlayfs")
}

/// A dir any user can read, removed with what is mounted under it.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix("rovl-podman-")
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Scratch { dir }
    }

    fn sub(&self, name: &str, owner: Option<u32>) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::create_dir(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        if let Some(uid) = owner {
            std::os::unix::fs::chown(&p, Some(uid), Some(uid)).unwrap();
        }
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // containers/storage bind-mounts its store on itself; a failed
        // scenario may leave a container's mount too.
        let mut under: Vec<PathBuf> = mount_points()
            .into_iter()
            .filter(|m| m.starts_with(self.dir.path()))
            .collect();
        under.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        for m in under {
            let _ = umount2(&m, libc::MNT_DETACH);
        }
    }
}

/// Runs the scenario with `driver` ("native" or a mount program) in a
/// fresh dir; rootless as `user`, in a private mount namespace with a 0666
/// `/dev/fuse` as distributions ship it.
fn scenario(scratch: &Scratch, tag: &str, driver: &Path, user: Option<&TestUser>) -> String {
    let dir = scratch.sub(tag, user.map(|u| u.uid));
    let script = copy_scripts(&dir).join("scenario.sh");
    let out = match user {
        None => Command::new("bash")
            .arg(&script)
            .arg(&dir)
            .arg(driver)
            .current_dir(&dir)
            .output()
            .unwrap(),
        Some(u) => {
            let fuse = dir.join("fuse-node");
            let inner = format!(
                "set -e; mknod -m 666 {fuse} c 10 229; mount --bind {fuse} /dev/fuse; \
                 exec runuser -u {user} -- env HOME={dir} bash {script} {dir} {driver} rootless",
                fuse = fuse.display(),
                user = u.name,
                dir = dir.display(),
                script = script.display(),
                driver = driver.display(),
            );
            Command::new("unshare")
                .args(["--mount", "--propagation", "private", "bash", "-c", &inner])
                .current_dir(&dir)
                .output()
                .unwrap()
        }
    };
    script_stdout(out, tag)
}

/// A script's stdout; its failure fails the test, with both outputs.
fn script_stdout(out: std::process::Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what}: script failed ({}):\n{}\n{stdout}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The podman scripts in `dir`; returns `dir`.
fn copy_scripts(dir: &Path) -> &Path {
    for s in ["setup.sh", "scenario.sh", "commit.sh"] {
        std::fs::copy(Path::new(SCRIPTS).join(s), dir.join(s)).unwrap();
    }
    dir
}

/// The rovl binary where a test user can run it.
fn rovl_copy(scratch: &Scratch) -> PathBuf {
    let bin = scratch.sub("bin", None).join("rovl");
    std::fs::copy(rovl_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

/// The section `name` of a scenario's output.
fn section<'a>(out: &'a str, name: &str) -> &'a str {
    let start = out
        .find(&format!("== {name}\n"))
        .unwrap_or_else(|| panic!("no section {name} in:\n{out}"));
    let rest = &out[start + name.len() + 4..];
    &rest[..rest.find("\n== ").map_or(rest.len(), |e| e + 1)]
}

/// What every driver must show, whatever the reference says.
fn assert_expected(out: &str) {
    assert!(
        !out.contains("/.wh.") && !out.contains("/.wh..wh..opq"),
        "{out}"
    );
    let build = section(out, "build");
    for present in [
        "/opt/data/g f",
        "/opt/moved/f3 f",
        "/etc/skel/y f",
        "/usr/share/doc/pkg1/z f",
        "/usr/share/doc/pkg2/new f",
        "/hello f",
    ] {
        assert!(build.contains(present), "build lacks {present}:\n{build}");
    }
    for gone in [
        "/opt/data/f1 ",
        "/opt/moved/f2 ",
        "/one ",
        "/etc/skel/sub",
        "/usr/share/doc/pkg1/a",
        "/usr/share/doc/pkg2/b",
        "/hl ",
    ] {
        assert!(!build.contains(gone), "build still has {gone}:\n{build}");
    }
    let commit = section(out, "commit");
    assert!(commit.contains("/newdir/z f"), "{commit}");
    for gone in ["/hello ", "/opt/moved"] {
        assert!(!commit.contains(gone), "commit still has {gone}:\n{commit}");
    }
}

#[test]
fn rootful() {
    if !require_root_fuse() || !require_kernel_overlay() {
        return;
    }
    let Some(fuse_overlayfs) = require_podman() else {
        return;
    };
    let scratch = Scratch::new();
    let rovl = rovl_copy(&scratch);
    let ours = scenario(&scratch, "rovl", &rovl, None);
    assert_expected(&ours);
    let kernel = scenario(&scratch, "kernel", Path::new("native"), None);
    assert_eq!(ours, kernel, "rovl vs the kernel driver");
    // Under --uidmap podman 4.3 gives a mount program idmapped lowers and
    // uidmapping= both; fuse-overlayfs 1.10 maps their ids twice (lower
    // files show 65534), rovl as the kernel: compared without that step.
    let reference = scenario(&scratch, "fuse-overlayfs", &fuse_overlayfs, None);
    for s in ["build", "commit"] {
        assert_eq!(
            section(&ours, s),
            section(&reference, s),
            "{s}: rovl vs fuse-overlayfs"
        );
    }
    assert!(
        section(&ours, "uidmap").contains("\n/bin/busybox f a03e135f 0:0\n"),
        "{ours}"
    );
}

#[test]
fn rootless() {
    if !require_root_fuse() {
        return;
    }
    let Some(fuse_overlayfs) = require_podman() else {
        return;
    };
    if require_program("newuidmap").is_none() {
        return;
    }
    let scratch = Scratch::new();
    let Some(user) = TestUser::new() else {
        return;
    };
    let rovl = rovl_copy(&scratch);
    let ours = scenario(&scratch, "rovl", &rovl, Some(&user));
    assert_expected(&ours);
    // keep-id: the container runs as the user, and writes as it.
    let keep = section(&ours, "keep-id");
    assert!(keep.starts_with(&format!("{}\nk\n", user.uid)), "{keep}");
    assert!(
        keep.contains(&format!("/tmp/k f ccc87e72 {0}:{0}", user.uid)),
        "{keep}"
    );
    let reference = scenario(&scratch, "fuse-overlayfs", &fuse_overlayfs, Some(&user));
    assert_eq!(ours, reference, "rovl vs fuse-overlayfs, rootless");
}

/// The layer `rovl diff` makes of a container's upper dir is the one
/// `podman commit` writes, entry for entry; both apply to the same tree;
/// an image whose top layer is rovl's loads and runs, showing what the
/// committed image shows.
#[test]
fn diff_matches_podman_commit() {
    if !require_root_fuse() || !require_kernel_overlay() {
        return;
    }
    if require_podman().is_none() || require_program("python3").is_none() {
        return;
    }
    let scratch = Scratch::new();
    let dir = scratch.sub("commit", None);
    copy_scripts(&dir);
    let out = Command::new("bash")
        .arg(dir.join("commit.sh"))
        .arg(&dir)
        .arg(rovl_bin())
        .current_dir(&dir)
        .output()
        .unwrap();
    let stdout = script_stdout(out, "commit.sh");
    let ours = section(&stdout, "rovl layer");
    assert_eq!(
        section(&stdout, "podman layer"),
        ours,
        "the layers' entries"
    );
    for e in [
        " opt/data/.wh.f1\n",
        " home/.wh.u\n",
        " usr/share/doc/pkg1/.wh..wh..opq\n",
        " newdir/n link to newdir/hard\n",
        "1001/1001 0   home/moved/\n",
    ] {
        assert!(ours.contains(e), "{e:?} not in:\n{ours}");
    }
    assert_eq!(
        section(&stdout, "podman applied"),
        section(&stdout, "rovl applied"),
        "the applied layers"
    );
    let image = section(&stdout, "rovl image");
    assert_eq!(
        section(&stdout, "committed image"),
        image,
        "the images' trees"
    );
    assert!(image.contains("\n/usr/share/doc/pkg1/new f "), "{image}");
    assert!(!image.contains("/opt/data/f1 "), "{image}");
}
