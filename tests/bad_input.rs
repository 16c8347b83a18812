//! Bad input: one line on stderr, non-zero exit, nothing changed on disk.
//! Where the kernel has the same rule, its refusal is checked too.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Runs `rovl mount -o OPTS MNT` (daemon mode) expecting a clean refusal,
/// and checks the trees under `watch` did not change. Returns stderr.
fn expect_refusal(opts: &str, mnt: &Path, watch: &[&Path]) -> String {
    let before: Vec<BTreeMap<PathBuf, Node>> = watch.iter().map(snapshot).collect();
    let r = run_rovl(&[
        "mount".as_ref(),
        "-o".as_ref(),
        opts.as_ref(),
        mnt.as_os_str(),
    ]);
    // A wrongly successful mount must not outlive the test.
    let mounted = is_mounted(mnt);
    if mounted {
        let _ = unmount_path(mnt);
    }
    assert!(r.exited, "rovl hung on bad input {opts:?}");
    assert!(!mounted, "bad input {opts:?} was mounted");
    assert!(!r.status.success(), "bad input {opts:?} exited 0");
    let err = r.stderr.trim_end();
    assert_eq!(
        err.lines().count(),
        1,
        "want exactly one stderr line for {opts:?}, got: {:?}",
        r.stderr
    );
    assert!(!err.trim().is_empty());
    for (w, b) in watch.iter().zip(&before) {
        assert_same_tree(b, &snapshot(w), &format!("{w:?} after {opts:?}"));
    }
    r.stderr
}

/// The kernel also refuses `opts` (skipped silently if no kernel overlay).
fn kernel_refuses(opts: &str, mnt: &Path) {
    if !require_kernel_overlay() {
        return;
    }
    match kernel_mount(opts, mnt) {
        Ok(()) => {
            let _ = unmount_path(mnt);
            panic!("kernel accepted {opts:?}");
        }
        Err(e) => assert!(e.raw_os_error().is_some()),
    }
}

fn layers() -> Layers {
    let l = Layers::new(2);
    write(l.l(0, "a"), "a");
    write(l.l(1, "b"), "b");
    write(l.u("c"), "c");
    l
}

#[test]
fn missing_layer() {
    if !require_root_fuse() {
        return;
    }
    let l = layers();
    let missing = l.root().join("missing");
    let opts = format!(
        "lowerdir={}:{},upperdir={},workdir={}",
        l.lower(0).display(),
        missing.display(),
        l.upper.display(),
        l.work.display()
    );
    let err = expect_refusal(&opts, &l.merged, &[&l.root()]);
    assert!(err.contains("missing"), "error names the path: {err}");
    assert!(!l.work.join("work").exists());
    kernel_refuses(&opts, &l.merged);
}

#[test]
fn missing_upper() {
    if !require_root_fuse() {
        return;
    }
    let l = layers();
    let opts = format!(
        "{},upperdir={},workdir={}",
        l.lowerdir_opt(),
        l.root().join("nope").display(),
        l.work.display()
    );
    expect_refusal(&opts, &l.merged, &[&l.root()]);
    assert!(!l.root().join("nope").exists());
    kernel_refuses(&opts, &l.merged);
}

#[test]
fn non_directory_layer() {
    if !require_root_fuse() {
        return;
    }
    let l = layers();
    let file = l.root().join("file");
    write(&file, "not a dir");
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        file.display(),
        l.upper.display(),
        l.work.display()
    );
    expect_refusal(&opts, &l.merged, &[&l.root()]);
    kernel_refuses(&opts, &l.merged);
    // Same for a file given as upperdir.
    let opts = format!(
        "{},upperdir={},workdir={}",
        l.lowerdir_opt(),
        file.display(),
        l.work.display()
    );
    expect_refusal(&opts, &l.merged, &[&l.root()]);
}

#[test]
fn upper_and_work_on_different_filesystems() {
    if !require_root_fuse() {
        return;
    }
    let l = layers();
    let t = TmpfsMount::start(&l.root().join("tmpfs")).expect("mount tmpfs");
    let work = t.mountpoint.join("work");
    mkdir(&work);
    let opts = format!(
        "{},upperdir={},workdir={}",
        l.lowerdir_opt(),
        l.upper.display(),
        work.display()
    );
    // Watch the layers and the tmpfs separately (snapshot does not cross
    // into the tmpfs by itself).
    expect_refusal(&opts, &l.merged, &[&l.upper, &l.lowers[0], &work]);
    assert!(!work.join("work").exists());
    kernel_refuses(&opts, &l.merged);
}

#[test]
fn workdir_inside_upperdir() {
    if !require_root_fuse() {
        return;
    }
    let l = layers();
    let w = l.u("w");
    mkdir(&w);
    let opts = format!(
        "{},upperdir={},workdir={}",
        l.lowerdir_opt(),
        l.upper.display(),
        w.display()
    );
    expect_refusal(&opts, &l.merged, &[&l.root()]);
    assert!(!w.join("work").exists());
    kernel_refuses(&opts, &l.merged);
}

#[test]
fn upperdir_inside_workdir() {
    if !require_root_fuse() {
        return;
    }
    let l = layers();
    let u = l.work.join("u");
    mkdir(&u);
    let opts = format!(
        "{},upperdir={},workdir={}",
        l.lowerdir_opt(),
        u.display(),
        l.work.display()
    );
    expect_refusal(&opts, &l.merged, &[&l.root()]);
    assert!(!l.work.join("work").exists());
    kernel_refuses(&opts, &l.merged);
}

#[test]
fn workdir_same_as_upperdir() {
    if !require_root_fuse() {
        return;
    }
    let l = layers();
    let opts = format!(
        "{},upperdir={},workdir={}",
        l.lowerdir_opt(),
        l.upper.display(),
        l.upper.display()
    );
    expect_refusal(&opts, &l.merged, &[&l.root()]);
    kernel_refuses(&opts, &l.merged);
}

#[test]
fn lower_same_as_upper() {
    if !require_root_fuse() {
        return;
    }
    let l = layers();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        l.upper.display(),
        l.upper.display(),
        l.work.display()
    );
    expect_refusal(&opts, &l.merged, &[&l.root()]);
    kernel_refuses(&opts, &l.merged);
}

#[test]
fn layer_inside_merged() {
    if !require_root_fuse() {
        return;
    }
    let l = layers();
    let inner = l.m("low");
    write(inner.join("x"), "x");
    let opts = format!(
        "lowerdir={}:{},upperdir={},workdir={}",
        inner.display(),
        l.lower(0).display(),
        l.upper.display(),
        l.work.display()
    );
    expect_refusal(&opts, &l.merged, &[&l.root()]);
    // Upper inside the mountpoint, too.
    let up = l.m("up");
    mkdir(&up);
    let opts = format!(
        "{},upperdir={},workdir={}",
        l.lowerdir_opt(),
        up.display(),
        l.work.display()
    );
    expect_refusal(&opts, &l.merged, &[&l.root()]);
}

#[test]
fn empty_lowerdir() {
    if !require_root_fuse() {
        return;
    }
    let l = layers();
    for opts in [
        format!(
            "lowerdir=,upperdir={},workdir={}",
            l.upper.display(),
            l.work.display()
        ),
        format!(
            "upperdir={},workdir={}",
            l.upper.display(),
            l.work.display()
        ),
    ] {
        expect_refusal(&opts, &l.merged, &[&l.root()]);
        kernel_refuses(&opts, &l.merged);
    }
}

#[test]
fn upperdir_without_workdir() {
    if !require_root_fuse() {
        return;
    }
    let l = layers();
    let opts = format!("{},upperdir={}", l.lowerdir_opt(), l.upper.display());
    expect_refusal(&opts, &l.merged, &[&l.root()]);
    kernel_refuses(&opts, &l.merged);
}

#[test]
fn unknown_option() {
    if !require_root_fuse() {
        return;
    }
    let l = layers();
    let opts = format!("{},bogus_opt=1", l.opts());
    let err = expect_refusal(&opts, &l.merged, &[&l.root()]);
    assert!(err.contains("bogus_opt"), "error names the option: {err}");
    assert!(!l.work.join("work").exists());
    kernel_refuses(&opts, &l.merged);
}

#[test]
fn duplicate_lower_layer() {
    if !require_root_fuse() {
        return;
    }
    let l = layers();
    let opts = format!(
        "lowerdir={}:{},upperdir={},workdir={}",
        l.lower(0).display(),
        l.lower(0).display(),
        l.upper.display(),
        l.work.display()
    );
    expect_refusal(&opts, &l.merged, &[&l.root()]);
    kernel_refuses(&opts, &l.merged);
}

#[test]
fn missing_mountpoint() {
    if !require_root_fuse() {
        return;
    }
    let l = layers();
    let mnt = l.root().join("no-such-mountpoint");
    expect_refusal(&l.opts(), &mnt, &[&l.root()]);
    assert!(!mnt.exists());
    assert!(!l.work.join("work").exists());
}

#[test]
fn busy_workdir() {
    if !require_root_fuse() {
        return;
    }
    let l = layers();
    let m = RovlMount::start(&l.opts(), &l.merged).expect("first mount");
    let second = l.root().join("merged2");
    mkdir(&second);
    // The first mount is live: watch the layer dirs, not its mountpoint.
    let watch: Vec<&Path> = vec![&l.lowers[0], &l.lowers[1], &l.upper, &l.work, &second];
    expect_refusal(&l.opts(), &second, &watch);
    // The first mount still works.
    assert_eq!(read_string(l.m("a")), "a");
    assert!(m.unmount().success());
}

#[test]
fn failed_mount_keeps_mountpoint_contents() {
    // A refused mount leaves what was in MERGED alone and never hides it.
    if !require_root_fuse() {
        return;
    }
    let l = layers();
    write(l.m("precious"), "keep me");
    let opts = format!("{},nosuchoption", l.opts());
    expect_refusal(&opts, &l.merged, &[&l.root()]);
    assert_eq!(read_string(l.m("precious")), "keep me");
}

#[test]
fn cli_without_arguments_fails() {
    if !require_root_fuse() {
        return;
    }
    let r = run_rovl::<&str>(&[]);
    assert!(r.exited);
    assert!(!r.status.success());
    let r = run_rovl(&["mount"]);
    assert!(r.exited);
    assert!(!r.status.success());
    let r = run_rovl(&["umount", "/tmp/definitely-not-a-rovl-mount-xyz"]);
    assert!(r.exited);
    assert!(!r.status.success());
}

/// Without `/dev/fuse` (a private mount namespace with an empty `/dev`),
/// one line names the fix, and the workdir is as it was.
#[test]
fn no_dev_fuse() {
    if !require_root_fuse() {
        return;
    }
    let l = layers();
    let script = format!(
        "mount -t tmpfs tmpfs /dev && exec {} mount -f -o {} {}",
        rovl_bin().display(),
        l.opts(),
        l.merged.display()
    );
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("rovl: cannot mount") && last.contains("modprobe fuse"),
        "{err}"
    );
    assert!(!l.work.join("work").exists(), "W/work left behind");
}
