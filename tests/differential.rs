//! Differential test: rovl against kernel overlayfs, the oracle.
//!
//! For each seed: generate the same layer tree twice (A for the kernel, B
//! for rovl), mount both, apply the same random operations to both and
//! compare every outcome; then compare the merged trees, the upper dirs
//! and workdirs after unmount, and finally cross-mount both ways: a kernel
//! over B's layers and rovl over A's (each with that side's own workdir)
//! must show the kernel's final tree (is what each left on disk what the
//! other reads?).
//!
//! Env: ROVL_DIFF_SEEDS (default 20), ROVL_DIFF_OPS (default 200),
//! ROVL_DIFF_SEED (run only this seed), ROVL_DIFF_SELFTEST=1 (mount a second
//! kernel overlay over B instead of rovl: must report zero differences),
//! ROVL_DIFF_VERBOSE=1 (print every op with the kernel's outcome),
//! ROVL_DIFF_KEEP=DIR (copy each seed's layers, kernel's as `a`, the
//! second's as `b`, to DIR/seedN after the run),
//! ROVL_DIFF_SKIP=Link,Rename (leave these op kinds out),
//! ROVL_DIFF_HANG_SECS (default 120: an op that long is reported as a hang),
//! ROVL_DIFF_PROGRAM=/usr/bin/fuse-overlayfs (compare another FUSE overlay,
//! run as `PROGRAM -f -o OPTS MNT`, instead of rovl).
//! ROVL_DIFF_ROVL_OPTS=passthrough=upper (appended to rovl's options only).
//! Issue 4 (also read by the selftest):
//! ROVL_DIFF_MOUNT_OPTS=redirect_dir=on,index=on,metacopy=on (appended to
//! every mount's options, both sides, remounts and cross mounts),
//! ROVL_DIFF_PROFILE=renames (directory renames of every kind, hard links
//! across copy-up, metadata-only changes),
//! ROVL_DIFF_REMOUNT_AT=60,130 or =5% (unmount both sides after these ops,
//! or after each op with this probability, and mount them again with the
//! same options and workdir; the view must not change),
//! ROVL_DIFF_CHECK_INO=0 to skip the inode checks, on by default (st_ino
//! kept through copy-up, rename, link and
//! remount; d_ino = st_ino; one st_dev: a rule the kernel keeps must hold
//! for the second side too; where the kernel breaks one it is only counted).

mod common;
#[path = "differential/layers.rs"]
mod layers;
#[path = "differential/ops.rs"]
mod ops;
#[path = "differential/rng.rs"]
mod rng;
use common::sys;
#[path = "differential/tree.rs"]
mod tree;

use common::{is_mounted, KernelMount, Layers, RovlMount};
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;
use tree::WalkMode;

const LOWERS: usize = 3;
const MAX_LINES: usize = 50;
/// Kernel anomalies kept as notes (they are not failures).
const MAX_NOTES: usize = 10;

/// The option sets issue 4 names.
const ISSUE4_OPTION_SETS: [&str; 4] = [
    "redirect_dir=on",
    "redirect_dir=off,index=on",
    "metacopy=on",
    "redirect_dir=on,index=on,metacopy=on",
];

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

    /// ROVL_DIFF_PROGRAM, else ROVL_DIFF_SELFTEST=1, else rovl.
    fn from_env() -> Second {
        match std::env::var_os("ROVL_DIFF_PROGRAM") {
            Some(p) => Second::Program(PathBuf::from(p)),
            None if selftest_env() => Second::Kernel,
            None => Second::Rovl,
        }
    }
}

fn selftest_env() -> bool {
    std::env::var("ROVL_DIFF_SELFTEST").is_ok_and(|v| v == "1")
}

enum SecondMount {
    /// rovl or another FUSE program (same guard type).
    Fuse(RovlMount),
    Kernel(KernelMount),
}

/// When to unmount and mount both sides again during the op sequence.
#[derive(Clone, Debug, Default)]
struct RemountPlan {
    /// After these op indices.
    at: Vec<usize>,
    /// Else after each op with this probability (percent), drawn per seed.
    percent: u64,
}

impl RemountPlan {
    /// `60,130` or `5%`.
    fn parse(v: &str) -> RemountPlan {
        let bad = || -> ! {
            panic!("ROVL_DIFF_REMOUNT_AT={v:?}: expected op numbers (60,130) or a percentage (5%)")
        };
        let v = v.trim();
        if let Some(p) = v.strip_suffix('%') {
            let percent: u64 = p.trim().parse().unwrap_or_else(|_| bad());
            if percent > 100 {
                bad();
            }
            return RemountPlan {
                at: Vec::new(),
                percent,
            };
        }
        let at = v
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<usize>().unwrap_or_else(|_| bad()))
            .collect();
        RemountPlan { at, percent: 0 }
    }

    fn is_empty(&self) -> bool {
        self.at.is_empty() && self.percent == 0
    }

    fn due(&self, op: usize, rng: &mut rng::Rng) -> bool {
        // Drawn for every op, so the plan is the same whatever happens.
        let drawn = self.percent > 0 && rng.chance(self.percent, 100);
        drawn || self.at.contains(&op)
    }
}

/// What varies between runs besides seeds: options, op mix, remounts,
/// inode checks. `Config::default()` is the plain differential test.
#[derive(Clone, Debug, Default)]
struct Config {
    /// Appended to every mount's options, on both sides.
    extra_opts: String,
    profile: ops::Profile,
    remount: RemountPlan,
    check_ino: bool,
}

impl Config {
    fn from_env() -> Config {
        let var = |n: &str| std::env::var(n).unwrap_or_default();
        let profile = match var("ROVL_DIFF_PROFILE").trim() {
            "" | "default" => ops::Profile::Default,
            "renames" => ops::Profile::Renames,
            other => panic!("ROVL_DIFF_PROFILE={other:?}: expected default or renames"),
        };
        Config {
            // rovl defaults to redirect_dir=on, the kernel here to off:
            // the base run pins the kernel's default on both sides.
            extra_opts: std::env::var("ROVL_DIFF_MOUNT_OPTS")
                .map(|v| v.trim().trim_matches(',').to_string())
                .unwrap_or_else(|_| "redirect_dir=off".to_string()),
            profile,
            remount: RemountPlan::parse(&var("ROVL_DIFF_REMOUNT_AT")),
            check_ino: var("ROVL_DIFF_CHECK_INO") != "0",
        }
    }

    /// The issue-4 setup for `opts`; env may still change seeds, ops and
    /// the remount plan.
    fn issue4(opts: &str, nops: usize) -> Config {
        let mut remount =
            RemountPlan::parse(&std::env::var("ROVL_DIFF_REMOUNT_AT").unwrap_or_default());
        if remount.is_empty() {
            remount.at = vec![nops / 3, 2 * nops / 3];
        }
        Config {
            extra_opts: opts.to_string(),
            profile: ops::Profile::Renames,
            remount,
            check_ino: true,
        }
    }

    fn opts(&self, l: &Layers) -> String {
        if self.extra_opts.is_empty() {
            l.opts()
        } else {
            format!("{},{}", l.opts(), self.extra_opts)
        }
    }

    fn describe(&self) -> String {
        format!(
            "opts={:?} profile={:?} remount={:?}/{}% check_ino={}",
            self.extra_opts, self.profile, self.remount.at, self.remount.percent, self.check_ino
        )
    }
}

/// One difference, with enough context to replay it (`ROVL_DIFF_SEED`).
struct Diff {
    seed: u64,
    phase: String,
    detail: String,
}

/// Inode-rule figures of one side.
#[derive(Default)]
struct InoStats {
    /// Paths whose st_ino was looked at before and after an op or remount.
    checked: usize,
    changed: usize,
    /// d_ino or st_dev rule broken (in walked trees).
    anomalies: usize,
    /// Remounts after which the merged view differed from before.
    view_changes: usize,
    /// st_ino changes across remount of files whose kernel number an op
    /// had changed before (not counted as differences).
    excused: usize,
}

#[derive(Default)]
struct Report {
    /// Set when the second mount hung: later seeds would only hang again.
    hung: bool,
    seeds: usize,
    ops: usize,
    remounts: usize,
    diffs: Vec<Diff>,
    kernel: InoStats,
    second: InoStats,
    /// The kernel's own inode-rule breaks (not failures), for the summary.
    notes: Vec<String>,
}

impl Report {
    fn add(&mut self, seed: u64, phase: impl Into<String>, detail: impl Into<String>) {
        self.diffs.push(Diff {
            seed,
            phase: phase.into(),
            detail: detail.into(),
        });
    }

    fn note(&mut self, seed: u64, phase: &str, detail: String) {
        if self.notes.len() < MAX_NOTES {
            self.notes.push(format!("seed {seed} [{phase}] {detail}"));
        }
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
            "differential: seeds={} ops={} remounts={} differences={}",
            self.seeds,
            self.ops,
            self.remounts,
            self.diffs.len()
        )
    }

    fn ino_summary(&self, sname: &str) -> String {
        let s = |x: &InoStats| {
            format!(
                "st_ino kept {}/{} (changes excused: {}), d_ino/st_dev anomalies {}, views changed by remount {}",
                x.checked - x.changed,
                x.checked,
                x.excused,
                x.anomalies,
                x.view_changes
            )
        };
        format!(
            "  kernel: {}
  {sname}: {}",
            s(&self.kernel),
            s(&self.second)
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

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Names and types under a workdir. Temp entries (`#<hex>`, e.g. the
/// kernel's shared whiteout inode left in work/) are private to each
/// implementation and skipped. An index entry (`index/<hex of the origin
/// file handle>`, which differs between A and B) is shown by the upper
/// paths it is a hard link of, after checking that its name is the hex of
/// its `trusted.overlay.origin`, as the kernel names them.
fn workdir_listing(work: &Path, t: &tree::Tree, upper: &tree::Tree) -> Vec<String> {
    let mut by_inode: BTreeMap<(u64, u64), Vec<&str>> = BTreeMap::new();
    for (k, v) in upper {
        if let Ok(n) = v {
            if n.stat.kind != 'd' {
                by_inode.entry((n.dev, n.ino)).or_default().push(k);
            }
        }
    }
    let mut out: Vec<String> = t
        .iter()
        .filter(|(k, _)| !k.rsplit('/').next().unwrap_or("").starts_with('#'))
        .map(|(k, v)| {
            let n = match v {
                Ok(n) => n,
                Err(f) => return format!("{k}:Err({f})"),
            };
            let kind = n.stat.kind;
            let Some(name) = k.strip_prefix("index/").filter(|n| !n.contains('/')) else {
                return format!("{k}:{kind}");
            };
            if kind == 'c' && n.stat.rdev == Some((0, 0)) {
                return format!("index/<whiteout>:{kind}");
            }
            match sys::lgetxattr(&work.join(k), "trusted.overlay.origin") {
                Ok(o) if hex(&o) == name => {
                    let links = by_inode.get(&(n.dev, n.ino)).cloned().unwrap_or_default();
                    format!("index/<origin of {links:?}>:{kind}")
                }
                Ok(_) => format!("{k}:{kind} (name is not the hex of its origin)"),
                Err(e) => format!("{k}:{kind} (origin: {})", sys::errno_name(e)),
            }
        })
        .collect();
    out.sort();
    out
}

fn mount_second(second: &Second, opts: &str, mnt: &Path) -> io::Result<SecondMount> {
    match second {
        Second::Rovl => match std::env::var("ROVL_DIFF_ROVL_OPTS") {
            // rovl-only options (passthrough=all, say) on rovl's side alone.
            Ok(own) if !own.trim().is_empty() => {
                RovlMount::start(&format!("{opts},{}", own.trim()), mnt).map(SecondMount::Fuse)
            }
            _ => RovlMount::start(opts, mnt).map(SecondMount::Fuse),
        },
        Second::Kernel => KernelMount::start(opts, mnt).map(SecondMount::Kernel),
        Second::Program(prog) => {
            RovlMount::start_program(prog, &["-f", "-o", opts], mnt).map(SecondMount::Fuse)
        }
    }
}

/// The state of one seed's run: its layers and mounts.
struct SeedRun<'a> {
    // Mounts first: fields drop in order, mounts before their layers.
    ka: Option<KernelMount>,
    mb: Option<SecondMount>,
    /// Kernel inode numbers a file got when an op changed its st_ino (e.g.
    /// a lower hard link copied up without index): the second side may
    /// change that file's number later (at the latest on remount) too.
    kernel_renumbered: BTreeSet<u64>,
    seed: u64,
    second: &'a Second,
    cfg: &'a Config,
    la: Layers,
    lb: Layers,
}

impl SeedRun<'_> {
    fn sname(&self) -> &'static str {
        self.second.name()
    }

    fn mount_a(&mut self) -> io::Result<()> {
        self.ka = Some(KernelMount::start(
            &self.cfg.opts(&self.la),
            &self.la.merged,
        )?);
        Ok(())
    }

    fn mount_b(&mut self) -> io::Result<()> {
        self.mb = Some(mount_second(
            self.second,
            &self.cfg.opts(&self.lb),
            &self.lb.merged,
        )?);
        Ok(())
    }

    /// Unmounts both sides; false (reported) if one stays mounted.
    fn unmount_both(&mut self, phase: &str, report: &mut Report) -> bool {
        let (seed, sname) = (self.seed, self.sname());
        drop(self.ka.take());
        if is_mounted(&self.la.merged) {
            report.add(seed, phase, "kernel overlay over A is still mounted");
            return false;
        }
        match self.mb.take() {
            Some(SecondMount::Fuse(m)) => {
                let st = m.unmount();
                if !st.success() {
                    report.add(seed, phase, format!("{sname} exited with {st}"));
                }
            }
            Some(SecondMount::Kernel(m)) => drop(m),
            None => {}
        }
        if is_mounted(&self.lb.merged) {
            report.add(seed, phase, format!("{sname} is still mounted"));
            return false;
        }
        true
    }

    fn oracle(&self) -> ops::Oracle<'_> {
        ops::Oracle {
            merged: &self.la.merged,
            upper: &self.la.upper,
            lowers: &self.la.lowers,
        }
    }

    /// Walks both merged views; None (reported, `hung` set) if B hangs.
    fn walk_both(&self, phase: &str, report: &mut Report) -> Option<(tree::Tree, tree::Tree)> {
        let ta = tree::walk(&self.la.merged, WalkMode::Merged);
        let root_b = self.lb.merged.clone();
        match bounded(move || tree::walk(&root_b, WalkMode::Merged)) {
            Some(tb) => Some((ta, tb)),
            None => {
                let sname = self.sname();
                report.add(
                    self.seed,
                    phase,
                    format!("{sname} hung while walking the tree"),
                );
                report.hung = true;
                None
            }
        }
    }

    /// Unmounts both sides and mounts them again with the same options and
    /// workdirs. Each side's view must change as the kernel's does (not
    /// at all, normally); with check_ino, st_ino must stay where the
    /// kernel's does. False (reported) if the run cannot go on.
    fn remount(&mut self, after_op: usize, report: &mut Report) -> bool {
        let (seed, sname) = (self.seed, self.sname());
        let phase = format!("remount after op {after_op}");
        report.remounts += 1;
        let Some((ta0, tb0)) = self.walk_both(&phase, report) else {
            return false;
        };
        if !self.unmount_both(&phase, report) {
            return false;
        }
        if let Err(e) = self.mount_a() {
            report.add(seed, &phase, format!("kernel remount over A failed: {e}"));
            return false;
        }
        if let Err(e) = self.mount_b() {
            report.add(seed, &phase, format!("{sname} remount failed: {e}"));
            return false;
        }
        let Some((ta1, tb1)) = self.walk_both(&phase, report) else {
            return false;
        };
        let changes = |x: &tree::Tree, y: &tree::Tree| -> BTreeMap<(String, String), String> {
            tree::compare(x, y)
                .into_iter()
                .map(|(p, what, b, a)| ((p, what), format!("before={b} after={a}")))
                .collect()
        };
        let (ca, cb) = (changes(&ta0, &ta1), changes(&tb0, &tb1));
        report.kernel.view_changes += usize::from(!ca.is_empty());
        report.second.view_changes += usize::from(!cb.is_empty());
        for ((p, what), d) in &cb {
            if !ca.contains_key(&(p.clone(), what.clone())) {
                report.add(
                    seed,
                    &phase,
                    format!("{p}: {what}: {sname}'s view changed ({d}), the kernel's did not"),
                );
            }
        }
        for ((p, what), d) in &ca {
            if !cb.contains_key(&(p.clone(), what.clone())) {
                report.add(
                    seed,
                    &phase,
                    format!("{p}: {what}: the kernel's view changed ({d}), {sname}'s did not"),
                );
            }
        }
        if self.cfg.check_ino {
            self.compare_remount_inos(&phase, (&ta0, &ta1), (&tb0, &tb1), report);
            self.compare_anomalies(&phase, &ta1, &tb1, report);
        }
        true
    }

    /// st_ino of every path present before and after a remount, per side.
    fn compare_remount_inos(
        &mut self,
        phase: &str,
        a: (&tree::Tree, &tree::Tree),
        b: (&tree::Tree, &tree::Tree),
        report: &mut Report,
    ) {
        let inos = |(x, y): (&tree::Tree, &tree::Tree)| -> BTreeMap<String, (u64, u64)> {
            x.iter()
                .filter_map(|(k, v)| {
                    let (Ok(n0), Some(Ok(n1))) = (v, y.get(k)) else {
                        return None;
                    };
                    Some((k.clone(), (n0.ino, n1.ino)))
                })
                .collect()
        };
        let (ia, ib) = (inos(a), inos(b));
        let sname = self.sname();
        for (p, (b0, b1)) in &ib {
            report.second.checked += 1;
            if b0 == b1 {
                continue;
            }
            report.second.changed += 1;
            let Some((a0, a1)) = ia.get(p) else { continue };
            if a0 != a1 {
                continue;
            }
            if self.kernel_renumbered.contains(a0) {
                report.second.excused += 1;
                continue;
            }
            report.add(self.seed, phase, format!("{p}: st_ino changed on {sname} across remount ({b0} -> {b1}); the kernel kept it"));
        }
        for (p, (a0, a1)) in &ia {
            report.kernel.checked += 1;
            if a0 != a1 {
                report.kernel.changed += 1;
                report.note(
                    self.seed,
                    phase,
                    format!("{p}: kernel st_ino changed across remount ({a0} -> {a1})"),
                );
            }
        }
    }

    /// d_ino/st_dev rules: where the kernel keeps one, B must too.
    fn compare_anomalies(
        &self,
        phase: &str,
        ta: &tree::Tree,
        tb: &tree::Tree,
        report: &mut Report,
    ) {
        let (xa, xb) = (tree::ino_anomalies(ta), tree::ino_anomalies(tb));
        report.kernel.anomalies += xa.len();
        report.second.anomalies += xb.len();
        for ((p, rule), d) in &xa {
            report.note(
                self.seed,
                phase,
                format!("{p}: kernel breaks the {rule} rule: {d}"),
            );
        }
        let sname = self.sname();
        for ((p, rule), d) in &xb {
            if ta.contains_key(p) && !xa.contains_key(&(p.clone(), *rule)) {
                report.add(
                    self.seed,
                    phase,
                    format!("{p}: {sname} breaks the {rule} rule the kernel keeps: {d}"),
                );
            }
        }
    }

    /// st_ino through one op, per side: where the kernel kept it, B must.
    fn compare_op_inos(
        &mut self,
        i: usize,
        op: &ops::Op,
        ia: &[ops::InoObs],
        ib: &[ops::InoObs],
        report: &mut Report,
    ) {
        let phase = format!("op {i}");
        for o in ia {
            report.kernel.checked += 1;
            if o.before != o.after {
                report.kernel.changed += 1;
                self.kernel_renumbered.insert(o.after);
                report.note(
                    self.seed,
                    &phase,
                    format!(
                        "{op:?}: kernel st_ino of {} changed ({} -> {})",
                        o.label, o.before, o.after
                    ),
                );
            }
        }
        report.second.checked += ib.len();
        report.second.changed += ib.iter().filter(|o| o.before != o.after).count();
        let sname = self.sname();
        for o in changed_where_kernel_kept(ia, ib) {
            report.add(
                self.seed,
                &phase,
                format!(
                    "{op:?}: st_ino of {} changed on {sname} ({} -> {}); the kernel kept it",
                    o.label, o.before, o.after
                ),
            );
        }
    }
}

/// The second side's st_ino changes through one op where the kernel kept
/// the same file's number (where the kernel changed it too, or alone,
/// nothing is reported).
fn changed_where_kernel_kept<'a>(
    ia: &[ops::InoObs],
    ib: &'a [ops::InoObs],
) -> Vec<&'a ops::InoObs> {
    ib.iter()
        .filter(|o| o.before != o.after)
        .filter(|o| ia.iter().any(|k| k.label == o.label && k.before == k.after))
        .collect()
}

/// Runs one seed; `inject` may tamper with B after both are unmounted.
fn run_seed(
    seed: u64,
    nops: usize,
    second: &Second,
    cfg: &Config,
    inject: Option<&dyn Fn(&Layers)>,
    report: &mut Report,
) {
    report.seeds += 1;
    let sname = second.name();
    let spec = layers::gen_tree(seed, LOWERS);
    let mut run = SeedRun {
        kernel_renumbered: BTreeSet::new(),
        seed,
        second,
        cfg,
        la: Layers::new(LOWERS),
        lb: Layers::new(LOWERS),
        ka: None,
        mb: None,
    };
    for l in [&run.la, &run.lb] {
        for (i, ls) in spec.lowers.iter().enumerate() {
            layers::materialize(ls, &l.lowers[i]);
        }
        layers::materialize(&spec.upper, &l.upper);
    }

    if let Err(e) = run.mount_a() {
        panic!("seed {seed}: kernel overlay mount over A failed: {e}");
    }
    if let Err(e) = run.mount_b() {
        report.add(seed, "mount", format!("{sname} mount failed: {e}"));
        return;
    }

    let mut gen = ops::OpGen::with_profile(seed, &spec, cfg.profile);
    let mut remount_rng = rng::Rng::new(seed ^ 0x7e30_0a7e_0000_0001);
    let skip = skipped_kinds();
    for i in 0..nops {
        let op = loop {
            let op = gen.next_op(Some(&run.oracle()));
            if !skip.iter().any(|k| *k == ops::kind_name(&op)) {
                break op;
            }
        };
        let (oa, ia) = ops::apply_observed(&op, &run.la.merged, cfg.check_ino);
        let (op_b, root_b, chk) = (op.clone(), run.lb.merged.clone(), cfg.check_ino);
        let Some((ob, ib)) = bounded(move || ops::apply_observed(&op_b, &root_b, chk)) else {
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
        if cfg.check_ino {
            run.compare_op_inos(i, &op, &ia, &ib, report);
        }
        if i + 1 < nops && cfg.remount.due(i, &mut remount_rng) {
            if verbose() {
                eprintln!("seed {seed}: remount after op {i}");
            }
            if !run.remount(i, report) {
                return;
            }
        }
    }

    let Some((ta, tb)) = run.walk_both("merged", report) else {
        return;
    };
    report.add_tree_diffs(seed, "merged", &ta, &tb, ("kernel", sname));
    if cfg.check_ino {
        run.compare_anomalies("merged", &ta, &tb, report);
    }

    if !run.unmount_both("unmount", report) {
        return;
    }
    let (la, lb) = (&run.la, &run.lb);
    if let Some(keep) = std::env::var_os("ROVL_DIFF_KEEP") {
        // For a look at the layers after the run: kernel's as a, rovl's as b.
        let dst = std::path::Path::new(&keep).join(format!("seed{seed}"));
        let _ = std::fs::create_dir_all(&dst);
        for (src, name) in [(la.root(), "a"), (lb.root(), "b")] {
            let _ = std::process::Command::new("cp")
                .args(["-a"])
                .arg(&src)
                .arg(dst.join(name))
                .status();
        }
    }
    if let Some(f) = inject {
        f(lb);
    }

    let ua = tree::walk(&la.upper, WalkMode::Upper);
    let ub = tree::walk(&lb.upper, WalkMode::Upper);
    report.add_tree_diffs(seed, "upper", &ua, &ub, ("kernel", sname));

    let wa = workdir_listing(&la.work, &tree::walk(&la.work, WalkMode::Upper), &ua);
    let wb = workdir_listing(&lb.work, &tree::walk(&lb.work, WalkMode::Upper), &ub);
    if wa != wb {
        report.add(seed, "workdir", format!("kernel={wa:?} {sname}={wb:?}"));
    }

    // Does the kernel read B's layers as it reads its own? Same options,
    // B's own workdir (as a user would remount it).
    match KernelMount::start(&cfg.opts(lb), &lb.merged) {
        Ok(kb) => {
            let tk = tree::walk(&lb.merged, WalkMode::Merged);
            report.add_tree_diffs(seed, "kernel-over-B", &ta, &tk, ("kernel(A)", "kernel(B)"));
            drop(kb);
        }
        Err(e) => report.add(seed, "kernel-over-B", format!("mount failed: {e}")),
    }

    // And the reverse: does the second side read what the kernel left?
    let phase = format!("{sname}-over-A");
    match mount_second(second, &cfg.opts(la), &la.merged) {
        Ok(m) => {
            let root = la.merged.clone();
            let Some(t) = bounded(move || tree::walk(&root, WalkMode::Merged)) else {
                report.add(seed, &phase, format!("{sname} hung while walking the tree"));
                report.hung = true;
                return;
            };
            report.add_tree_diffs(seed, &phase, &ta, &t, ("kernel(A)", &phase));
            if let SecondMount::Fuse(m) = m {
                let st = m.unmount();
                if !st.success() {
                    report.add(seed, &phase, format!("{sname} exited with {st}"));
                }
            }
        }
        Err(e) => report.add(seed, &phase, format!("mount failed: {e}")),
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

fn run(seeds: &[u64], nops: usize, second: &Second, cfg: &Config) -> Report {
    sys::set_umask(0o022);
    let mut report = Report::default();
    for &seed in seeds {
        run_seed(seed, nops, second, cfg, None, &mut report);
        if report.hung {
            eprintln!(
                "differential: stopping after seed {seed}: {} hung",
                second.name()
            );
            break;
        }
    }
    eprintln!(
        "{} (second={}, {})",
        report.summary(),
        second.name(),
        cfg.describe()
    );
    if cfg.check_ino {
        eprintln!("{}", report.ino_summary(second.name()));
        for n in &report.notes {
            eprintln!("  note: {n}");
        }
    }
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

/// Does this kernel take these overlay options? (Not every kernel has
/// every feature: a missing one is a missing prerequisite.)
fn kernel_accepts(opts: &str) -> bool {
    let l = Layers::new(1);
    let full = format!("{},{}", l.opts(), opts);
    match KernelMount::start(&full, &l.merged) {
        Ok(_) => true,
        Err(e) => {
            let reason = format!("kernel overlayfs refuses -o {opts}: {e}");
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("prerequisite missing (CI=true): {reason}");
            }
            eprintln!("SKIPPED: {reason}");
            false
        }
    }
}

#[test]
fn rovl_matches_kernel_overlay() {
    let second = Second::from_env();
    if !common::require_kernel_overlay()
        || (second != Second::Kernel && !common::require_root_fuse())
    {
        return;
    }
    let nops = env_num("ROVL_DIFF_OPS", 200) as usize;
    let report = run(&seeds_from_env(20), nops, &second, &Config::from_env());
    assert_clean(&report);
}

/// The same with FUSE over io_uring switched on (rovl then serves through
/// its rings; tests/uring.rs checks that it does).
#[test]
fn rovl_matches_kernel_over_io_uring() {
    if !common::require_kernel_overlay() || !common::require_root_fuse() {
        return;
    }
    let Some(_on) = common::UringOn::new() else {
        return;
    };
    let nops = env_num("ROVL_DIFF_OPS", 200) as usize;
    let seeds: Vec<u64> = (0..env_num("ROVL_DIFF_SEEDS", 6))
        .map(|s| 900 + s)
        .collect();
    let report = run(&seeds, nops, &Second::Rovl, &Config::from_env());
    assert_clean(&report);
}

/// Remounting both sides in the middle of the sequence (same options, same
/// workdir): each side must read back what it wrote, and go on as before.
#[test]
fn rovl_matches_kernel_with_remount() {
    let second = Second::from_env();
    if !common::require_kernel_overlay()
        || (second != Second::Kernel && !common::require_root_fuse())
    {
        return;
    }
    let nops = env_num("ROVL_DIFF_OPS", 150) as usize;
    let mut cfg = Config::from_env();
    if cfg.remount.is_empty() {
        cfg.remount.at = vec![nops / 3, 2 * nops / 3];
    }
    let seeds: Vec<u64> = match std::env::var("ROVL_DIFF_SEED") {
        Ok(_) => seeds_from_env(0),
        Err(_) => (0..env_num("ROVL_DIFF_SEEDS", 6))
            .map(|s| 500 + s)
            .collect(),
    };
    let report = run(&seeds, nops, &second, &cfg);
    assert!(report.remounts > 0, "no remount happened");
    assert_clean(&report);
}

/// The runner and comparator themselves: two kernel mounts must agree
/// (with the ROVL_DIFF_* configuration of the environment).
#[test]
fn selftest_kernel_vs_kernel() {
    if !common::require_kernel_overlay() {
        return;
    }
    let cfg = Config::from_env();
    if !cfg.extra_opts.is_empty() && !kernel_accepts(&cfg.extra_opts) {
        return;
    }
    let report = run(&[1000, 1001, 1002], 150, &Second::Kernel, &cfg);
    assert!(report.ops > 0, "no operations ran");
    assert_clean(&report);
}

/// The harness in issue 4's configurations (rename-heavy ops, remounts,
/// inode checks), kernel against kernel: must report zero differences and
/// the inode checks must see the kernel keep st_ino.
#[test]
fn selftest_kernel_vs_kernel_issue4_option_sets() {
    if !common::require_kernel_overlay() {
        return;
    }
    for opts in ISSUE4_OPTION_SETS {
        if !kernel_accepts(opts) {
            return;
        }
        let cfg = Config::issue4(opts, 150);
        let report = run(&[2000, 2001], 150, &Second::Kernel, &cfg);
        assert!(report.remounts > 0, "{opts}: no remount happened");
        assert!(report.kernel.checked > 0, "{opts}: no st_ino was checked");
        assert_clean(&report);
    }
}

/// Issue 4: both sides mounted with `opts`, rename-heavy ops, remounts,
/// inode checks. ROVL_DIFF_SELFTEST=1 / ROVL_DIFF_PROGRAM work here too.
fn issue4(opts: &str) {
    let second = Second::from_env();
    if !common::require_kernel_overlay()
        || (second != Second::Kernel && !common::require_root_fuse())
        || !kernel_accepts(opts)
    {
        return;
    }
    let nops = env_num("ROVL_DIFF_OPS", 200) as usize;
    let cfg = Config::issue4(opts, nops);
    let report = run(&seeds_from_env(12), nops, &second, &cfg);
    assert!(report.ops > 0, "no operations ran");
    assert_clean(&report);
}

#[test]
fn issue4_redirect_dir_on() {
    issue4(ISSUE4_OPTION_SETS[0]);
}

#[test]
fn issue4_index_on() {
    issue4(ISSUE4_OPTION_SETS[1]);
}

#[test]
fn issue4_metacopy_on() {
    issue4(ISSUE4_OPTION_SETS[2]);
}

#[test]
fn issue4_all_three() {
    issue4(ISSUE4_OPTION_SETS[3]);
}

/// Seed 19, 400 operations, all three options: a lower hard link's name,
/// renamed through the per-name node the rename instantiated, stayed the
/// first name of the node the kernel held for the link's other name, whose
/// stat then failed with ENOENT (rovl showed the name only after a
/// remount). Fixed by falling back to the node's next name.
#[test]
fn issue4_seed19_stale_name_of_a_hard_link() {
    let second = Second::from_env();
    let opts = ISSUE4_OPTION_SETS[3];
    if !common::require_kernel_overlay()
        || (second != Second::Kernel && !common::require_root_fuse())
        || !kernel_accepts(opts)
    {
        return;
    }
    let cfg = Config::issue4(opts, 400);
    let report = run(&[19], 400, &second, &cfg);
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
    run_seed(
        7,
        40,
        &Second::Kernel,
        &Config::default(),
        Some(&plant),
        &mut report,
    );
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

/// The st_ino check: a change is flagged only where the kernel kept the
/// number; and on this kernel, copying up one name of a lower hard link
/// renumbers it without index and keeps it with index=on.
#[test]
fn ino_check_follows_the_kernel() {
    let obs = |label: &str, before: u64, after: u64| ops::InoObs {
        label: label.to_string(),
        before,
        after,
    };
    let kernel = [obs("a", 1, 1), obs("b", 2, 3)];
    let second = [obs("a", 1, 5), obs("b", 2, 4), obs("c", 6, 7)];
    let flagged: Vec<&str> = changed_where_kernel_kept(&kernel, &second)
        .iter()
        .map(|o| o.label.as_str())
        .collect();
    assert_eq!(flagged, ["a"]);

    if !common::require_kernel_overlay() {
        return;
    }
    for (opts, renumbered) in [("", true), ("index=on", false)] {
        if !opts.is_empty() && !kernel_accepts(opts) {
            return;
        }
        let l = Layers::new(1);
        std::fs::write(l.lowers[0].join("a"), b"x").expect("write lower file");
        std::fs::hard_link(l.lowers[0].join("a"), l.lowers[0].join("b")).expect("link");
        let cfg = Config {
            extra_opts: opts.to_string(),
            ..Config::default()
        };
        let _k = KernelMount::start(&cfg.opts(&l), &l.merged).expect("kernel mount");
        let op = ops::Op::Chmod {
            path: "a".to_string(),
            mode: 0o600,
        };
        let (out, o) = ops::apply_observed(&op, &l.merged, true);
        assert!(out.is_ok(), "{opts}: chmod failed: {}", ops::show(&out));
        assert_eq!(o.len(), 1, "{opts}: {o:?}");
        assert_eq!(o[0].before != o[0].after, renumbered, "{opts}: {o:?}");
    }
}
