//! Deterministic data sets. Every subject gets its own copy with the same
//! bytes: as overlay layers (top first), or flattened into one directory
//! for the plain-tmpfs floor (upper layers written last, so they win).

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

/// Sizes at the chosen scale; scale 1 is the full size.
#[derive(Clone, Debug)]
pub struct Sizes {
    /// Files of the `find`/stat tree (20k).
    pub tree_files: usize,
    /// Entries of the large merged directory (100k).
    pub big_entries: usize,
    /// Lower files removed by `rm -rf` (10k).
    pub rm_files: usize,
    /// Files in the tarball (16k).
    pub tar_files: usize,
    /// Lower files copied up (32, not scaled) and their size (8 MiB).
    pub cu_files: usize,
    pub cu_bytes: usize,
    /// Files per layer in the 50-lower directory.
    pub stat_per_layer: usize,
    /// Tracked files of the git repository.
    pub git_files: usize,
    /// MiB written by `dd` and read by `dd`/fio (1 GiB).
    pub data_mib: usize,
}

impl Sizes {
    pub fn new(scale: f64) -> Sizes {
        let n = |full: usize, min: usize| ((full as f64 * scale).round() as usize).max(min);
        Sizes {
            tree_files: n(20_000, 200),
            big_entries: n(100_000, 1_000),
            rm_files: n(10_000, 100),
            tar_files: n(16_000, 160),
            cu_files: 32,
            cu_bytes: n(8 << 20, 64 << 10),
            stat_per_layer: n(40, 2),
            git_files: n(8_000, 80),
            data_mib: n(1024, 8),
        }
    }

    /// Files per leaf directory of the tree (20 top dirs of 10 leaves each).
    pub fn tree_per_leaf(&self) -> usize {
        self.tree_files.div_ceil(TREE_TOP * TREE_SUB)
    }
}

/// Entries of the memory walks at `scale`: the 200k and 1M at scale 1.
pub fn mem_sizes(scale: f64) -> Vec<usize> {
    [200_000, 1_000_000]
        .map(|full: usize| ((full as f64 * scale).round() as usize).max(2_000))
        .to_vec()
}

/// Directories and entries below `rss/` of a memory tree of `n` files.
pub fn rss_counts(n: usize) -> (usize, usize) {
    (n.div_ceil(RSS_PER_DIR), n)
}

pub const TREE_TOP: usize = 20;
pub const TREE_SUB: usize = 10;
pub const STAT_LOWERS: usize = 50;
const RSS_PER_DIR: usize = 1000;
const RM_DIRS: usize = 100;
/// A fixed mtime (2024-01-01) for the git files, so its index is never racy.
const GIT_MTIME: u64 = 1_704_067_200;

/// What a workload mounts. Each data set has its own layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataSet {
    /// `tree/tNN/sNN/fNNNN`: small files over 2 lowers, merged dirs, some shadowed.
    Tree,
    /// `big/eNNNNNN`: empty files over 2 lowers, one merged directory.
    Big,
    /// `rss/dNNNN/fNNNN`: a tree of this many empty files over 2 lowers.
    Rss(usize),
    /// `victim/dNN/fNNNN` over 2 lowers, to be removed.
    Remove,
    /// `cu/fNN`: large lower files, to be copied up.
    CopyUp,
    /// `d/lLL_NNN`: one directory merged over 50 lowers.
    Stat50,
    /// `repo/`: a committed git repository in a lower.
    Git,
    /// `x/`: an empty lower directory to write into.
    Scratch,
    /// `data/big.bin`: one large lower file.
    Data,
}

impl DataSet {
    pub fn name(self) -> &'static str {
        match self {
            DataSet::Tree => "tree",
            DataSet::Big => "big",
            DataSet::Rss(_) => "rss",
            DataSet::Remove => "victim",
            DataSet::CopyUp => "cu",
            DataSet::Stat50 => "d",
            DataSet::Git => "repo",
            DataSet::Scratch => "x",
            DataSet::Data => "data",
        }
    }

    /// The directory holding a subject's copy: sizes of one kind differ.
    pub fn dir_name(self) -> String {
        match self {
            DataSet::Rss(n) => format!("rss-{n}"),
            _ => self.name().to_string(),
        }
    }

    /// Its size, for the report.
    pub fn describe(self, s: &Sizes) -> String {
        match self {
            DataSet::Tree => format!(
                "{} files in {} dirs over 2 lowers",
                s.tree_per_leaf() * TREE_TOP * TREE_SUB,
                TREE_TOP * TREE_SUB
            ),
            DataSet::Big => format!("{} entries in one dir over 2 lowers", s.big_entries),
            DataSet::Rss(n) => format!("{n} empty files in {} dirs over 2 lowers", rss_counts(n).0),
            DataSet::Remove => format!(
                "{} files in {RM_DIRS} dirs over 2 lowers",
                s.rm_files.div_ceil(RM_DIRS) * RM_DIRS
            ),
            DataSet::CopyUp => format!("{} lower files of {} KiB", s.cu_files, s.cu_bytes >> 10),
            DataSet::Stat50 => format!("{STAT_LOWERS} lowers, {} names each", s.stat_per_layer),
            DataSet::Git => format!("{} tracked files in a lower", s.git_files),
            DataSet::Scratch => "an empty lower dir".into(),
            DataSet::Data => format!("a {} MiB lower file", s.data_mib),
        }
    }

    /// The top-level entry every subject must show once mounted.
    pub fn root_entry(self) -> &'static str {
        self.name()
    }

    pub fn lowers(self) -> usize {
        match self {
            DataSet::Tree | DataSet::Big | DataSet::Rss(_) | DataSet::Remove => 2,
            DataSet::Stat50 => STAT_LOWERS,
            DataSet::CopyUp | DataSet::Git | DataSet::Scratch | DataSet::Data => 1,
        }
    }

    /// Writes the data set into `dest`.
    pub fn generate(self, sizes: &Sizes, dest: &Dest) -> Result<(), String> {
        let mut g = Gen::new(dest, self.lowers());
        let r = match self {
            DataSet::Tree => gen_tree(&mut g, sizes),
            DataSet::Big => gen_big(&mut g, sizes),
            DataSet::Rss(n) => gen_rss(&mut g, n),
            DataSet::Remove => gen_remove(&mut g, sizes),
            DataSet::CopyUp => gen_copyup(&mut g, sizes),
            DataSet::Stat50 => gen_stat50(&mut g, sizes),
            DataSet::Git => gen_git(&mut g, sizes),
            DataSet::Scratch => g.dir(0, "x"),
            DataSet::Data => g.big_file(0, "data/big.bin", sizes.data_mib << 20),
        };
        r.map_err(|e| format!("generating {}: {e}", self.name()))?;
        if self == DataSet::Git {
            git_commit(&g.path(0, "repo"))?;
        }
        Ok(())
    }
}

/// Where a data set goes.
pub enum Dest {
    /// Lower layer directories, top first.
    Layers(Vec<PathBuf>),
    /// One directory holding the merged view.
    Flat(PathBuf),
}

/// Writes layer contents; the same seed gives the same bytes everywhere.
struct Gen<'a> {
    dest: &'a Dest,
    rng: Rng,
}

impl<'a> Gen<'a> {
    fn new(dest: &'a Dest, lowers: usize) -> Gen<'a> {
        if let Dest::Layers(l) = dest {
            assert_eq!(l.len(), lowers, "layer count of the data set");
        }
        Gen {
            dest,
            rng: Rng(0x9e37_79b9_7f4a_7c15),
        }
    }

    fn path(&self, layer: usize, rel: &str) -> PathBuf {
        match self.dest {
            Dest::Layers(l) => l[layer].join(rel),
            Dest::Flat(d) => d.join(rel),
        }
    }

    fn dir(&mut self, layer: usize, rel: &str) -> io::Result<()> {
        fs::create_dir_all(self.path(layer, rel))
    }

    fn file(&mut self, layer: usize, rel: &str, len: usize) -> io::Result<()> {
        let mut buf = vec![0u8; len];
        self.rng.fill(&mut buf);
        fs::write(self.path(layer, rel), buf)
    }

    fn big_file(&mut self, layer: usize, rel: &str, len: usize) -> io::Result<()> {
        let p = self.path(layer, rel);
        if let Some(d) = p.parent() {
            fs::create_dir_all(d)?;
        }
        let mut f = File::create(p)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len());
            self.rng.fill(&mut buf[..n]);
            f.write_all(&buf[..n])?;
            left -= n;
        }
        Ok(())
    }
}

/// xorshift64*: deterministic and fast enough to fill gigabytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Layers a name of index `i` lives in, bottom first (so the flat copy ends
/// with the top version): one of two by parity, both for every `shadow`-th.
fn two_layers(i: usize, shadow: usize) -> &'static [usize] {
    if i.is_multiple_of(shadow) {
        &[1, 0]
    } else if i.is_multiple_of(2) {
        &[0]
    } else {
        &[1]
    }
}

fn gen_tree(g: &mut Gen, s: &Sizes) -> io::Result<()> {
    for t in 0..TREE_TOP {
        for d in 0..TREE_SUB {
            let dir = format!("tree/t{t:02}/s{d:02}");
            for layer in [1, 0] {
                g.dir(layer, &dir)?;
            }
            for f in 0..s.tree_per_leaf() {
                for &layer in two_layers(f, 10) {
                    let len = 100 + g.rng.below(4000) as usize;
                    g.file(layer, &format!("{dir}/f{f:04}"), len)?;
                }
            }
        }
    }
    Ok(())
}

fn gen_big(g: &mut Gen, s: &Sizes) -> io::Result<()> {
    for layer in [1, 0] {
        g.dir(layer, "big")?;
    }
    for i in 0..s.big_entries {
        for &layer in two_layers(i, 100) {
            File::create(g.path(layer, &format!("big/e{i:06}")))?;
        }
    }
    Ok(())
}

/// Empty files only: a 1M-entry copy per daemon subject then costs slab, not pages.
fn gen_rss(g: &mut Gen, n: usize) -> io::Result<()> {
    for d in 0..rss_counts(n).0 {
        let dir = format!("rss/d{d:04}");
        for layer in [1, 0] {
            g.dir(layer, &dir)?;
        }
        for f in 0..RSS_PER_DIR.min(n - d * RSS_PER_DIR) {
            File::create(g.path(f % 2, &format!("{dir}/f{f:04}")))?;
        }
    }
    Ok(())
}

fn gen_remove(g: &mut Gen, s: &Sizes) -> io::Result<()> {
    let per = s.rm_files.div_ceil(RM_DIRS);
    for d in 0..RM_DIRS {
        let dir = format!("victim/d{d:02}");
        for layer in [1, 0] {
            g.dir(layer, &dir)?;
        }
        for f in 0..per {
            let len = g.rng.below(512) as usize;
            g.file(f % 2, &format!("{dir}/f{f:04}"), len)?;
        }
    }
    Ok(())
}

fn gen_copyup(g: &mut Gen, s: &Sizes) -> io::Result<()> {
    for i in 0..s.cu_files {
        g.big_file(0, &format!("cu/f{i:02}"), s.cu_bytes)?;
    }
    Ok(())
}

/// Names present in the 50-lower directory: each layer holds its own.
pub fn stat50_present(s: &Sizes) -> Vec<String> {
    (0..STAT_LOWERS)
        .flat_map(|l| (0..s.stat_per_layer).map(move |j| format!("l{l:02}_{j:03}")))
        .collect()
}

/// As many names that no layer holds.
pub fn stat50_missing(s: &Sizes) -> Vec<String> {
    (0..STAT_LOWERS * s.stat_per_layer)
        .map(|j| format!("m{j:05}"))
        .collect()
}

fn gen_stat50(g: &mut Gen, s: &Sizes) -> io::Result<()> {
    for l in (0..STAT_LOWERS).rev() {
        g.dir(l, "d")?;
        for j in 0..s.stat_per_layer {
            g.file(l, &format!("d/l{l:02}_{j:03}"), 64)?;
        }
    }
    Ok(())
}

fn gen_git(g: &mut Gen, s: &Sizes) -> io::Result<()> {
    let mtime = SystemTime::UNIX_EPOCH + Duration::from_secs(GIT_MTIME);
    let per_dir = 100;
    for i in 0..s.git_files {
        let dir = format!("repo/src/d{:03}", i / per_dir);
        if i % per_dir == 0 {
            g.dir(0, &dir)?;
        }
        let rel = format!("{dir}/f{i:05}.txt");
        let len = 200 + g.rng.below(3000) as usize;
        let mut text = vec![b'a'; len];
        for (k, b) in text.iter_mut().enumerate() {
            *b = if k % 64 == 63 {
                b'\n'
            } else {
                b'a' + (g.rng.below(26) as u8)
            };
        }
        let p = g.path(0, &rel);
        fs::write(&p, text)?;
        File::options().write(true).open(&p)?.set_modified(mtime)?;
    }
    Ok(())
}

/// Environment for every git command: no user or system config.
pub fn git_env(c: &mut Command) -> &mut Command {
    c.env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_DATE", "2024-01-01T00:00:00Z")
        .env("GIT_COMMITTER_DATE", "2024-01-01T00:00:00Z")
}

fn git_commit(repo: &Path) -> Result<(), String> {
    let steps: [&[&str]; 3] = [
        &["init", "-q", "-b", "main"],
        &["add", "-A"],
        // No auto gc: a detached one would pack and prune the objects
        // while the subjects already read them.
        &[
            "-c",
            "gc.auto=0",
            "-c",
            "maintenance.auto=false",
            "-c",
            "user.name=bench",
            "-c",
            "user.email=bench@localhost",
            "commit",
            "-q",
            "-m",
            "init",
        ],
    ];
    for args in steps {
        run_quiet(git_env(Command::new("git").arg("-C").arg(repo).args(args)))?;
    }
    Ok(())
}

/// Builds the tarball to extract (shared by all subjects: it is only read).
pub fn make_tarball(dir: &Path, s: &Sizes) -> Result<PathBuf, String> {
    let src = dir.join("tarsrc");
    let tar = dir.join("files.tar");
    let mut rng = Rng(0x5eed);
    let per_dir = 100;
    for i in 0..s.tar_files {
        let d = src.join(format!("p{:03}", i / per_dir));
        if i % per_dir == 0 {
            fs::create_dir_all(&d).map_err(|e| format!("tarball source: {e}"))?;
        }
        let mut buf = vec![0u8; 100 + rng.below(2000) as usize];
        rng.fill(&mut buf);
        fs::write(d.join(format!("f{i:05}")), buf).map_err(|e| format!("tarball source: {e}"))?;
    }
    run_quiet(
        Command::new("tar")
            .arg("-cf")
            .arg(&tar)
            .arg("-C")
            .arg(&src)
            .arg("."),
    )?;
    fs::remove_dir_all(&src).map_err(|e| format!("removing tarball source: {e}"))?;
    Ok(tar)
}

/// Runs a setup command; its output matters only when it fails.
pub fn run_quiet(c: &mut Command) -> Result<(), String> {
    let out = c
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{c:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(format!("{c:?}: {}: {}", out.status, err.trim()))
    }
}
