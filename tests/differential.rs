//! Differential test: rovl against kernel overlayfs, the oracle.
//!
//! For each seed: generate the same layer tree twice (A for the kernel, B
//! for rovl), mount both, apply the same random operations to both and
//! compare every outcome; then compare the merged trees, the upper dirs
//! after unmount, and finally a fresh kernel mount over B's layers (is
//! what rovl left on disk what the kernel would have left?).
//!
//! Env: ROVL_DIFF_SEEDS (default 20), ROVL_DIFF_OPS (default 200),
//! ROVL_DIFF_SEED (run only this seed), ROVL_DIFF_SELFTEST=1 (mount a second
//! kernel overlay over B instead of rovl: must report zero differences),
//! ROVL_DIFF_VERBOSE=1 (print every op with the kernel's outcome),
//! ROVL_DIFF_SKIP=Link,Rename (leave these op kinds out),
//! ROVL_DIFF_HANG_SECS (default 120: an op that long is reported as a hang),
//! ROVL_DIFF_PROGRAM=/usr/bin/fuse-overlayfs (compare another FUSE overlay,
//! run as `PROGRAM -f -o OPTS MNT`, instead of rovl).

mod common;
#[path = "differential/layers.rs"]
mod layers;
#[path = "differential/ops.rs"]
mod ops;
#[path = "differential/rng.rs"]
mod rng;
#[path = "differential/sys.rs"]
mod sys;
#[path = "differential/tree.rs"]
mod tree;

use common::{is_mounted, KernelMount, Layers, RovlMount};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;
use tree::WalkMode;

const LOWERS: usize = 3;
const MAX_LINES: usize = 50;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Second {
    Rovl,
    Kernel,
    /// Another FUSE overlay run as `PROGRAM -f -o OPTS MNT` (e.g. fuse-overlayfs).
    Program(PathBuf),
}

impl Second {
    fn name(&self) -> &'static str {
        match self {
            Second::Rovl => "rovl",
            Second::Kernel => "kernel(B)",
            Second::Program(_) => "program",
        }
    }
}

enum SecondMount {
    /// rovl or another FUSE program (same guard type).
    Fuse(RovlMount),
    Kernel(KernelMount),
}

/// One difference, with enough context to replay it (`ROVL_DIFF_SEED`).
struct Diff {
    seed: u64,
    phase: String,
    detail: String,
}

#[derive(Default)]
struct Report {
    /// Set when the second mount hung: later seeds would only hang again.
    hung: bool,
    seeds: usize,
    ops: usize,
    diffs: Vec<Diff>,
}

impl Report {
    fn add(&mut self, seed: u64, phase: impl Into<String>, detail: impl Into<String>) {
        self.diffs.push(Diff {
            seed,
            phase: phase.into(),
            detail: detail.into(),
        });
    }

    fn add_tree_diffs(
        &mut self,
        seed: u64,
        phase: &str,
        a: &tree::Tree,
        b: &tree::Tree,
        names: (&str, &str),
    ) {
        for (path, what, x, y) in tree::compare(a, b) {
            self.add(
                seed,
                phase,
                format!("{path}: {what}: {}={x} {}={y}", names.0, names.1),
            );
        }
    }

    fn summary(&self) -> String {
        format!(
            "differential: seeds={} ops={} differences={}",
            self.seeds,
            self.ops,
            self.diffs.len()
        )
    }

    /// At most MAX_LINES lines, shared fairly between failing seeds (the
    /// first differences of a seed matter most; later ones often cascade).
    fn lines(&self) -> String {
        let mut seeds: Vec<u64> = self.diffs.iter().map(|d| d.seed).collect();
        seeds.dedup();
        let per_seed = (MAX_LINES / seeds.len().max(1)).max(5);
        let mut s = String::new();
        let mut shown = 0;
        for seed in seeds {
            let of_seed: Vec<&Diff> = self.diffs.iter().filter(|d| d.seed == seed).collect();
            for d in of_seed.iter().take(per_seed) {
                if shown == MAX_LINES {
                    break;
                }
                s.push_str(&format!("seed {} [{}] {}\n", d.seed, d.phase, d.detail));
                shown += 1;
            }
            if of_seed.len() > per_seed {
                s.push_str(&format!(
                    "  (seed {seed}: {} more; replay with ROVL_DIFF_SEED={seed})\n",
                    of_seed.len() - per_seed
                ));
            }
        }
        if shown < self.diffs.len() {
            s.push_str(&format!(
                "{} of {} differences shown\n",
                shown,
                self.diffs.len()
            ));
        }
        s
    }
}

fn env_num(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// Kernel-compatible workdir swap: B's layers with a fresh workdir.
fn opts_with_workdir(l: &Layers, work: &Path) -> String {
    format!(
        "{},upperdir={},workdir={}",
        l.lowerdir_opt(),
        l.upper.display(),
        work.display()
    )
}

/// Names and types under a workdir. Temp entries (`#<hex>`, e.g. the
/// kernel's shared whiteout inode left in work/) are private to each
/// implementation and skipped.
fn workdir_listing(t: &tree::Tree) -> Vec<String> {
    t.iter()
        .filter(|(k, _)| !k.rsplit('/').next().unwrap_or("").starts_with('#'))
        .map(|(k, v)| match v {
            Ok(n) => format!("{k}:{}", n.stat.kind),
            Err(f) => format!("{k}:Err({f})"),
        })
        .collect()
}

/// Runs one seed; `inject` may tamper with B after both are unmounted.
fn run_seed(
    seed: u64,
    nops: usize,
    second: &Second,
    inject: Option<&dyn Fn(&Layers)>,
    report: &mut Report,
) {
    report.seeds += 1;
    let sname = second.name();
    let spec = layers::gen_tree(seed, LOWERS);
    let la = Layers::new(LOWERS);
    let lb = Layers::new(LOWERS);
    for l in [&la, &lb] {
        for (i, ls) in spec.lowers.iter().enumerate() {
            layers::materialize(ls, &l.lowers[i]);
        }
        layers::materialize(&spec.upper, &l.upper);
    }

    let ka = KernelMount::start(&la.opts(), &la.merged)
        .unwrap_or_else(|e| panic!("seed {seed}: kernel overlay mount over A failed: {e}"));
    let mb = match second {
        Second::Rovl => RovlMount::start(&lb.opts(), &lb.merged).map(SecondMount::Fuse),
        Second::Kernel => KernelMount::start(&lb.opts(), &lb.merged).map(SecondMount::Kernel),
        Second::Program(prog) => {
            RovlMount::start_program(prog, &["-f", "-o", &lb.opts()], &lb.merged)
                .map(SecondMount::Fuse)
        }
    };
    let mb = match mb {
        Ok(m) => m,
        Err(e) => {
            report.add(seed, "mount", format!("{sname} mount failed: {e}"));
            return;
        }
    };

    let mut gen = ops::OpGen::new(seed, &spec);
    let skip = skipped_kinds();
    for i in 0..nops {
        let op = loop {
            let op = gen.next_op(Some(&la.merged));
            if !skip.iter().any(|k| *k == ops::kind_name(&op)) {
                break op;
            }
        };
        let oa = ops::apply(&op, &la.merged);
        let (op_b, root_b) = (op.clone(), lb.merged.clone());
        let Some(ob) = bounded(move || ops::apply(&op_b, &root_b)) else {
            report.add(seed, format!("op {i}"), format!("{op:?}: {sname} hung"));
            report.hung = true;
            return;
        };
        report.ops += 1;
        if verbose() {
            eprintln!("seed {seed} op {i}: {op:?} -> {}", ops::show(&oa));
            if oa != ob {
                eprintln!("    {sname} -> {}", ops::show(&ob));
            }
        }
        if oa != ob {
            report.add(
                seed,
                format!("op {i}"),
                format!(
                    "{op:?}: kernel={} {sname}={}",
                    ops::show(&oa),
                    ops::show(&ob)
                ),
            );
            if ob.as_ref().err().map(|f| f.errno) == Some(libc::ENOTCONN) {
                report.add(seed, "abort", format!("{sname} is gone (ENOTCONN)"));
                return;
            }
        }
    }

    let ta = tree::walk(&la.merged, WalkMode::Merged);
    let root_b = lb.merged.clone();
    let Some(tb) = bounded(move || tree::walk(&root_b, WalkMode::Merged)) else {
        report.add(
            seed,
            "merged",
            format!("{sname} hung while walking the tree"),
        );
        report.hung = true;
        return;
    };
    report.add_tree_diffs(seed, "merged", &ta, &tb, ("kernel", sname));

    drop(ka);
    if is_mounted(&la.merged) {
        report.add(seed, "unmount", "kernel overlay over A is still mounted");
        return;
    }
    match mb {
        SecondMount::Fuse(m) => {
            let st = m.unmount();
            if !st.success() {
                report.add(seed, "unmount", format!("rovl exited with {st}"));
            }
        }
        SecondMount::Kernel(m) => drop(m),
    }
    if is_mounted(&lb.merged) {
        report.add(seed, "unmount", format!("{sname} is still mounted"));
        return;
    }
    if let Some(f) = inject {
        f(&lb);
    }

    let ua = tree::walk(&la.upper, WalkMode::Upper);
    let ub = tree::walk(&lb.upper, WalkMode::Upper);
    report.add_tree_diffs(seed, "upper", &ua, &ub, ("kernel", sname));

    let wa = workdir_listing(&tree::walk(&la.work, WalkMode::Upper));
    let wb = workdir_listing(&tree::walk(&lb.work, WalkMode::Upper));
    if wa != wb {
        report.add(seed, "workdir", format!("kernel={wa:?} {sname}={wb:?}"));
    }

    // Does the kernel read B's layers as it reads its own?
    let root = lb.root();
    let (work2, mnt2) = (root.join("work2"), root.join("merged2"));
    for d in [&work2, &mnt2] {
        std::fs::create_dir(d).expect("create dir for the kernel-over-B mount");
    }
    match KernelMount::start(&opts_with_workdir(&lb, &work2), &mnt2) {
        Ok(kb) => {
            let tk = tree::walk(&mnt2, WalkMode::Merged);
            report.add_tree_diffs(seed, "kernel-over-B", &ta, &tk, ("kernel(A)", "kernel(B)"));
            drop(kb);
        }
        Err(e) => report.add(seed, "kernel-over-B", format!("mount failed: {e}")),
    }
}

/// Runs `f` on its own thread so a hung FUSE request becomes a reported
/// difference (the mount guards then detach the mount and kill the daemon,
/// which releases the thread) instead of a test that never ends. Not a
/// timing assertion: the limit (ROVL_DIFF_HANG_SECS, default 120) is only a
/// hang detector.
fn bounded<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let limit = Duration::from_secs(env_num("ROVL_DIFF_HANG_SECS", 120));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).ok()
}

/// ROVL_DIFF_SKIP=Link,Rename: op kinds to leave out (e.g. while a known bug
/// in one of them hides everything after it).
fn skipped_kinds() -> Vec<String> {
    std::env::var("ROVL_DIFF_SKIP")
        .unwrap_or_default()
        .split(',')
        .map(|k| k.trim().to_string())
        .filter(|k| !k.is_empty())
        .collect()
}

fn verbose() -> bool {
    std::env::var("ROVL_DIFF_VERBOSE").is_ok_and(|v| v == "1")
}

fn seeds_from_env(default_seeds: u64) -> Vec<u64> {
    match std::env::var("ROVL_DIFF_SEED") {
        Ok(_) => vec![env_num("ROVL_DIFF_SEED", 0)],
        Err(_) => (0..env_num("ROVL_DIFF_SEEDS", default_seeds)).collect(),
    }
}

fn run(seeds: &[u64], nops: usize, second: &Second) -> Report {
    sys::set_umask(0o022);
    let mut report = Report::default();
    for &seed in seeds {
        run_seed(seed, nops, second, None, &mut report);
        if report.hung {
            eprintln!(
                "differential: stopping after seed {seed}: {} hung",
                second.name()
            );
            break;
        }
    }
    eprintln!("{} (second={})", report.summary(), second.name());
    report
}

fn assert_clean(report: &Report) {
    assert!(
        report.diffs.is_empty(),
        "{}\n{}",
        report.summary(),
        report.lines()
    );
}

#[test]
fn rovl_matches_kernel_overlay() {
    let selftest = std::env::var("ROVL_DIFF_SELFTEST").is_ok_and(|v| v == "1");
    if !common::require_kernel_overlay() || (!selftest && !common::require_root_fuse()) {
        return;
    }
    let second = match std::env::var_os("ROVL_DIFF_PROGRAM") {
        Some(p) => Second::Program(PathBuf::from(p)),
        None if selftest => Second::Kernel,
        None => Second::Rovl,
    };
    let nops = env_num("ROVL_DIFF_OPS", 200) as usize;
    let report = run(&seeds_from_env(20), nops, &second);
    assert_clean(&report);
}

/// The runner and comparator themselves: two kernel mounts must agree.
#[test]
fn selftest_kernel_vs_kernel() {
    if !common::require_kernel_overlay() {
        return;
    }
    let report = run(&[1000, 1001, 1002], 150, &Second::Kernel);
    assert!(report.ops > 0, "no operations ran");
    assert_clean(&report);
}

/// A difference planted in B's upper after the run must be reported, both
/// by the upper-dir comparison and by the kernel-over-B remount.
#[test]
fn comparator_detects_injected_difference() {
    if !common::require_kernel_overlay() {
        return;
    }
    sys::set_umask(0o022);
    let plant = |l: &Layers| {
        let t = tree::walk(&l.upper, WalkMode::Upper);
        let file = t.iter().find_map(|(k, v)| match v {
            Ok(n) if n.stat.kind == '-' && n.link_group.is_none() => Some(k.clone()),
            _ => None,
        });
        let p = l.upper.join(file.unwrap_or_else(|| "planted".into()));
        let fd = sys::open(&p, libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND, 0o644)
            .expect("open file to tamper with");
        fd.write(b"!").expect("tamper");
        fd.close().expect("close");
    };
    let mut report = Report::default();
    run_seed(7, 40, &Second::Kernel, Some(&plant), &mut report);
    let phases: Vec<&str> = report.diffs.iter().map(|d| d.phase.as_str()).collect();
    assert!(
        phases.contains(&"upper"),
        "upper diff not detected: {}",
        report.lines()
    );
    assert!(
        phases.contains(&"kernel-over-B"),
        "remount diff not detected: {}",
        report.lines()
    );
    assert!(
        phases
            .iter()
            .all(|p| *p == "upper" || *p == "kernel-over-B"),
        "unexpected differences: {}",
        report.lines()
    );
}

/// The same spec materialized twice walks identically; a changed mode,
/// xattr or content is then reported.
#[test]
fn materialized_copies_are_identical_and_changes_show() {
    if !common::require_kernel_overlay() {
        return;
    }
    let spec = layers::gen_tree(42, LOWERS);
    let dirs: Vec<tempfile::TempDir> = (0..2)
        .map(|_| {
            tempfile::Builder::new()
                .prefix("rovl-diff-")
                .tempdir_in("/tmp")
                .unwrap()
        })
        .collect();
    for d in &dirs {
        layers::materialize(&spec.upper, d.path());
    }
    let a = tree::walk(dirs[0].path(), WalkMode::Upper);
    let b = tree::walk(dirs[1].path(), WalkMode::Upper);
    assert!(a.len() > 1, "generated upper layer is empty");
    assert_eq!(tree::compare(&a, &b), Vec::new());

    let victim = a
        .iter()
        .find_map(|(k, v)| match v {
            Ok(n) if n.stat.kind == 'd' => Some(k.clone()),
            _ => None,
        })
        .expect("a directory");
    let p = dirs[1].path().join(&victim);
    sys::lsetxattr(&p, "user.injected", b"1", 0).expect("setxattr");
    let b = tree::walk(dirs[1].path(), WalkMode::Upper);
    let d = tree::compare(&a, &b);
    assert!(
        d.iter()
            .any(|(k, what, _, _)| *k == victim && what == "xattrs"),
        "xattr change not reported: {d:?}"
    );
}

/// Generation depends on the seed only.
#[test]
fn generation_is_deterministic() {
    let a = layers::gen_tree(5, LOWERS);
    let b = layers::gen_tree(5, LOWERS);
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
    let c = layers::gen_tree(6, LOWERS);
    assert_ne!(format!("{a:?}"), format!("{c:?}"));
    let (mut ga, mut gb) = (ops::OpGen::new(5, &a), ops::OpGen::new(5, &b));
    for _ in 0..300 {
        assert_eq!(
            format!("{:?}", ga.next_op(None)),
            format!("{:?}", gb.next_op(None))
        );
    }
}
