//! `rovl diff` of a large upper dir against `tar -c` of the same dir: the
//! layer should be made at the speed of reading the files.
//!
//! `cargo bench --bench layer_diff` (ROVL_BENCH_DIFF_FILES, default
//! 100000 files of 1 KiB in 1000 dirs, with whiteouts and an opaque dir;
//! ROVL_BENCH_ROUNDS, default 5). Both write the tar to a file on the same
//! filesystem. Warm: the tree in the page cache; cold (as root): caches
//! dropped before each run. Prints medians and the ratio rovl / tar.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn build_upper(upper: &Path, files: usize) {
    let per_dir = 100;
    let data = vec![b'x'; 1024];
    for i in 0..files {
        let d = upper.join(format!("d{:04}", i / per_dir));
        if i % per_dir == 0 {
            fs::create_dir_all(&d).unwrap();
        }
        fs::write(d.join(format!("f{i:06}")), &data).unwrap();
    }
    // A few whiteouts and an opaque dir, as an upper has them.
    let w = upper.join("gone");
    fs::create_dir_all(&w).unwrap();
    for i in 0..100 {
        let p = std::ffi::CString::new(w.join(format!("w{i}")).to_str().unwrap()).unwrap();
        // SAFETY: a valid path; mknod of a 0/0 char device (a whiteout).
        unsafe { libc::mknod(p.as_ptr(), libc::S_IFCHR, 0) };
    }
}

fn drop_caches() -> bool {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn time(cmd: &mut Command) -> Duration {
    let t = Instant::now();
    let st = cmd.status().expect("run");
    assert!(st.success(), "{cmd:?} failed");
    t.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    // `cargo test --all-targets` runs benches without `--bench` (and an
    // unoptimized rovl): not the place for this.
    if !std::env::args().any(|a| a == "--bench") {
        println!("layer_diff: run with `cargo bench --bench layer_diff`; nothing to do here");
        return;
    }
    let files = env_num("ROVL_BENCH_DIFF_FILES", 100_000);
    let rounds = env_num("ROVL_BENCH_ROUNDS", 5);
    let tmp = tempfile::Builder::new()
        .prefix("rovl-bench-diff-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let upper = tmp.path().join("upper");
    eprintln!("building an upper of {files} files…");
    build_upper(&upper, files);
    let out = tmp.path().join("out.tar");
    let rovl = env!("CARGO_BIN_EXE_rovl");
    let rovl_cmd = || {
        let mut c = Command::new(rovl);
        c.args(["diff", upper.to_str().unwrap(), "-o", out.to_str().unwrap()])
            .stdout(std::process::Stdio::null());
        c
    };
    let tar_cmd = || {
        let mut c = Command::new("tar");
        c.args([
            "-C",
            upper.to_str().unwrap(),
            "-cf",
            out.to_str().unwrap(),
            ".",
        ]);
        c
    };
    let cold = drop_caches();
    println!("rovl diff vs tar -c, {files} files of 1 KiB, median of {rounds}");
    println!("| cache | tar -c | rovl diff | ratio |");
    println!("|---|---|---|---|");
    for (label, drop) in [("warm", false), ("cold", true)] {
        if drop && !cold {
            println!("| cold | skipped (needs root to drop caches) | | |");
            continue;
        }
        let (mut t, mut r) = (Vec::new(), Vec::new());
        // Interleaved, after one warm-up each.
        time(&mut tar_cmd());
        time(&mut rovl_cmd());
        for _ in 0..rounds {
            if drop {
                drop_caches();
            }
            t.push(time(&mut tar_cmd()));
            if drop {
                drop_caches();
            }
            r.push(time(&mut rovl_cmd()));
        }
        let (t, r) = (median(t), median(r));
        println!(
            "| {label} | {:.3} s | {:.3} s | {:.2} |",
            t.as_secs_f64(),
            r.as_secs_f64(),
            r.as_secs_f64() / t.as_secs_f64()
        );
    }
}
