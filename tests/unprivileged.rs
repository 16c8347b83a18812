//! rovl without root: a plain user mounting through `fusermount3`, and
//! mapped root in a user namespace (how rootless podman runs it), where
//! `trusted.*` cannot be written and rovl switches to the kernel's
//! `userxattr` layout, checked against the kernel mounted with `userxattr`
//! in the same namespace. Each runs in a private mount namespace with a
//! 0666 `/dev/fuse`, as distributions ship it.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A test tree owned by `user`, with the rovl binary where it can run it.
fn setup(user: &TestUser) -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::Builder::new()
        .prefix("rovl-unpriv-")
        .tempdir_in("/tmp")
        .unwrap();
    let root = t.path();
    for d in ["l/d", "u", "w", "m", "ku", "kw", "km"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("l/f"), "f").unwrap();
    std::fs::write(root.join("l/d/a"), "a").unwrap();
    let bin = root.join("rovl");
    std::fs::copy(rovl_bin(), &bin).unwrap();
    let st = Command::new("chown")
        .args(["-R", &format!("{0}:{0}", user.uid)])
        .arg(root)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
    // A mountpoint the user may not mount on (root's, 0755).
    std::fs::create_dir(root.join("rootowned")).unwrap();
    (t, bin)
}

/// Runs `script` as `user` in a private mount namespace with a 0666
/// `/dev/fuse`; `userns` adds a user namespace in which the user is root.
fn run_as(user: &TestUser, root: &Path, userns: bool, script: &str) -> (bool, String, String) {
    run_as_after(user, root, userns, "true", script)
}

/// `run_as`, with `setup` run as root in the namespace first.
fn run_as_after(
    user: &TestUser,
    root: &Path,
    userns: bool,
    setup: &str,
    script: &str,
) -> (bool, String, String) {
    let fuse = root.join("fuse-node");
    let inner_cmd = if userns {
        format!(
            "runuser -u {} -- unshare --map-root-user --mount bash -c {}",
            user.name,
            shell_quote(script)
        )
    } else {
        format!(
            "runuser -u {} -- bash -c {}",
            user.name,
            shell_quote(script)
        )
    };
    let outer = format!(
        "set -e; mknod -m 666 {f} c 10 229; mount --bind {f} /dev/fuse; {setup}; cd {r}; {inner_cmd}",
        f = fuse.display(),
        r = root.display(),
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "bash", "-c", &outer])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[test]
fn plain_user_mounts_through_fusermount3() {
    if !require_root_fuse() || require_program("fusermount3").is_none() {
        return;
    }
    let Some(user) = TestUser::new() else {
        return;
    };
    let (t, _bin) = setup(&user);
    let script = r#"
set -e
R=$PWD
./rovl mount -o lowerdir=$R/l,upperdir=$R/u,workdir=$R/w $R/m
grep " $R/m " /proc/self/mounts | cut -d" " -f1,3
cat m/f; echo
echo new > m/n
rm m/d/a
stat -c "%F %t:%T" u/d/a
getfattr --absolute-names -d -m "^trusted" u/d 2>/dev/null | grep -c trusted || true
./rovl umount $R/m
grep -c " $R/m " /proc/self/mounts || true
# A mount that fails (the mountpoint is not the user's) leaves no W/work.
mkdir -p w2
if ./rovl mount -o lowerdir=$R/l,upperdir=$R/u,workdir=$R/w2 $R/rootowned 2>err; then echo mounted; fi
test -e w2/work && echo "w2/work left" || echo "w2 clean"
tail -n 1 err
"#;
    let (ok, out, err) = run_as(&user, t.path(), false, script);
    assert!(ok, "script failed:\n{out}\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "rovl fuse.rovl", "{out}\n{err}");
    assert_eq!(lines[1], "f");
    assert_eq!(lines[2], "character special file 0:0", "a whiteout: {out}");
    assert_eq!(lines[3], "0", "no trusted.* xattrs written: {out}");
    assert_eq!(lines[4], "0", "unmounted through fusermount3: {out}");
    assert_eq!(lines[5], "w2 clean", "{out}\n{err}");
    assert!(
        lines[6].starts_with("rovl: cannot mount"),
        "one clear line: {out}"
    );
    assert_eq!(
        std::fs::read_to_string(t.path().join("u/n")).unwrap(),
        "new\n"
    );
    drop(user);
}

/// A user who cannot open `/dev/fuse` (0600, as on some machines) gets one
/// line that names it and says what to do, and nothing changes on disk.
#[test]
fn no_access_to_dev_fuse_says_what_to_do() {
    if !require_root_fuse() || require_program("fusermount3").is_none() {
        return;
    }
    let Some(user) = TestUser::new() else {
        return;
    };
    let (t, _bin) = setup(&user);
    let node = t.path().join("fuse-node");
    let script = r#"
R=$PWD
./rovl mount -o lowerdir=$R/l,upperdir=$R/u,workdir=$R/w $R/m 2>err && echo mounted
cat err
test -e w/work && echo "w/work left" || echo "w clean"
"#;
    let (_, out, err) = run_as_after(
        &user,
        t.path(),
        false,
        &format!("chmod 600 {}", node.display()),
        script,
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines.len(),
        2,
        "one line of error, then the check: {out}\n{err}"
    );
    assert!(
        lines[0].starts_with("rovl: cannot mount")
            && lines[0].contains("/dev/fuse")
            && lines[0].contains("0666"),
        "{out}"
    );
    assert_eq!(lines[1], "w clean", "{out}");
    drop(user);
}

/// The same operations on rovl and on the kernel (`userxattr`) as mapped
/// root: the merged trees and the upper layers' shapes and overlay xattrs
/// agree, and rovl picked the userxattr layout by itself.
#[test]
fn user_namespace_switches_to_userxattr_like_the_kernel() {
    if !require_root_fuse() || !require_kernel_overlay() {
        return;
    }
    if require_program("getfattr").is_none() {
        return;
    }
    let Some(user) = TestUser::new() else {
        return;
    };
    let (t, _bin) = setup(&user);
    let script = r#"
set -e
R=$PWD
./rovl mount -o lowerdir=$R/l,upperdir=$R/u,workdir=$R/w $R/m 2>rovl.err
mount -t overlay overlay -o lowerdir=$R/l,upperdir=$R/ku,workdir=$R/kw,userxattr $R/km
for M in m km; do
  rm -r $M/d; mkdir $M/d; echo n > $M/d/n; rm $M/f; mkdir -p $M/e/f; echo g > $M/e/f/g
done
for M in m km; do (cd $M && find . | sort | while read p; do echo "$p $(stat -c %F "$p")"; done) > $M.tree; done
for U in u ku; do (cd $U && find . | sort | while read p; do echo "$p $(stat -c "%F %t:%T" "$p") $(getfattr --absolute-names -d -m "^user.overlay.opaque" "$p" 2>/dev/null | grep = || true)"; done) > $U.upper; done
./rovl umount $R/m
umount $R/km
cat rovl.err
"#;
    let (ok, out, err) = run_as(&user, t.path(), true, script);
    assert!(ok, "script failed:\n{out}\n{err}");
    let read = |n: &str| std::fs::read_to_string(t.path().join(n)).unwrap();
    assert_eq!(read("m.tree"), read("km.tree"), "merged trees");
    assert_eq!(read("u.upper"), read("ku.upper"), "upper layers");
    assert!(
        read("u.upper").contains("user.overlay.opaque=\"y\""),
        "{}",
        read("u.upper")
    );
    assert!(
        out.contains("userxattr"),
        "one log line on the switch: {out}"
    );
    drop(user);
}

/// An fstab line with `user,noauto`: the user mounts and unmounts it with
/// mount(8) and umount(8), which run `mount.fuse3` and rovl as the user.
/// fstab and `/usr/local/bin` are replaced inside the test's namespace only.
#[test]
fn fstab_user_mount() {
    if !require_root_fuse() || require_program("mount.fuse3").is_none() {
        return;
    }
    let Some(user) = TestUser::new() else {
        return;
    };
    let (t, bin) = setup(&user);
    let r = t.path();
    let bindir = r.join("bindir");
    std::fs::create_dir(&bindir).unwrap();
    std::fs::copy(&bin, bindir.join("rovl")).unwrap();
    let mut fstab = std::fs::read_to_string("/etc/fstab").unwrap_or_default();
    fstab.push_str(&format!(
        "\nrovl {r}/m fuse.rovl lowerdir={r}/l,upperdir={r}/u,workdir={r}/w,user,noauto 0 0\n",
        r = r.display()
    ));
    std::fs::write(r.join("fstab"), fstab).unwrap();
    let setup_cmd = format!(
        "mount --bind {r}/fstab /etc/fstab; mount --bind {b} /usr/local/bin",
        r = r.display(),
        b = bindir.display()
    );
    let script = format!(
        "set -e; cd /; mount {r}/m; grep \" {r}/m \" /proc/self/mounts | cut -d\" \" -f1,3; \
         cat {r}/m/f; echo; umount {r}/m; grep -c \" {r}/m \" /proc/self/mounts || true",
        r = r.display()
    );
    let (ok, out, err) = run_as_after(&user, r, false, &setup_cmd, &script);
    assert!(ok, "script failed:\n{out}\n{err}");
    assert_eq!(out, "rovl fuse.rovl\nf\n0\n", "{err}");
    drop(user);
}
