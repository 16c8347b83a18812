//! Micro-benchmarks of the daemon's hot paths, through the library API and
//! without FUSE: option parsing, name lookup (hit, miss, and a miss over 50
//! lowers) and the merged listing of a large directory.
//!
//! `cargo bench --bench hot_paths` (no root needed; layers are temp dirs).

use criterion::{criterion_group, criterion_main, Criterion};
use rovl::options::{self, MountConfig};
use rovl::overlay::Overlay;
use std::ffi::OsStr;
use std::fs;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Entries of the large merged directory.
const BIG: usize = 10_000;
/// Lowers of the deep stack.
const DEEP: usize = 50;

fn parse(opts: &str) -> MountConfig {
    let split = options::split_options(opts);
    options::parse(&split, Path::new("merged"), None, Path::new("/work")).expect("valid options")
}

fn bench_options(c: &mut Criterion) {
    let simple = "lowerdir=/l/a:/l/b:/l/c,upperdir=/u/upper,workdir=/u/work,noatime,nodev";
    let lowers: Vec<String> = (0..DEEP).map(|i| format!("/layers/l{i:02}")).collect();
    let deep = format!(
        "lowerdir={},upperdir=/u/upper,workdir=/u/work,cache_entries=1000",
        lowers.join(":")
    );
    let escaped = r"lowerdir=/l/with\:colon:/l/with\,comma,upperdir=/u/up,workdir=/u/wk";
    let mut g = c.benchmark_group("options");
    g.bench_function("split+parse 3 lowers", |b| {
        b.iter(|| parse(black_box(simple)))
    });
    g.bench_function("split+parse 50 lowers", |b| {
        b.iter(|| parse(black_box(&deep)))
    });
    g.bench_function("split+parse escapes", |b| {
        b.iter(|| parse(black_box(escaped)))
    });
    g.finish();
}

/// Temp layers: `lowers` lower dirs (top first), an upper and a work dir.
struct Layers {
    _dir: tempfile::TempDir,
    lowers: Vec<PathBuf>,
    upper: PathBuf,
    work: PathBuf,
}

impl Layers {
    fn new(lowers: usize) -> Layers {
        let dir = tempfile::tempdir().expect("temp dir");
        let lowers: Vec<PathBuf> = (0..lowers)
            .map(|i| dir.path().join(format!("l{i:02}")))
            .collect();
        let (upper, work) = (dir.path().join("upper"), dir.path().join("work"));
        for d in lowers.iter().chain([&upper]) {
            fs::create_dir_all(d).expect("layer dir");
        }
        // The overlay opens W/work, as the kernel prepares it.
        fs::create_dir_all(work.join("work")).expect("work dir");
        Layers {
            _dir: dir,
            lowers,
            upper,
            work,
        }
    }

    fn overlay(&self) -> Overlay {
        let lower: Vec<String> = self
            .lowers
            .iter()
            .map(|l| options::escape_path(&l.display().to_string()))
            .collect();
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.join(":"),
            options::escape_path(&self.upper.display().to_string()),
            options::escape_path(&self.work.display().to_string())
        );
        let cfg = parse(&opts);
        let p = rovl::prepare::prepare(&cfg).expect("prepare temp layers");
        Overlay::new(&cfg, p.layers, p.workdir.as_ref()).expect("overlay over temp layers")
    }
}

fn touch(p: &Path) {
    fs::write(p, b"").expect("create file");
}

/// Looks `name` up under `parent` and forgets it again, as the kernel would
/// after a dentry eviction, so the table does not grow across iterations.
fn lookup_forget(ovl: &Overlay, parent: u64, name: &OsStr) -> bool {
    match ovl.lookup(parent, name) {
        Ok((node, st)) => {
            black_box(st.st_size);
            ovl.forget(node.nodeid, 1);
            true
        }
        Err(_) => false,
    }
}

fn bench_lookup(c: &mut Criterion) {
    // `big/` merged over 2 lowers and the upper.
    let l = Layers::new(2);
    for d in l.lowers.iter().chain([&l.upper]) {
        fs::create_dir_all(d.join("big")).expect("big dir");
    }
    for i in 0..BIG {
        let layer = match i % 3 {
            0 => &l.upper,
            k => &l.lowers[k - 1],
        };
        touch(&layer.join(format!("big/e{i:06}")));
    }
    let ovl = l.overlay();
    let (big, _) = ovl.lookup(1, OsStr::new("big")).expect("big dir");
    let big_id = big.nodeid;

    let mut g = c.benchmark_group("lookup");
    let present = OsStr::new("e004999");
    assert!(lookup_forget(&ovl, big_id, present), "present name");
    g.bench_function("hit (bottom lower of 3 layers)", |b| {
        b.iter(|| lookup_forget(&ovl, big_id, black_box(present)))
    });
    let missing = OsStr::new("missing");
    assert!(!lookup_forget(&ovl, big_id, missing), "missing name");
    g.bench_function("miss (3 layers)", |b| {
        b.iter(|| lookup_forget(&ovl, big_id, black_box(missing)))
    });

    // `d/` merged over 50 lowers; names only in the bottom one, and absent.
    let deep = Layers::new(DEEP);
    for d in &deep.lowers {
        fs::create_dir_all(d.join("d")).expect("deep dir");
    }
    touch(&deep.lowers[DEEP - 1].join("d/bottom"));
    let dovl = deep.overlay();
    let (d, _) = dovl.lookup(1, OsStr::new("d")).expect("deep dir");
    let d_id = d.nodeid;
    let bottom = OsStr::new("bottom");
    assert!(lookup_forget(&dovl, d_id, bottom), "bottom name");
    g.bench_function("hit (bottom of 50 lowers)", |b| {
        b.iter(|| lookup_forget(&dovl, d_id, black_box(bottom)))
    });
    g.bench_function("miss (50 lowers)", |b| {
        b.iter(|| lookup_forget(&dovl, d_id, black_box(missing)))
    });
    g.finish();

    let mut g = c.benchmark_group("readdir");
    let n = ovl.read_merged(&big, false).expect("listing").len();
    assert_eq!(n, BIG + 2, "merged listing size");
    g.bench_function("merged 10k entries over 3 layers", |b| {
        b.iter(|| black_box(ovl.read_merged(&big, false).map(|v| v.len())))
    });
    g.bench_function("merged dir over 50 lowers", |b| {
        b.iter(|| black_box(dovl.read_merged(&d, false).map(|v| v.len())))
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50)
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_options, bench_lookup
}
criterion_main!(benches);
