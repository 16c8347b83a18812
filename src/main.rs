//! The `rovl` command: mount, unmount and list overlays (see `cli`).
//!
//! Forms: `rovl mount [-f] -o OPTS [SOURCE] MERGED`, `rovl umount MERGED`,
//! `rovl SOURCE MERGED -o OPTS` (mount.fuse3) and `rovl -o OPTS MERGED` (fuse-overlayfs).

#![forbid(unsafe_code)]

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
