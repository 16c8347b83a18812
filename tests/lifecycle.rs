//! Mount/unmount lifecycle of the `rovl` binary and its command-line forms.

mod common;

use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// PIDs of processes whose command line mentions `p` (our daemons: every
/// test uses a unique temp path).
fn pids_mentioning(p: &Path) -> Vec<u32> {
    let needle = p.as_os_str().as_encoded_bytes();
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let pid: u32 = match e.file_name().to_str().and_then(|s| s.parse().ok()) {
            Some(p) => p,
            None => continue,
        };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            if cmd.windows(needle.len()).any(|w| w == needle) {
                v.push(pid);
            }
        }
    }
    v
}

/// Waits (bounded) until no process mentions `p`; true if none is left.
fn daemon_gone(p: &Path) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if pids_mentioning(p).is_empty() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn populated() -> Layers {
    let l = Layers::new(2);
    write(l.l(0, "top"), "t");
    write(l.l(1, "bottom"), "b");
    write(l.u("up"), "u");
    l
}

fn rovl_ok(args: &[&std::ffi::OsStr]) {
    let r = run_rovl(args);
    assert!(
        r.exited,
        "rovl {args:?} did not exit (killed); stderr: {}",
        r.stderr
    );
    assert!(
        r.status.success(),
        "rovl {args:?}: {}; stderr: {}",
        r.status,
        r.stderr
    );
}

#[test]
fn daemon_mode_returns_once_mounted() {
    if !require_root_fuse() {
        return;
    }
    let l = populated();
    let _g = PathGuard(l.merged.clone());
    let opts = l.opts();
    rovl_ok(&[
        "mount".as_ref(),
        "-o".as_ref(),
        opts.as_ref(),
        l.merged.as_os_str(),
    ]);
    // No polling: the mount must be usable as soon as the command returns.
    assert!(is_mounted(&l.merged));
    assert_eq!(names(&l.merged), vec!["bottom", "top", "up"]);
    assert_eq!(read_string(l.m("bottom")), "b");
    write(l.m("new"), "n");
    assert_eq!(read_string(l.u("new")), "n");

    rovl_ok(&["umount".as_ref(), l.merged.as_os_str()]);
    assert!(!is_mounted(&l.merged));
    assert!(
        daemon_gone(&l.merged),
        "daemon still running after rovl umount"
    );
}

#[test]
fn foreground_exits_0_after_rovl_umount() {
    if !require_root_fuse() {
        return;
    }
    let l = populated();
    let m = RovlMount::start(&l.opts(), &l.merged).expect("mount");
    assert_eq!(names(&l.merged), vec!["bottom", "top", "up"]);
    // Still serving: the foreground process has not exited.
    assert!(m.child.id() > 0);
    rovl_ok(&["umount".as_ref(), l.merged.as_os_str()]);
    let (st, exited) = m.wait_exit();
    assert!(exited, "daemon did not exit after rovl umount");
    assert!(st.success(), "daemon exit status {st}");
    assert!(!is_mounted(&l.merged));
}

#[test]
fn foreground_exits_0_after_plain_umount() {
    if !require_root_fuse() {
        return;
    }
    let l = populated();
    let m = RovlMount::start(&l.opts(), &l.merged).expect("mount");
    assert_eq!(read_string(l.m("top")), "t");
    umount2(&l.merged, 0).expect("umount");
    let (st, exited) = m.wait_exit();
    assert!(exited, "daemon did not exit after umount");
    assert!(st.success(), "daemon exit status {st}");
}

fn exits_cleanly_on(sig: libc::c_int) {
    let l = populated();
    let mut m = RovlMount::start(&l.opts(), &l.merged).expect("mount");
    assert_eq!(read_string(l.m("up")), "u");
    assert!(m.child.try_wait().unwrap().is_none());
    signal(&m.child, sig);
    let mnt = m.mountpoint.clone();
    let (st, exited) = m.wait_exit();
    assert!(exited, "daemon did not exit on signal {sig}");
    assert!(st.success(), "daemon exit status {st} on signal {sig}");
    assert!(!is_mounted(&mnt));
}

#[test]
fn foreground_exits_0_on_sigterm() {
    if !require_root_fuse() {
        return;
    }
    exits_cleanly_on(libc::SIGTERM);
}

#[test]
fn foreground_exits_0_on_sigint() {
    if !require_root_fuse() {
        return;
    }
    exits_cleanly_on(libc::SIGINT);
}

#[test]
fn proc_mounts_shows_fuse_rovl() {
    if !require_root_fuse() {
        return;
    }
    let l = populated();
    let m = RovlMount::start(&l.opts(), &l.merged).expect("mount");
    let info = mount_at(&l.merged).unwrap();
    assert_eq!(info.fstype, "fuse.rovl");
    assert_eq!(info.source, "rovl");
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let line = mounts
        .lines()
        .find(|ln| ln.split(' ').nth(1) == Some(l.merged.to_str().unwrap()))
        .expect("merged in /proc/mounts");
    let f: Vec<&str> = line.split(' ').collect();
    assert_eq!((f[0], f[2]), ("rovl", "fuse.rovl"), "{line}");
    assert!(m.unmount().success());
}

#[test]
fn mount_fuse3_style_source_merged_opts() {
    if !require_root_fuse() {
        return;
    }
    let l = populated();
    let _g = PathGuard(l.merged.clone());
    let opts = l.opts();
    rovl_ok(&[
        "mysource".as_ref(),
        l.merged.as_os_str(),
        "-o".as_ref(),
        opts.as_ref(),
    ]);
    assert!(is_mounted(&l.merged));
    let info = mount_at(&l.merged).unwrap();
    assert_eq!(info.source, "mysource");
    assert_eq!(info.fstype, "fuse.rovl");
    assert_eq!(names(&l.merged), vec!["bottom", "top", "up"]);
    rovl_ok(&["umount".as_ref(), l.merged.as_os_str()]);
    assert!(!is_mounted(&l.merged));
    assert!(daemon_gone(&l.merged));
}

#[test]
fn fuse_overlayfs_style_opts_merged() {
    if !require_root_fuse() {
        return;
    }
    let l = populated();
    let _g = PathGuard(l.merged.clone());
    let opts = l.opts();
    rovl_ok(&["-o".as_ref(), opts.as_ref(), l.merged.as_os_str()]);
    assert!(is_mounted(&l.merged));
    assert_eq!(mount_at(&l.merged).unwrap().fstype, "fuse.rovl");
    assert_eq!(names(&l.merged), vec!["bottom", "top", "up"]);
    unmount_path(&l.merged).unwrap();
    assert!(daemon_gone(&l.merged));
}

#[test]
fn relative_paths_against_cwd() {
    if !require_root_fuse() {
        return;
    }
    let l = populated();
    let _g = PathGuard(l.merged.clone());
    let out = tempfile::NamedTempFile::new_in("/tmp").unwrap();
    let mut child = rovl_cmd()
        .current_dir(l.root())
        .args([
            "mount",
            "-o",
            "lowerdir=l0:l1,upperdir=upper,workdir=work",
            "merged",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(out.reopen().unwrap())
        .spawn()
        .unwrap();
    let (st, exited) = wait_bounded(&mut child, Duration::from_secs(10));
    let err = std::fs::read_to_string(out.path()).unwrap_or_default();
    assert!(exited && st.success(), "{st}: {err}");
    assert!(is_mounted(&l.merged));
    assert_eq!(names(&l.merged), vec!["bottom", "top", "up"]);
    write(l.m("x"), "x");
    assert_eq!(read_string(l.u("x")), "x");
    unmount_path(&l.merged).unwrap();
}

#[test]
fn generic_and_own_options_accepted() {
    if !require_root_fuse() {
        return;
    }
    let l = populated();
    let opts = format!(
        "{},nodev,nosuid,noexec,noatime,default_permissions,threads=2,cache_entries=16",
        l.opts()
    );
    let m = RovlMount::start(&opts, &l.merged).expect("mount with options");
    let info = mount_at(&l.merged).unwrap();
    for flag in ["nodev", "nosuid", "noexec", "noatime"] {
        assert!(
            info.options.split(',').any(|o| o == flag),
            "{flag} not in {}",
            info.options
        );
    }
    assert_eq!(read_string(l.m("top")), "t");
    assert!(m.unmount().success());
}

#[test]
fn many_lower_layers() {
    if !require_root_fuse() {
        return;
    }
    let l = Layers::new(120);
    for i in 0..120 {
        write(l.l(i, &format!("f{i}")), format!("{i}"));
        write(l.l(i, "common"), format!("{i}"));
    }
    let m = RovlMount::start(&l.opts(), &l.merged).expect("mount 120 lowers");
    assert_eq!(names(&l.merged).len(), 121);
    assert_eq!(read_string(l.m("common")), "0");
    assert_eq!(read_string(l.m("f119")), "119");
    assert!(m.unmount().success());
}

/// `\:` and `\,` escapes in lowerdir, checked on the kernel too.
fn escaped_layer_names(b: Backend) {
    let l = Layers::new(0);
    let a = l.root().join("a:b");
    let c = l.root().join("c,d");
    write(a.join("f1"), "1");
    write(c.join("f2"), "2");
    let esc = |p: &Path| {
        p.display()
            .to_string()
            .replace(':', "\\:")
            .replace(',', "\\,")
    };
    let opts = format!(
        "lowerdir={}:{},upperdir={},workdir={}",
        esc(&a),
        esc(&c),
        l.upper.display(),
        l.work.display()
    );
    let m = AnyMount::start(b, &opts, &l.merged).expect("mount escaped names");
    assert_eq!(names(&l.merged), vec!["f1", "f2"]);
    m.unmount();
}

both_backends!(escaped_layer_names, remount_sees_previous_changes);

fn remount_sees_previous_changes(b: Backend) {
    let l = populated();
    let m = mount(b, &l);
    write(l.m("top"), "changed");
    std::fs::remove_file(l.m("bottom")).unwrap();
    mkdir(l.m("newdir"));
    m.unmount();
    assert!(!is_mounted(&l.merged));
    let m = mount(b, &l);
    assert_eq!(names(&l.merged), vec!["newdir", "top", "up"]);
    assert_eq!(read_string(l.m("top")), "changed");
    m.unmount();
}

#[test]
fn kernel_can_mount_what_rovl_wrote() {
    // On-disk compatibility: changes made through rovl read back the same
    // through kernel overlayfs.
    if !require_root_fuse() || !require_kernel_overlay() {
        return;
    }
    let l = populated();
    write(l.l(1, "d/x"), "x");
    let m = RovlMount::start(&l.opts(), &l.merged).expect("mount");
    write(l.m("top"), "via rovl");
    std::fs::remove_file(l.m("bottom")).unwrap();
    std::fs::remove_file(l.m("d/x")).unwrap();
    std::fs::remove_dir(l.m("d")).unwrap();
    mkdir(l.m("d"));
    write(l.m("d/y"), "y");
    let rovl_view = snapshot_merged(&l);
    assert!(m.unmount().success());
    let k = KernelMount::start(&l.opts(), &l.merged).expect("kernel mount");
    let kernel_view = snapshot_merged(&l);
    drop(k);
    assert_eq!(rovl_view, kernel_view);
    assert_eq!(
        rovl_view,
        vec![
            ("d".to_string(), None),
            ("d/y".to_string(), Some("y".to_string())),
            ("top".to_string(), Some("via rovl".to_string())),
            ("up".to_string(), Some("u".to_string())),
        ]
    );
}

/// (relative path, content of files) of everything in the merged dir.
fn snapshot_merged(l: &Layers) -> Vec<(String, Option<String>)> {
    snapshot(&l.merged)
        .into_iter()
        .filter(|(p, _)| !p.as_os_str().is_empty())
        .map(|(p, n)| {
            (
                p.display().to_string(),
                n.data.map(|d| String::from_utf8_lossy(&d).into_owned()),
            )
        })
        .collect()
}

/// An unmount that lands between mount(2) and the kernel's INIT (a quick
/// `umount` after `rovl mount -f`) ends the daemon as any unmount does:
/// exit 0, not "cannot mount".
#[test]
fn unmounted_before_ready_is_a_clean_exit() {
    if !require_root_fuse() {
        return;
    }
    let l = Layers::new(1);
    for round in 0..20 {
        let m = RovlMount::start(&l.opts(), &l.merged).expect("mount");
        let st = m.unmount();
        assert!(st.success(), "round {round}: rovl exited with {st}");
    }
}
