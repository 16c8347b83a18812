//! The command line as a newcomer meets it: a typo gets a suggestion and
//! mounts nothing, bare `rovl` and a missing `-o` show the usage, `rovl
//! list` shows what is mounted (and a dead daemon), a dead mount is
//! cleared by the next mount, and the man page and completions print.

mod common;

use common::*;

#[test]
fn a_typo_suggests_and_mounts_nothing() {
    let l = Layers::new(1);
    let opts = format!("lowerdir={}", l.lowers[0].display());
    let m = l.merged.to_str().unwrap();
    for (word, want) in [("mnt", "mount"), ("umout", "umount"), ("lst", "list")] {
        let r = run_rovl(&[word, "-o", &opts, m]);
        assert_eq!(r.status.code(), Some(2), "{word}: {}", r.stderr);
        assert!(
            r.stderr.contains(&format!("did you mean 'rovl {want}'?")),
            "{word}: {}",
            r.stderr
        );
        assert!(!is_mounted(&l.merged), "{word} mounted");
    }
}

#[test]
fn bare_rovl_and_a_missing_o_show_the_usage() {
    let r = run_rovl::<&str>(&[]);
    assert_eq!(r.status.code(), Some(2));
    assert!(
        r.stderr.starts_with("usage: rovl mount -o lowerdir="),
        "{}",
        r.stderr
    );
    let r = run_rovl(&["./merged"]);
    assert_eq!(r.status.code(), Some(1));
    assert!(
        r.stderr.contains("no mount options (-o) given") && r.stderr.contains("usage: rovl mount"),
        "{}",
        r.stderr
    );
}

#[test]
fn version_man_page_and_completions() {
    let r = run_rovl(&["--version"]);
    assert!(
        r.status.success() && r.stdout.contains("FUSE protocol 7."),
        "{}",
        r.stdout
    );
    let r = run_rovl(&["man"]);
    assert!(
        r.status.success() && r.stdout.starts_with(".ie"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains(".TH rovl 1"), "{}", r.stdout);
    for shell in ["bash", "zsh", "fish"] {
        let r = run_rovl(&["completions", shell]);
        assert!(r.status.success() && r.stdout.contains("umount"), "{shell}");
    }
}

fn list_json() -> Vec<serde_json::Value> {
    let r = run_rovl(&["list", "--json"]);
    assert!(r.status.success(), "{}", r.stderr);
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout))
}

fn entry_for(mnt: &std::path::Path) -> Option<serde_json::Value> {
    list_json()
        .into_iter()
        .find(|e| e["mountpoint"] == mnt.to_str().unwrap())
}

/// The mount's entry once its daemon has recorded it: in the foreground
/// the mount shows before the record does (`rovl mount` without `-f`
/// returns only after both).
fn recorded(mnt: &std::path::Path) -> serde_json::Value {
    let start = std::time::Instant::now();
    loop {
        let e = entry_for(mnt).expect("the mount is listed");
        if e["state"] != "unknown" || start.elapsed().as_secs() > 30 {
            return e;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn list_shows_layers_options_and_pid() {
    if !require_root_fuse() {
        return;
    }
    let l = Layers::new(2);
    let m = RovlMount::start(&format!("{},redirect_dir=on", l.opts()), &l.merged).expect("mount");
    let e = recorded(&m.mountpoint);
    assert_eq!(e["state"], "running");
    let rec = &e["record"];
    assert_eq!(rec["pid"], m.child.id());
    assert_eq!(
        rec["lowerdir"],
        serde_json::json!([l.lowers[0].to_str().unwrap(), l.lowers[1].to_str().unwrap()])
    );
    assert_eq!(rec["upperdir"], l.upper.to_str().unwrap());
    assert_eq!(rec["options"], "redirect_dir=on");
    let text = run_rovl(&["list"]).stdout;
    assert!(
        text.contains(m.mountpoint.to_str().unwrap())
            && text.contains(&format!("pid {}", m.child.id())),
        "{text}"
    );
    let mnt = m.mountpoint.clone();
    assert!(m.unmount().success());
    assert!(entry_for(&mnt).is_none(), "still listed after unmount");
}

#[test]
fn a_dead_mount_is_listed_and_cleared_by_the_next_mount() {
    if !require_root_fuse() {
        return;
    }
    let l = Layers::new(1);
    write(l.l(0, "f"), "lower");
    let m = RovlMount::start(&l.opts(), &l.merged).expect("mount");
    assert_eq!(recorded(&m.mountpoint)["state"], "running");
    signal(&m.child, libc::SIGKILL);
    let mnt = m.mountpoint.clone();
    // The kernel aborts the connection once the daemon is gone.
    let start = std::time::Instant::now();
    while errno(std::fs::metadata(&mnt)) != Some(libc::ENOTCONN) {
        assert!(start.elapsed().as_secs() < 30, "the mount never went dead");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let e = entry_for(&mnt).expect("the dead mount is listed");
    assert_eq!(e["state"], "dead");
    let text = run_rovl(&["list"]).stdout;
    assert!(
        text.contains(&format!("rovl umount {}", mnt.display())),
        "{text}"
    );
    // Mounting again clears it.
    let m2 = RovlMount::start(&l.opts(), &l.merged).expect("mount over a dead mount");
    assert!(
        m2.stderr_text().contains("detached a dead rovl mount"),
        "{}",
        m2.stderr_text()
    );
    assert_eq!(read_string(l.m("f")), "lower");
    assert!(m2.unmount().success());
    let (st, _) = m.wait_exit();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&st),
        Some(libc::SIGKILL)
    );
}

#[test]
fn help_lists_the_mount_options_with_an_example() {
    let r = run_rovl(&["mount", "--help"]);
    assert!(r.status.success());
    for want in [
        "lowerdir=L1[:L2...]",
        "upperdir=U,workdir=W",
        "redirect_dir=",
        "Example:",
    ] {
        assert!(
            r.stdout.contains(want),
            "{want} missing from:\n{}",
            r.stdout
        );
    }
}

#[test]
fn release_binaries_carry_no_debug_info() {
    let toml = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
    let release = toml
        .split("[profile.release]")
        .nth(1)
        .and_then(|s| s.split("\n[").next())
        .expect("a [profile.release] section");
    assert!(release.contains("strip = \"debuginfo\""), "{release}");
}

/// `-d` logs each request with its outcome (errno), caller pid and
/// duration, and none of fuser's capability lines.
#[test]
fn debug_log_shows_requests_with_their_errno_and_caller() {
    if !require_root_fuse() {
        return;
    }
    let l = Layers::new(1);
    write(l.l(0, "d/f"), "f");
    let m = RovlMount::start_args(&["mount", "-d", "-o", &l.opts()], &l.merged).expect("mount");
    assert_eq!(errno(std::fs::remove_dir(l.m("d"))), Some(libc::ENOTEMPTY));
    // The line is written once the reply is sent.
    let start = std::time::Instant::now();
    while !m.stderr_text().contains("rmdir ino") && start.elapsed().as_secs() < 30 {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let log = m.stderr_text();
    assert!(m.unmount().success());
    let line = log
        .lines()
        .find(|l| l.contains("rmdir ino"))
        .unwrap_or_else(|| panic!("no rmdir line in:\n{log}"));
    // SAFETY: gettid has no preconditions. (FUSE names the calling thread.)
    let tid = unsafe { libc::gettid() };
    assert!(
        line.contains("Directory not empty") && line.contains(&format!("pid {tid}")),
        "{line}"
    );
    assert!(!log.contains("capability"), "fuser's noise:\n{log}");
}

/// A daemon logs to `--log-file`; `rovl stats` reads its counters.
#[test]
fn log_file_and_stats_of_a_daemon() {
    if !require_root_fuse() {
        return;
    }
    let l = Layers::new(1);
    write(l.l(0, "big"), vec![7u8; 100_000]);
    let log = l.root().join("rovl.log");
    let r = run_rovl(&[
        "mount",
        "--log-file",
        log.to_str().unwrap(),
        "-o",
        &l.opts(),
        l.merged.to_str().unwrap(),
    ]);
    let _g = PathGuard(l.merged.clone());
    assert!(r.status.success(), "{}", r.stderr);
    std::fs::OpenOptions::new()
        .append(true)
        .open(l.m("big"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"!"))
        .unwrap();
    let s = rovl_stats(&l.merged);
    assert_eq!(s["copy_ups"], 1, "{s}");
    assert_eq!(s["copy_up_bytes"], 100_000, "{s}");
    assert!(s["requests"]["open"].as_u64() >= Some(1), "{s}");
    assert!(
        ["io_uring", "/dev/fuse"].contains(&s["transport"].as_str().unwrap_or("")),
        "{s}"
    );
    let text = run_rovl(&["stats", l.merged.to_str().unwrap()]).stdout;
    assert!(text.contains("copy-ups: 1 (97.7 KiB of data)"), "{text}");
    assert!(run_rovl(&["umount", l.merged.to_str().unwrap()])
        .status
        .success());
    // The daemon writes "unmounted" as it exits, after umount returns.
    let start = std::time::Instant::now();
    let mut text = String::new();
    while start.elapsed().as_secs() < 30 {
        text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("unmounted") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(
        text.contains("mounted rovl at") && text.contains("stats: "),
        "{text}"
    );
    assert!(text.contains("unmounted"), "{text}");
}

/// Lookup counts even out: after lookups, readdirplus, creates, renames
/// over files, unlinks and rmdirs, and the kernel dropping its caches, the
/// daemon holds no node but the root (`rovl stats`). A count taken and not
/// given back would keep its node forever.
#[test]
fn lookup_counts_even_out() {
    if !require_root_fuse() {
        return;
    }
    let l = Layers::new(1);
    for i in 0..50 {
        write(l.l(0, &format!("d/f{i}")), "x");
        write(l.l(0, &format!("e/g{i}")), "y");
    }
    let m = RovlMount::start(&format!("{},index=on", l.opts()), &l.merged).expect("mount");
    let _ = std::fs::read_dir(l.m("d")).unwrap().count();
    for i in 0..50 {
        let _ = std::fs::metadata(l.m(&format!("d/f{i}")));
    }
    for i in 0..10 {
        write(l.m(&format!("d/new{i}")), "n");
        std::fs::rename(l.m(&format!("d/new{i}")), l.m(&format!("d/f{i}"))).unwrap();
        std::fs::remove_file(l.m(&format!("d/f{}", i + 10))).unwrap();
    }
    std::fs::remove_dir_all(l.m("e")).unwrap();
    mkdir(l.m("e"));
    assert_eq!(errno(std::fs::remove_dir(l.m("d"))), Some(libc::ENOTEMPTY));
    let start = std::time::Instant::now();
    let nodes = loop {
        // Every dentry and inode the kernel can let go (not outliving the test).
        let _ = std::fs::write("/proc/sys/vm/drop_caches", "2");
        let nodes = rovl_stats(&l.merged)["nodes"].as_u64().unwrap();
        if nodes <= 1 || start.elapsed().as_secs() > 30 {
            break nodes;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(nodes, 1, "nodes still held after the kernel let go");
    assert!(m.unmount().success());
}
