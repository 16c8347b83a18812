//! The seed experiment ("overlayFS简单实战"), step by step, on rovl.
//!
//! Run as root after building the binary:
//!
//! ```text
//! cargo build && cargo run --example walkthrough   (as root; else sudo -E)
//! ```
//!
//! It makes `low/11.txt`, `upper/22.txt`, `work/` and `merged/` in a temp dir,
//! mounts rovl over them, edits and deletes a lower file through the mount,
//! and shows what lands in the upper layer at each step. Every mount it makes
//! is unmounted on the way out, even when a step fails.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::ExitCode;

mod support;
use support::*;

const ONES: &str = "1111111111111111111111\n";
const TWOS: &str = "2222222\n";
const THREES: &str = "333333333\n";

fn main() -> ExitCode {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("walkthrough: must run as root (rovl mounts /dev/fuse with mount(2))");
        eprintln!("  try: cargo build && sudo -E cargo run --example walkthrough");
        return ExitCode::FAILURE;
    }
    if !Path::new("/dev/fuse").exists() {
        eprintln!("walkthrough: /dev/fuse does not exist (modprobe fuse, or run the container with --device /dev/fuse)");
        return ExitCode::FAILURE;
    }
    let rovl = match find_rovl() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("walkthrough: {e}");
            return ExitCode::FAILURE;
        }
    };
    match run(&rovl) {
        Ok(()) => {
            println!("\nDone: every step behaved as kernel overlayfs does.");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("walkthrough: {e}");
            ExitCode::FAILURE
        }
    }
}

fn read(p: &Path) -> Result<String> {
    fs::read_to_string(p).map_err(io_err(p.display()))
}

fn write(p: &Path, s: &str) -> Result<()> {
    fs::write(p, s).map_err(io_err(p.display()))
}

/// `cat`, printing the content as the shell would.
fn cat(root: &Path, rel: &str) -> Result<String> {
    cmd(&format!("cat {rel}"));
    let s = read(&root.join(rel))?;
    print!("{s}");
    Ok(s)
}

/// Sorted names in a directory, like `ls`.
fn ls(root: &Path, rel: &str) -> Result<Vec<String>> {
    let p = root.join(rel);
    let mut names: Vec<String> = fs::read_dir(&p)
        .map_err(io_err(p.display()))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<io::Result<_>>()
        .map_err(io_err(p.display()))?;
    names.sort();
    Ok(names)
}

fn print_ls(root: &Path, rel: &str) -> Result<Vec<String>> {
    cmd(&format!("ls {rel}"));
    let names = ls(root, rel)?;
    println!("{}", names.join("  "));
    Ok(names)
}

/// `ls -l`'s mode column.
fn mode_string(md: &fs::Metadata) -> String {
    let ft = md.file_type();
    let t = if ft.is_dir() {
        'd'
    } else if ft.is_symlink() {
        'l'
    } else if ft.is_char_device() {
        'c'
    } else if ft.is_block_device() {
        'b'
    } else if ft.is_fifo() {
        'p'
    } else if ft.is_socket() {
        's'
    } else {
        '-'
    };
    let m = md.permissions().mode();
    let mut s = String::from(t);
    for shift in [6, 3, 0] {
        let bits = (m >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

fn major_minor(rdev: u64) -> (u32, u32) {
    (
        libc::major(rdev as libc::dev_t),
        libc::minor(rdev as libc::dev_t),
    )
}

/// One `ls -ln` line (size, or `major, minor` for devices).
fn ls_l(root: &Path, rel: &str) -> Result<fs::Metadata> {
    cmd(&format!("ls -ln {rel}"));
    let p = root.join(rel);
    let md = fs::symlink_metadata(&p).map_err(io_err(p.display()))?;
    let ft = md.file_type();
    let size = if ft.is_char_device() || ft.is_block_device() {
        let (ma, mi) = major_minor(md.rdev());
        format!("{ma}, {mi}")
    } else {
        md.len().to_string()
    };
    println!(
        "{} {} {} {} {size} {rel}",
        mode_string(&md),
        md.nlink(),
        md.uid(),
        md.gid()
    );
    Ok(md)
}

/// `ls -i` of one path: its inode number.
fn ls_i(root: &Path, rel: &str) -> Result<u64> {
    let p = root.join(rel);
    let ino = fs::symlink_metadata(&p).map_err(io_err(p.display()))?.ino();
    println!("$ ls -i {rel}\n{ino} {rel}");
    Ok(ino)
}

/// A small `tree`: every entry below `root`, without descending into `merged`
/// when it is not mounted (it is empty then anyway).
fn tree(root: &Path) -> Result<()> {
    cmd("tree");
    println!(".");
    tree_rec(root, "")
}

fn tree_rec(dir: &Path, prefix: &str) -> Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .map_err(io_err(dir.display()))?
        .collect::<io::Result<_>>()
        .map_err(io_err(dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    let n = entries.len();
    for (i, e) in entries.into_iter().enumerate() {
        let last = i + 1 == n;
        let name = e.file_name().to_string_lossy().into_owned();
        let md = fs::symlink_metadata(e.path()).map_err(io_err(e.path().display()))?;
        let note = if md.file_type().is_char_device() {
            let (ma, mi) = major_minor(md.rdev());
            format!("  [{} {ma},{mi}: whiteout]", mode_string(&md))
        } else {
            String::new()
        };
        println!("{prefix}{}{name}{note}", if last { "└── " } else { "├── " });
        if md.is_dir() {
            let deeper = format!("{prefix}{}", if last { "    " } else { "│   " });
            // W/work is mode 0000; root can still list it.
            tree_rec(&e.path(), &deeper)?;
        }
    }
    Ok(())
}

fn proc_mounts_line(p: &Path) -> Option<String> {
    let mounts = fs::read_to_string("/proc/mounts").ok()?;
    let want = p.to_string_lossy();
    mounts
        .lines()
        .rfind(|l| l.split(' ').nth(1) == Some(want.as_ref()))
        .map(str::to_string)
}

fn run(rovl: &Path) -> Result<()> {
    println!("Using {}", rovl.display());
    let dir = tempfile::Builder::new()
        .prefix("rovl-walkthrough-")
        .tempdir_in("/tmp")
        .map_err(io_err("cannot create a temp dir under /tmp"))?;
    let root = fs::canonicalize(dir.path()).map_err(io_err(dir.path().display()))?;
    // Dropped before `dir`: the mount goes away before the temp dir is removed.
    let result = experiment(rovl, &root);
    if mounted_fstype(&root.join("merged")).is_some() {
        let why = result.err().unwrap_or_default();
        return Err(format!(
            "{why}\n{} is still mounted; not removing the temp dir",
            root.join("merged").display()
        ));
    }
    drop(dir);
    result
}

fn experiment(rovl: &Path, root: &Path) -> Result<()> {
    let opts = "lowerdir=./low,upperdir=./upper,workdir=./work";
    let mount_cmd = format!("rovl mount -o {opts} ./merged");

    step(1, "Make the layers");
    println!("(in {})", root.display());
    for d in ["low", "upper", "work", "merged"] {
        fs::create_dir(root.join(d)).map_err(io_err(d))?;
    }
    cmd("mkdir low upper work merged");
    cmd("echo 1111111111111111111111 > low/11.txt");
    write(&root.join("low/11.txt"), ONES)?;
    cmd("echo 2222222 > upper/22.txt");
    write(&root.join("upper/22.txt"), TWOS)?;
    tree(root)?;

    step(2, "Mount rovl: low and upper merge into merged");
    cmd(&mount_cmd);
    println!("   (this example adds -f and owns the daemon, so it can always unmount it)");
    let m = Mount::start(rovl, root, opts, "./merged")?;
    cmd("grep merged /proc/mounts");
    if let Some(line) = proc_mounts_line(&root.join("merged")) {
        println!("{line}");
    }
    println!("   rovl prepared work/work (empty, mode 0000) as the kernel does:");
    tree(root)?;
    let names = print_ls(root, "merged")?;
    check(
        names == ["11.txt", "22.txt"],
        "merged shows 11.txt from low and 22.txt from upper",
    )?;

    step(3, "Read through the mount");
    let s11 = cat(root, "merged/11.txt")?;
    let s22 = cat(root, "merged/22.txt")?;
    check(s11 == ONES && s22 == TWOS, "contents come from the layers")?;

    step(4, "Edit 11.txt through the mount (copy-up)");
    cmd("echo 333333333 > merged/11.txt");
    write(&root.join("merged/11.txt"), THREES)?;
    cat(root, "merged/11.txt")?;
    let low = cat(root, "low/11.txt")?;
    let up = cat(root, "upper/11.txt")?;
    check(low == ONES, "low/11.txt is unchanged")?;
    check(up == THREES, "upper/11.txt now holds the edited copy")?;

    step(5, "Inode numbers (ls -i)");
    let i_merged = ls_i(root, "merged/11.txt")?;
    let i_upper = ls_i(root, "upper/11.txt")?;
    let i_low = ls_i(root, "low/11.txt")?;
    println!(
        "   The seed's old kernel showed the upper file's number in merged. Current kernel\n   \
         overlayfs, and rovl, keep the lower file's number across copy-up, so a file's\n   \
         inode number never changes while it is in use."
    );
    check(
        i_merged == i_low && i_merged != i_upper,
        "merged/11.txt keeps low/11.txt's inode number after copy-up",
    )?;

    step(6, "Delete 11.txt through the mount (whiteout)");
    cmd("rm merged/11.txt");
    fs::remove_file(root.join("merged/11.txt")).map_err(io_err("rm merged/11.txt"))?;
    let names = print_ls(root, "merged")?;
    check(names == ["22.txt"], "11.txt is gone from merged")?;
    let low = cat(root, "low/11.txt")?;
    check(low == ONES, "low/11.txt is still there, unchanged")?;
    let md = ls_l(root, "upper/11.txt")?;
    check(
        md.file_type().is_char_device() && md.rdev() == 0 && md.permissions().mode() & 0o7777 == 0,
        "upper/11.txt is a whiteout: character device 0,0 with mode 0000 (c---------)",
    )?;

    step(7, "Unmount");
    cmd("rovl umount ./merged");
    m.unmount(rovl, root, "./merged")?;
    check(
        mounted_fstype(&root.join("merged")).is_none(),
        "merged is no longer mounted and the daemon exited 0",
    )?;
    tree(root)?;

    step(
        8,
        "Delete the whiteout from upper (the seed notes: not recommended)",
    );
    cmd("rm upper/11.txt");
    fs::remove_file(root.join("upper/11.txt")).map_err(io_err("rm upper/11.txt"))?;

    step(9, "Remount: low's 11.txt is back");
    cmd(&mount_cmd);
    let m = Mount::start(rovl, root, opts, "./merged")?;
    let names = print_ls(root, "merged")?;
    let s11 = cat(root, "merged/11.txt")?;
    check(
        names == ["11.txt", "22.txt"] && s11 == ONES,
        "without the whiteout, low/11.txt shows through again",
    )?;

    step(10, "Unmount and clean up");
    cmd("rovl umount ./merged");
    m.unmount(rovl, root, "./merged")?;
    println!("   removing {}", root.display());
    Ok(())
}
