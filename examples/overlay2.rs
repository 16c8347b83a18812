//! Docker's overlay2 layer store, rebuilt in a temp dir and mounted with rovl.
//!
//! Run as root after building the binary:
//!
//! ```text
//! cargo build && cargo run --example overlay2   (as root; else sudo -E)
//! ```
//!
//! The store looks like `/var/lib/docker/overlay2`: one directory per layer
//! with `diff/` (the layer's files), `link` (its short name), `lower` (the
//! short names of the layers below it), `work/`; a `l/` directory of short
//! symlinks to each `diff/`; a container layer and its `-init` layer. rovl is
//! mounted the way Docker mounts overlay when the options get long: from
//! inside the store, with relative `l/XXXX` lower paths.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::ExitCode;

mod support;
use support::*;

fn main() -> ExitCode {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("overlay2: must run as root (rovl mounts /dev/fuse with mount(2), and whiteouts are device nodes)");
        eprintln!("  try: cargo build && sudo -E cargo run --example overlay2");
        return ExitCode::FAILURE;
    }
    if !Path::new("/dev/fuse").exists() {
        eprintln!("overlay2: /dev/fuse does not exist (modprobe fuse, or run the container with --device /dev/fuse)");
        return ExitCode::FAILURE;
    }
    let rovl = match find_rovl() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("overlay2: {e}");
            return ExitCode::FAILURE;
        }
    };
    match run(&rovl) {
        Ok(()) => {
            println!("\nDone.");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("overlay2: {e}");
            ExitCode::FAILURE
        }
    }
}

fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    // SAFETY: getrandom writes at most N bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), N, 0) };
    if n != N as isize {
        return Err(format!("getrandom: {}", io::Error::last_os_error()));
    }
    Ok(b)
}

/// A 64-hex-digit layer id, as Docker's.
fn layer_id() -> Result<String> {
    Ok(random_bytes::<32>()?
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// A 26-character short link name (base32, upper case), as Docker's `l/` entries.
fn short_id() -> Result<String> {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    Ok(random_bytes::<26>()?
        .iter()
        .map(|b| ALPHABET[(b & 31) as usize] as char)
        .collect())
}

/// What one layer's `diff/` holds.
enum Entry {
    Dir(&'static str),
    /// A dir carrying `trusted.overlay.opaque=y`: it hides the same dir below.
    OpaqueDir(&'static str),
    File(&'static str, &'static str, u32),
    Symlink(&'static str, &'static str),
    /// A character device 0/0: deletes the name in the layers below.
    Whiteout(&'static str),
}

struct Layer {
    /// What the layer stands for, for the printout.
    role: &'static str,
    id: String,
    link: String,
}

fn cpath(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| format!("{}: NUL in path", p.display()))
}

fn last_err(what: &Path) -> String {
    format!("{}: {}", what.display(), io::Error::last_os_error())
}

fn populate(diff: &Path, entries: &[Entry]) -> Result<()> {
    for e in entries {
        match e {
            Entry::Dir(p) => fs::create_dir_all(diff.join(p)).map_err(io_err(p))?,
            Entry::OpaqueDir(p) => {
                let path = diff.join(p);
                fs::create_dir_all(&path).map_err(io_err(p))?;
                let c = cpath(&path)?;
                // SAFETY: valid C strings and a 1-byte value buffer.
                let rc = unsafe {
                    libc::lsetxattr(
                        c.as_ptr(),
                        c"trusted.overlay.opaque".as_ptr(),
                        b"y".as_ptr().cast(),
                        1,
                        0,
                    )
                };
                if rc != 0 {
                    return Err(last_err(&path));
                }
            }
            Entry::File(p, content, mode) => {
                let path = diff.join(p);
                if let Some(parent) = path.parent() {
                    fs::create_dir_all(parent).map_err(io_err(parent.display()))?;
                }
                fs::write(&path, content).map_err(io_err(p))?;
                fs::set_permissions(&path, fs::Permissions::from_mode(*mode)).map_err(io_err(p))?;
            }
            Entry::Symlink(p, target) => symlink(target, diff.join(p)).map_err(io_err(p))?,
            Entry::Whiteout(p) => {
                let path = diff.join(p);
                let c = cpath(&path)?;
                // SAFETY: valid C string.
                if unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR, libc::makedev(0, 0)) } != 0 {
                    return Err(last_err(&path));
                }
            }
        }
    }
    Ok(())
}

/// Makes `<id>/diff`, `<id>/link`, `<id>/lower` (when there are layers below),
/// `<id>/work` (except for the bottom layer, as Docker) and `l/<link>`.
fn make_layer(
    store: &Path,
    role: &'static str,
    id: String,
    below: &[Layer],
    entries: &[Entry],
) -> Result<Layer> {
    let link = short_id()?;
    let dir = store.join(&id);
    let diff = dir.join("diff");
    fs::create_dir_all(&diff).map_err(io_err(diff.display()))?;
    populate(&diff, entries)?;
    fs::write(dir.join("link"), &link).map_err(io_err("link"))?;
    if !below.is_empty() {
        // Top-down, as the lowerdir option wants them.
        let lower: Vec<String> = below
            .iter()
            .rev()
            .map(|l| format!("l/{}", l.link))
            .collect();
        fs::write(dir.join("lower"), lower.join(":")).map_err(io_err("lower"))?;
        fs::create_dir(dir.join("work")).map_err(io_err("work"))?;
    }
    symlink(format!("../{id}/diff"), store.join("l").join(&link)).map_err(io_err("l/"))?;
    Ok(Layer { role, id, link })
}

/// The first 12 digits of an id, as `docker ps` shows them (keeping `-init`).
fn short(id: &str) -> String {
    let suffix = if id.ends_with("-init") { "-init" } else { "" };
    format!("{}{suffix}", &id[..12.min(id.len())])
}

fn describe(md: &fs::Metadata, path: &Path) -> String {
    let ft = md.file_type();
    if ft.is_symlink() {
        let t = fs::read_link(path).unwrap_or_default();
        format!(" -> {}", t.display())
    } else if ft.is_char_device() && md.rdev() == 0 {
        "  [whiteout c--------- 0,0]".to_string()
    } else if ft.is_dir() && opaque(path) {
        "/  [opaque]".to_string()
    } else if ft.is_dir() {
        "/".to_string()
    } else {
        String::new()
    }
}

fn opaque(path: &Path) -> bool {
    let Ok(c) = cpath(path) else {
        return false;
    };
    let mut v = [0u8; 4];
    // SAFETY: valid C strings; `v` has room for 4 bytes.
    let n = unsafe {
        libc::lgetxattr(
            c.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            v.as_mut_ptr().cast(),
            v.len(),
        )
    };
    n == 1 && v[0] == b'y'
}

fn sorted_entries(dir: &Path) -> Result<Vec<fs::DirEntry>> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .map_err(io_err(dir.display()))?
        .collect::<io::Result<_>>()
        .map_err(io_err(dir.display()))?;
    v.sort_by_key(|e| e.file_name());
    Ok(v)
}

/// `tree -L 2` of the store.
fn tree_l2(store: &Path) -> Result<()> {
    cmd("tree -L 2");
    println!(".");
    let top = sorted_entries(store)?;
    for (i, e) in top.iter().enumerate() {
        let last = i + 1 == top.len();
        let md = fs::symlink_metadata(e.path()).map_err(io_err(e.path().display()))?;
        println!(
            "{}{}{}",
            if last { "└── " } else { "├── " },
            e.file_name().to_string_lossy(),
            describe(&md, &e.path())
        );
        if md.is_dir() {
            let kids = sorted_entries(&e.path())?;
            for (j, k) in kids.iter().enumerate() {
                let kmd = fs::symlink_metadata(k.path()).map_err(io_err(k.path().display()))?;
                println!(
                    "{}{}{}{}",
                    if last { "    " } else { "│   " },
                    if j + 1 == kids.len() {
                        "└── "
                    } else {
                        "├── "
                    },
                    k.file_name().to_string_lossy(),
                    describe(&kmd, &k.path())
                );
            }
        }
    }
    Ok(())
}

/// Every path below `root`, relative, sorted, with a type marker.
fn find(root: &Path) -> Result<Vec<(String, fs::Metadata)>> {
    let mut out = Vec::new();
    find_rec(root, root, &mut out)?;
    Ok(out)
}

fn find_rec(root: &Path, dir: &Path, out: &mut Vec<(String, fs::Metadata)>) -> Result<()> {
    for e in sorted_entries(dir)? {
        let p = e.path();
        let md = fs::symlink_metadata(&p).map_err(io_err(p.display()))?;
        let rel = p
            .strip_prefix(root)
            .map_err(|_| format!("{} is outside {}", p.display(), root.display()))?
            .display()
            .to_string();
        let is_dir = md.is_dir();
        out.push((rel, md));
        if is_dir {
            find_rec(root, &p, out)?;
        }
    }
    Ok(())
}

/// Which layer a merged non-directory comes from: the topmost whose `diff/` has it.
fn origin<'a>(store: &Path, layers_top_down: &[&'a Layer], rel: &str) -> Option<&'a Layer> {
    layers_top_down
        .iter()
        .find(|l| fs::symlink_metadata(store.join(&l.id).join("diff").join(rel)).is_ok())
        .copied()
}

fn run(rovl: &Path) -> Result<()> {
    println!("Using {}", rovl.display());
    let dir = tempfile::Builder::new()
        .prefix("rovl-overlay2-")
        .tempdir_in("/tmp")
        .map_err(io_err("cannot create a temp dir under /tmp"))?;
    let root = fs::canonicalize(dir.path()).map_err(io_err(dir.path().display()))?;
    let store = root.join("overlay2");
    let result = experiment(rovl, &store);
    if let Ok(entries) = fs::read_dir(&store) {
        for e in entries.flatten() {
            let merged = e.path().join("merged");
            if mounted_fstype(&merged).is_some() {
                let why = result.err().unwrap_or_default();
                return Err(format!(
                    "{why}\n{} is still mounted; not removing the temp dir",
                    merged.display()
                ));
            }
        }
    }
    drop(dir);
    result
}

fn experiment(rovl: &Path, store: &Path) -> Result<()> {
    use Entry::*;

    step(
        1,
        "Build an image of three layers, as `docker pull` leaves it",
    );
    println!(
        "(store: {}, standing in for /var/lib/docker/overlay2)",
        store.display()
    );
    fs::create_dir_all(store.join("l")).map_err(io_err("l"))?;
    // Bottom-up; each new layer sits on all the ones before it.
    let mut layers: Vec<Layer> = Vec::new();
    let l = make_layer(
        store,
        "image layer 1 (bottom)",
        layer_id()?,
        &layers,
        &[
            File("bin/sh", "#!fake shell\n", 0o755),
            File("etc/os-release", "NAME=\"Tiny Linux\"\n", 0o644),
            File("etc/motd", "Welcome to layer 1\n", 0o644),
            Dir("home"),
            Dir("tmp"),
            File("var/cache/apt/old.bin", "stale cache\n", 0o644),
        ],
    )?;
    layers.push(l);
    let l = make_layer(
        store,
        "image layer 2",
        layer_id()?,
        &layers,
        &[
            File("usr/bin/app", "app v1\n", 0o755),
            // `RUN rm /etc/motd` in a Dockerfile leaves a whiteout.
            Dir("etc"),
            Whiteout("etc/motd"),
        ],
    )?;
    layers.push(l);
    let l = make_layer(
        store,
        "image layer 3 (top)",
        layer_id()?,
        &layers,
        &[
            File("usr/bin/app", "app v2\n", 0o755),
            // `RUN rm -rf /var/cache/apt && mkdir ...` makes an opaque dir.
            Dir("var/cache"),
            OpaqueDir("var/cache/apt"),
            File("var/cache/apt/new.bin", "fresh cache\n", 0o644),
        ],
    )?;
    layers.push(l);

    step(
        2,
        "Start a container: an `-init` layer and the container's own layer",
    );
    let cid = layer_id()?;
    let l = make_layer(
        store,
        "container init layer",
        format!("{cid}-init"),
        &layers,
        &[
            File(".dockerenv", "", 0o755),
            File("etc/hosts", "127.0.0.1\tlocalhost\n", 0o644),
            File("etc/hostname", "fc6121a8ac04\n", 0o644),
            File("etc/resolv.conf", "nameserver 8.8.8.8\n", 0o644),
            Symlink("etc/mtab", "/proc/mounts"),
            Dir("dev"),
            Dir("proc"),
            Dir("sys"),
        ],
    )?;
    layers.push(l);
    let l = make_layer(
        store,
        "container layer (read-write)",
        cid.clone(),
        &layers,
        &[],
    )?;
    layers.push(l);
    fs::create_dir(store.join(&cid).join("merged")).map_err(io_err("merged"))?;
    let (base, init) = (&layers[0], &layers[3]);
    let top_down: Vec<&Layer> = layers.iter().rev().collect();
    for l in &top_down {
        println!("   {:<30} {}  (l/{})", l.role, short(&l.id), l.link);
    }
    tree_l2(store)?;
    for l in &top_down {
        if let Ok(lower) = fs::read_to_string(store.join(&l.id).join("lower")) {
            cmd(&format!("cat {}/lower", short(&l.id)));
            println!("{lower}");
        }
    }

    step(
        3,
        "Mount the container's root filesystem with rovl, as Docker mounts overlay",
    );
    let lower = fs::read_to_string(store.join(&cid).join("lower")).map_err(io_err("lower"))?;
    let opts = format!("lowerdir={lower},upperdir={cid}/diff,workdir={cid}/work");
    let target = format!("{cid}/merged");
    println!("   Docker switches to relative paths from inside the store when the absolute");
    println!("   ones would not fit in one page of mount data; rovl resolves them against");
    println!("   its working directory just as the kernel does.");
    cmd(&format!("cd {}", store.display()));
    cmd(&format!("rovl mount -o {opts} {target}"));
    let m = Mount::start(rovl, store, &opts, &target)?;
    cmd("grep fuse.rovl /proc/mounts");
    if let Ok(mounts) = fs::read_to_string("/proc/mounts") {
        let mp = store.join(&target);
        for line in mounts.lines() {
            if line.split(' ').nth(1) == Some(mp.to_string_lossy().as_ref()) {
                println!("{line}");
            }
        }
    }

    step(4, "The merged view (where each file comes from)");
    let merged = store.join(&target);
    cmd(&format!("find {}/merged", short(&cid)));
    let listing = find(&merged)?;
    for (rel, md) in &listing {
        let from = if md.is_dir() {
            String::new()
        } else {
            origin(store, &top_down, rel)
                .map(|l| format!("  <- {}", l.role))
                .unwrap_or_default()
        };
        println!("{rel}{}{from}", describe(md, &merged.join(rel)));
    }
    let names: Vec<&str> = listing.iter().map(|(r, _)| r.as_str()).collect();
    check(
        !names.contains(&"etc/motd"),
        "etc/motd is hidden by layer 2's whiteout",
    )?;
    check(
        names.contains(&"var/cache/apt/new.bin") && !names.contains(&"var/cache/apt/old.bin"),
        "var/cache/apt shows only layer 3's files (opaque dir)",
    )?;
    let app = fs::read_to_string(merged.join("usr/bin/app")).map_err(io_err("usr/bin/app"))?;
    check(
        app == "app v2\n",
        "usr/bin/app comes from the topmost layer holding it",
    )?;
    check(
        names.contains(&"etc/hostname") && names.contains(&".dockerenv"),
        "the -init layer's files are part of the container's root",
    )?;

    step(5, "Write inside the \"container\" (the seed's test.txt)");
    cmd("mkdir merged/home/xufeng");
    fs::create_dir(merged.join("home/xufeng")).map_err(io_err("mkdir home/xufeng"))?;
    cmd("echo 12312312312321 > merged/home/xufeng/test.txt");
    fs::write(merged.join("home/xufeng/test.txt"), "12312312312321\n")
        .map_err(io_err("home/xufeng/test.txt"))?;
    cmd("echo web-1 > merged/etc/hostname");
    fs::write(merged.join("etc/hostname"), "web-1\n").map_err(io_err("etc/hostname"))?;
    cmd("rm merged/bin/sh");
    fs::remove_file(merged.join("bin/sh")).map_err(io_err("rm bin/sh"))?;

    step(6, "Unmount");
    cmd(&format!("rovl umount {target}"));
    m.unmount(rovl, store, &target)?;

    step(
        7,
        "Only the container layer changed (what `docker diff` / `docker commit` see)",
    );
    let cdiff = store.join(&cid).join("diff");
    cmd(&format!("find {}/diff", short(&cid)));
    let changes = find(&cdiff)?;
    for (rel, md) in &changes {
        println!("{rel}{}", describe(md, &cdiff.join(rel)));
    }
    let test = fs::read_to_string(cdiff.join("home/xufeng/test.txt")).unwrap_or_default();
    check(
        test == "12312312312321\n",
        "the new file is in the container's diff/",
    )?;
    let init_host = fs::read_to_string(store.join(&init.id).join("diff/etc/hostname"))
        .map_err(io_err("init hostname"))?;
    let new_host =
        fs::read_to_string(cdiff.join("etc/hostname")).map_err(io_err("copied-up hostname"))?;
    check(
        init_host == "fc6121a8ac04\n" && new_host == "web-1\n",
        "etc/hostname was copied up from the -init layer, which is unchanged",
    )?;
    let sh = fs::symlink_metadata(cdiff.join("bin/sh")).map_err(io_err("bin/sh whiteout"))?;
    check(
        sh.file_type().is_char_device() && sh.rdev() == 0,
        "the deleted bin/sh is a whiteout in the container's diff/",
    )?;
    check(
        store.join(&base.id).join("diff/bin/sh").is_file(),
        "layer 1 still has bin/sh",
    )?;
    println!("   `docker commit` would package only this diff/, never the -init layer.");

    step(
        8,
        "Commit: the container layer as an OCI layer, with `rovl diff`",
    );
    cmd(&format!(
        "rovl diff --lower {lower} {cid}/diff -o container-layer.tar",
        cid = short(&cid)
    ));
    let out = std::process::Command::new(rovl)
        .args(["diff", "--lower", &lower, &format!("{cid}/diff")])
        .args(["-o", "container-layer.tar"])
        .current_dir(store)
        .output()
        .map_err(io_err("rovl diff"))?;
    check(out.status.success(), "rovl diff made the layer")?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    cmd("tar -tf container-layer.tar");
    let f = fs::File::open(store.join("container-layer.tar")).map_err(io_err("layer"))?;
    let mut ar = tar::Archive::new(f);
    let mut names = Vec::new();
    for e in ar.entries().map_err(io_err("layer"))? {
        let e = e.map_err(io_err("layer"))?;
        let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        println!("   {name}");
        names.push(name);
    }
    check(
        names.iter().any(|n| n == "bin/.wh.sh"),
        "the whiteout of bin/sh is the OCI whiteout bin/.wh.sh",
    )?;
    check(
        names.iter().any(|n| n == "home/xufeng/test.txt"),
        "the new file is in the layer",
    )?;
    println!("   This tar is what `docker commit` / `podman commit` add as the image's top layer;");
    println!("   `rovl apply container-layer.tar DIR` turns it back into an overlay layer dir.");
    Ok(())
}
