//! The command line: three ways to mount (`rovl mount -o OPTS MERGED`,
//! fuse-overlayfs' `rovl -o OPTS MERGED`, mount.fuse3's `rovl SOURCE MERGED
//! -o OPTS`) and the other subcommands, with help a newcomer can follow.

use clap::{Args, CommandFactory, Parser, Subcommand};
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::LazyLock;

/// The mount options, one line each, under `--help`.
const OPTIONS_HELP: &str = "\
Mount options (-o, comma separated; details: docs/options.md):
  lowerdir=L1[:L2...]    read-only layers, leftmost on top (required)
  upperdir=U,workdir=W   the writable layer and its scratch dir (same fs)
  ro                     read-only even with an upper layer
  redirect_dir=on|off|follow|nofollow   rename merged dirs (default on)
  index=on|off           keep lower hard links linked on copy-up
  metacopy=on|off        copy metadata only until the data is written
  xino=on|off|auto       unique inode numbers across filesystems
  userxattr              user.overlay.* xattrs (rootless)
  volatile               no fsync of the upper layer
  passthrough=off|upper|all   FUSE passthrough of file data (default all)
  io_uring=on|off        FUSE over io_uring where the kernel offers it (default on)
  uidmapping=, gidmapping=, squash_to_root, xattr_permissions=1|2
                         fuse-overlayfs' options for container engines
  allow_other, allow_root, default_permissions, nodev, nosuid, noexec
Example:
  rovl mount -o lowerdir=./low,upperdir=./upper,workdir=./work ./merged";

/// `--version`: the FUSE protocol this build speaks and the running kernel.
static LONG_VERSION: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{}\nfuser 0.18 (FUSE protocol 7.40, no libfuse)\nkernel {}",
        env!("CARGO_PKG_VERSION"),
        kernel_release()
    )
});

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

pub fn long_version() -> &'static str {
    LONG_VERSION.as_str()
}

const SUBCOMMANDS: [&str; 10] = [
    "mount",
    "umount",
    "list",
    "stats",
    "diff",
    "apply",
    "check",
    "version",
    "completions",
    "man",
];

/// What to say before clap parses: bare `rovl`, or a first word close to
/// a subcommand (which the `SOURCE MERGED` form would take as a source).
pub fn early_check(argv: &[OsString]) -> Option<String> {
    let Some(first) = argv.get(1) else {
        return Some(format!(
            "{}\n\n{}",
            short_usage(),
            "rovl --help shows more."
        ));
    };
    let first = first.to_str()?;
    if first.starts_with('-') || SUBCOMMANDS.contains(&first) || first.contains('/') {
        return None;
    }
    let near = SUBCOMMANDS
        .iter()
        .filter(|s| {
            strsim::damerau_levenshtein(first, s) <= 2 || (first.len() >= 2 && s.starts_with(first))
        })
        .min_by_key(|s| strsim::damerau_levenshtein(first, s))?;
    Some(format!(
        "rovl: unknown command '{first}': did you mean 'rovl {near}'?\n{}",
        short_usage()
    ))
}

pub fn short_usage() -> String {
    "usage: rovl mount -o lowerdir=L1[:L2...][,upperdir=U,workdir=W] MERGED\n       \
     rovl umount [-l] MERGED\n       \
     rovl list [--json]\n       \
     rovl stats MERGED\n       \
     rovl diff [--lower L1[:L2...]] UPPER > layer.tar\n       \
     rovl apply layer.tar DIR\n       \
     rovl check UPPER WORKDIR [--lower L1[:L2...]] [--repair]"
        .to_string()
}

/// The man page, generated from these definitions.
pub fn man_page() -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    clap_mangen::Man::new(Cli::command()).render(&mut out)?;
    Ok(out)
}

pub fn completions(shell: clap_complete::Shell) -> Vec<u8> {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "rovl", &mut out);
    out
}

#[derive(Args, Debug, Clone, Default)]
pub struct Common {
    /// Stay in the foreground instead of forking a daemon.
    #[arg(short = 'f', long)]
    pub foreground: bool,
    /// Debug logging: each request with its outcome, caller pid and
    /// duration (RUST_LOG=rovl=debug unless set); implies --foreground.
    #[arg(short = 'd', long)]
    pub debug: bool,
    /// Append the log here (a daemon's stderr goes to /dev/null once the
    /// mount is ready).
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
}

#[derive(Parser, Debug)]
#[command(
    name = "rovl",
    version,
    long_version = LONG_VERSION.as_str(),
    about = "Userspace overlay filesystem (kernel overlayfs compatible) over FUSE",
    after_help = OPTIONS_HELP,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Option<Cmd>,
    #[command(flatten)]
    pub common: Common,
    /// Mount options, comma separated (may be repeated).
    #[arg(short = 'o', value_name = "OPTS")]
    pub options: Vec<String>,
    /// `[SOURCE] MERGED`: optional source name and the mountpoint.
    #[arg(value_name = "[SOURCE] MERGED", num_args = 1..=2, required = true)]
    pub args: Vec<OsString>,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Mount an overlay at MERGED.
    #[command(after_help = OPTIONS_HELP)]
    Mount(MountArgs),
    /// Unmount the overlay at MERGED.
    Umount(UmountArgs),
    /// List rovl mounts: mountpoint, layers, options, daemon pid, uptime.
    List(ListArgs),
    /// Print a mount's counters: requests by type, errors, copy-ups, caches.
    Stats(StatsArgs),
    /// Write an upper dir as an OCI layer (tar; --gzip, --zstd) and print
    /// its digest and diff-id.
    Diff(DiffArgs),
    /// Extract an OCI layer (tar, gzip or zstd) into a new dir in the
    /// overlay format (whiteouts as 0/0 devices, opaque xattrs).
    Apply(ApplyArgs),
    /// Check (and with --repair fix) an unmounted overlay's upper dir and
    /// workdir, like fsck.overlay. Exit 0 clean, 1 all repaired, 4 left.
    Check(CheckArgs),
    /// Print the version, with the FUSE protocol and kernel.
    Version,
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff) to stdout.
    Man,
}

#[derive(Args, Debug)]
pub struct MountArgs {
    #[command(flatten)]
    pub common: Common,
    /// Mount options, comma separated (may be repeated):
    /// lowerdir=L1[:L2...],upperdir=U,workdir=W,...
    #[arg(short = 'o', value_name = "OPTS", required = true)]
    pub options: Vec<String>,
    /// `[SOURCE] MERGED`: optional source name and the mountpoint.
    #[arg(value_name = "[SOURCE] MERGED", num_args = 1..=2, required = true)]
    pub args: Vec<OsString>,
}

#[derive(Args, Debug)]
pub struct UmountArgs {
    #[command(flatten)]
    pub common: Common,
    /// Detach now, and finish unmounting once the mount is no longer busy.
    #[arg(short = 'l', long)]
    pub lazy: bool,
    pub mountpoint: PathBuf,
}

#[derive(Args, Debug)]
pub struct StatsArgs {
    pub mountpoint: PathBuf,
    /// The daemon's JSON, for tools.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// One JSON array, for tools.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct DiffArgs {
    /// The upper dir (unmounted, or not being written).
    pub upper: PathBuf,
    /// The lower layers it was mounted over, leftmost on top: needed to
    /// resolve renamed dirs and metadata-only copies, and to mark only the
    /// opaque dirs that hide something.
    #[arg(long, value_name = "L1[:L2...]")]
    pub lower: Option<String>,
    /// Write the layer here instead of stdout.
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// gzip the layer.
    #[arg(long, conflicts_with = "zstd")]
    pub gzip: bool,
    /// zstd the layer.
    #[arg(long)]
    pub zstd: bool,
    /// Print the digest, diff-id and size as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ApplyArgs {
    /// The layer: a tar, gzip'd or zstd'd ("-": stdin).
    pub layer: PathBuf,
    /// The dir to extract into: missing or empty.
    pub dir: PathBuf,
    /// Write user.overlay.* markers (for userxattr mounts; the default
    /// when not root) instead of trusted.overlay.*.
    #[arg(long)]
    pub userxattr: bool,
    /// Create the device nodes the layer holds (refused by default).
    #[arg(long)]
    pub allow_devices: bool,
    /// Print what was applied as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The upper dir.
    pub upper: PathBuf,
    /// The workdir.
    pub work: PathBuf,
    /// The lower layers, leftmost on top: needed to find orphan
    /// whiteouts, redirects that point nowhere, lost metacopy data.
    #[arg(long, value_name = "L1[:L2...]")]
    pub lower: Option<String>,
    /// Fix what is safe to fix, and say what was done.
    #[arg(long)]
    pub repair: bool,
    /// Repairs write user.overlay.* markers (the default when not root).
    #[arg(long)]
    pub userxattr: bool,
    /// The findings as JSON.
    #[arg(long)]
    pub json: bool,
}
