//! Mount options: the kernel's `-o` syntax, parsing and validation.
//!
//! Parsing and validation never touch the disk, so bad input changes nothing.

use crate::error::Error;
use crate::idmap::{IdMap, IdMaps};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The kernel's `OVL_MAX_STACK`.
pub const MAX_LOWERS: usize = 500;

/// `xino=` values, as the kernel's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Xino {
    Off,
    Auto,
    On,
}

/// `redirect_dir=` values, as the kernel spells them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedirectDir {
    On,
    Follow,
    NoFollow,
    Off,
}

/// `passthrough=` values: which files' data bypasses the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassthroughMode {
    /// Everything goes through the daemon and the page cache.
    Off,
    /// Upper files only: a read-only file follows its copy-up, as in the kernel.
    Upper,
    /// Lower files opened read-only too.
    All,
}

/// Everything a mount needs, resolved to absolute paths.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountConfig {
    /// Lower layers, topmost first (the kernel's left-to-right order).
    pub lowerdirs: Vec<PathBuf>,
    pub upperdir: Option<PathBuf>,
    pub workdir: Option<PathBuf>,
    pub mountpoint: PathBuf,
    /// Shown as the source in /proc/mounts.
    pub source: String,
    /// `ro` was given (a mount without upperdir is read-only regardless).
    pub read_only: bool,
    pub allow_other: bool,
    /// `allow_root`: root and the mounting user may access (FUSE; exclusive with `allow_other`).
    pub allow_root: bool,
    pub default_permissions: bool,
    /// Generic VFS flags passed through to the FUSE mount
    /// (`dev`, `nodev`, `suid`, `nosuid`, `exec`, `noexec`, `atime`, `noatime`, `lazytime`, ...).
    /// At most one flag of each exclusive group (e.g. `dev`/`nodev`): the last one given.
    pub vfs_flags: Vec<String>,
    /// Bound of the name-lookup cache (`cache_entries=N`).
    pub cache_entries: usize,
    /// FUSE worker threads (`threads=N`); 0 picks one per core.
    pub threads: usize,
    /// `userxattr`: keep overlay xattrs in `user.overlay.*` instead of `trusted.overlay.*`.
    pub userxattr: bool,
    pub redirect_dir: RedirectDir,
    /// `xino=`: inode numbers made unique across filesystems.
    pub xino: Xino,
    pub index: bool,
    pub metacopy: bool,
    /// `volatile`: skip syncs; the kernel then marks `W/work/incompat/volatile`.
    /// Always false without an upper layer (the kernel ignores it there).
    pub volatile: bool,
    /// `selinux_missing=enotsup|enodata`: how a missing `security.selinux`
    /// is reported. `enotsup` (the default) lets `ls -l` stop asking.
    pub selinux_enotsup: bool,
    /// `passthrough=off|upper|all`: FUSE passthrough, where the kernel offers
    /// it. `all` by default: lower files read at the lower fs's speed.
    pub passthrough: PassthroughMode,
    /// `io_uring=on|off`: FUSE over io_uring where the kernel offers it
    /// (6.14+, `enable_uring`); `/dev/fuse` otherwise.
    pub io_uring: bool,
    /// fuse-overlayfs' `uidmapping=`, `gidmapping=`, `squash_to_*`.
    pub ids: IdMaps,
    /// fuse-overlayfs' `fsync=0`: no syncs, as `volatile` without its mark.
    pub fsync: bool,
    /// fuse-overlayfs' `noxattrs=1`: xattr requests answer ENOTSUP.
    pub noxattrs: bool,
    /// fuse-overlayfs' `noacl`: no POSIX ACL support in the kernel.
    pub noacl: bool,
    /// fuse-overlayfs' `static_nlink`: directories report one link.
    pub static_nlink: bool,
    /// `context=`: the SELinux label of the mount (passed on where SELinux is on).
    pub context: Option<String>,
    /// fuse-overlayfs' `timeout=`: how long the kernel caches entries and attributes.
    pub timeout: Option<std::time::Duration>,
    /// fuse-overlayfs' `debug`: debug logging, as `-d`.
    pub debug: bool,
    /// fuse-overlayfs' `xattr_permissions=1|2`: owners and modes kept in
    /// `security.` or `user.containers.override_stat` (0: off).
    pub xattr_permissions: u8,
}

impl MountConfig {
    /// Whether fsync and copy-up reach the disk (not `volatile`, not `fsync=0`).
    pub fn syncs(&self) -> bool {
        self.fsync && !self.volatile
    }
}

type Result<T> = crate::error::StartResult<T>;

/// Generic flags; within a group the last one given wins.
const VFS_FLAG_GROUPS: &[&[&str]] = &[
    &["dev", "nodev"],
    &["suid", "nosuid"],
    &["exec", "noexec"],
    &["atime", "noatime", "relatime", "strictatime"],
    &["lazytime", "nolazytime"],
    &["sync", "async"],
    &["dirsync"],
];

fn vfs_group(flag: &str) -> Option<&'static [&'static str]> {
    VFS_FLAG_GROUPS.iter().copied().find(|g| g.contains(&flag))
}

/// Splits a `-o` string on commas not escaped by `\` nor inside a quoted
/// label (podman's `context="…:c1,c2"`). Escapes and quotes are kept:
/// values are unescaped by the option that reads them (as the kernel
/// does). Empty options (podman sends `,,`) are dropped.
pub fn split_options(s: &str) -> Vec<String> {
    split_escaped(s, ',', true)
        .into_iter()
        .filter(|o| !o.is_empty())
        .collect()
}

/// SELinux label options, whose quoted values may hold commas.
const LABEL_OPTS: &[&str] = &["context=", "fscontext=", "defcontext=", "rootcontext="];

/// Splits on `sep` where it is not escaped by `\` (nor, with `quotes`,
/// inside the double quotes of a label option's value), keeping the escapes.
fn split_escaped(s: &str, sep: char, quotes: bool) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            cur.push(c);
            if let Some(n) = chars.next() {
                cur.push(n);
            }
        } else if quotes && c == '"' && (quoted || LABEL_OPTS.contains(&cur.as_str())) {
            quoted = !quoted;
            cur.push(c);
        } else if c == sep && !quoted {
            out.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

/// Escapes a path for `lowerdir=`/`upperdir=`/`workdir=` (`\`, `:` and `,`).
pub fn escape_path(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    for c in p.chars() {
        if matches!(c, '\\' | ':' | ',') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `\X` -> `X`, like the kernel's `ovl_unescape`.
fn unescape(key: &str, s: &str) -> Result<String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(n) => out.push(n),
                None => return Err(Error::new(format!("{key}: trailing backslash in \"{s}\""))),
            }
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

/// Splits `lowerdir=` on unescaped `:` and unescapes each component.
fn split_lowerdir(v: &str) -> Result<Vec<String>> {
    if v.is_empty() {
        return Err(Error::new("lowerdir is empty"));
    }
    if v.starts_with(':') {
        return Err(Error::new(format!(
            "lowerdir \"{v}\" starts with ':' (cannot append a layer)"
        )));
    }
    let raw = split_escaped(v, ':', false);
    if raw.last().is_some_and(|s| s.is_empty()) {
        return Err(Error::new(format!(
            "unescaped trailing colon in lowerdir \"{v}\""
        )));
    }
    if raw.iter().any(|s| s.is_empty()) {
        return Err(Error::new(format!(
            "empty component in lowerdir \"{v}\" (data-only layers \"::\" are not supported)"
        )));
    }
    if raw.len() > MAX_LOWERS {
        return Err(too_many_lowers());
    }
    raw.iter().map(|s| unescape("lowerdir", s)).collect()
}

fn too_many_lowers() -> Error {
    Error::new(format!("too many lower directories, limit is {MAX_LOWERS}"))
}

fn need_value<'a>(key: &str, val: Option<&'a str>) -> Result<&'a str> {
    match val {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(Error::new(format!("mount option \"{key}\" needs a value"))),
    }
}

fn no_value(key: &str, val: Option<&str>) -> Result<()> {
    match val {
        None => Ok(()),
        Some(_) => Err(Error::new(format!("mount option \"{key}\" takes no value"))),
    }
}

fn on_off(key: &str, val: Option<&str>) -> Result<bool> {
    match need_value(key, val)? {
        "on" => Ok(true),
        "off" => Ok(false),
        v => Err(bad_value(key, v, "on|off")),
    }
}

fn bad_value(key: &str, v: &str, expected: &str) -> Error {
    Error::new(format!(
        "invalid value \"{v}\" for mount option \"{key}\" (expected {expected})"
    ))
}

/// fuse-overlayfs' boolean options: `0` or `1` (bare means 1).
fn flag01(key: &str, val: Option<&str>) -> Result<bool> {
    match val {
        None | Some("1") => Ok(true),
        Some("0") => Ok(false),
        Some(v) => Err(bad_value(key, v, "0|1")),
    }
}

fn id(key: &str, val: Option<&str>) -> Result<u32> {
    let v = need_value(key, val)?;
    v.parse::<u32>()
        .ok()
        .filter(|&i| i != u32::MAX)
        .ok_or_else(|| bad_value(key, v, "a uid or gid"))
}

fn number(key: &str, val: Option<&str>) -> Result<usize> {
    let v = need_value(key, val)?;
    v.parse::<usize>()
        .map_err(|_| bad_value(key, v, "a non-negative integer"))
}

/// Parses options (already split by [`split_options`]) the way the kernel does:
/// later `upperdir=`/`workdir=`/`lowerdir=` replace earlier ones, `lowerdir+=`
/// appends one layer. Relative paths are joined to `cwd`. Touches no disk.
pub fn parse(
    opts: &[String],
    mountpoint: &Path,
    source: Option<&str>,
    cwd: &Path,
) -> std::result::Result<MountConfig, Error> {
    let mut lowers: Vec<PathBuf> = Vec::new();
    let mut saw_lowerdir = false;
    let mut upper: Option<PathBuf> = None;
    let mut work: Option<PathBuf> = None;
    let mut fsname: Option<String> = None;
    let mut set_redirect = false;
    let mut set_metacopy = false;
    let mut cfg = MountConfig {
        lowerdirs: Vec::new(),
        upperdir: None,
        workdir: None,
        mountpoint: cwd.join(mountpoint),
        source: String::new(),
        read_only: false,
        allow_other: false,
        allow_root: false,
        default_permissions: false,
        vfs_flags: Vec::new(),
        cache_entries: 65536,
        threads: 0,
        userxattr: false,
        // Unlike the kernel's build default (off): a renamed lower dir moves
        // instead of failing with EXDEV.
        redirect_dir: RedirectDir::On,
        index: false,
        metacopy: false,
        xino: Xino::Auto,
        volatile: false,
        selinux_enotsup: true,
        passthrough: PassthroughMode::All,
        io_uring: true,
        ids: IdMaps::default(),
        fsync: true,
        noxattrs: false,
        noacl: false,
        static_nlink: false,
        context: None,
        timeout: None,
        debug: false,
        xattr_permissions: 0,
    };
    if mountpoint.as_os_str().is_empty() {
        return Err(Error::new("mountpoint is empty"));
    }

    for raw in opts.iter().filter(|o| !o.is_empty()) {
        let (key, val) = match raw.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (raw.as_str(), None),
        };
        match key {
            "lowerdir" => {
                let v = val.unwrap_or_default();
                lowers = split_lowerdir(v)?.iter().map(|p| cwd.join(p)).collect();
                saw_lowerdir = true;
            }
            "lowerdir+" => {
                if saw_lowerdir {
                    return Err(Error::new("lowerdir+ cannot follow lowerdir"));
                }
                // Taken verbatim, like the kernel (no escapes, no ':' split).
                let v = need_value(key, val)?;
                if lowers.len() == MAX_LOWERS {
                    return Err(too_many_lowers());
                }
                lowers.push(cwd.join(v));
            }
            "upperdir" => upper = Some(cwd.join(unescape(key, need_value(key, val)?)?)),
            "workdir" => work = Some(cwd.join(unescape(key, need_value(key, val)?)?)),
            "fsname" => fsname = Some(unescape(key, need_value(key, val)?)?),
            "subtype" => {
                need_value(key, val)?;
            }
            "cache_entries" => {
                cfg.cache_entries = number(key, val)?;
                if cfg.cache_entries == 0 {
                    return Err(bad_value(key, "0", "a positive integer"));
                }
            }
            "threads" => cfg.threads = number(key, val)?,
            "redirect_dir" => {
                cfg.redirect_dir = match need_value(key, val)? {
                    "on" => RedirectDir::On,
                    "follow" => RedirectDir::Follow,
                    "nofollow" => RedirectDir::NoFollow,
                    "off" => RedirectDir::Off,
                    v => return Err(bad_value(key, v, "on|follow|nofollow|off")),
                };
                set_redirect = true;
            }
            "index" => cfg.index = on_off(key, val)?,
            "io_uring" => cfg.io_uring = on_off(key, val)?,
            "passthrough" => {
                cfg.passthrough = match need_value(key, val)? {
                    "off" => PassthroughMode::Off,
                    "upper" => PassthroughMode::Upper,
                    "all" => PassthroughMode::All,
                    v => return Err(bad_value(key, v, "off|upper|all")),
                }
            }
            "selinux_missing" => {
                cfg.selinux_enotsup = match need_value(key, val)? {
                    "enotsup" => true,
                    "enodata" => false,
                    v => return Err(bad_value(key, v, "enotsup|enodata")),
                }
            }
            "metacopy" => {
                cfg.metacopy = on_off(key, val)?;
                set_metacopy = true;
            }
            "xino" => {
                cfg.xino = match need_value(key, val)? {
                    "on" => Xino::On,
                    "off" => Xino::Off,
                    "auto" => Xino::Auto,
                    v => return Err(bad_value(key, v, "on|off|auto")),
                }
            }
            // fuse-overlayfs' options, with the meaning it gives them.
            "uidmapping" | "gidmapping" => {
                let ranges = IdMap::parse_ranges(need_value(key, val)?).map_err(|e| {
                    Error::new(format!("invalid value for mount option \"{key}\": {e}"))
                })?;
                match key {
                    "uidmapping" => cfg.ids.uid.ranges = ranges,
                    _ => cfg.ids.gid.ranges = ranges,
                }
            }
            "squash_to_uid" => cfg.ids.uid.squash = Some(id(key, val)?),
            "squash_to_gid" => cfg.ids.gid.squash = Some(id(key, val)?),
            "squash_to_root" => {
                no_value(key, val)?;
                cfg.ids.uid.squash = Some(0);
                cfg.ids.gid.squash = Some(0);
            }
            "fsync" => cfg.fsync = flag01(key, val)?,
            "noxattrs" => cfg.noxattrs = flag01(key, val)?,
            "threaded" => {
                if !flag01(key, val)? {
                    cfg.threads = 1;
                }
            }
            "timeout" => {
                let v = need_value(key, val)?;
                let secs = v
                    .parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s >= 0.0 && *s < 1e9)
                    .ok_or_else(|| bad_value(key, v, "a number of seconds"))?;
                cfg.timeout = Some(std::time::Duration::from_secs_f64(secs));
            }
            "context" => cfg.context = Some(need_value(key, val)?.to_string()),
            "xattr_permissions" => {
                cfg.xattr_permissions = match need_value(key, val)? {
                    "0" => 0,
                    "1" => 1,
                    "2" => 2,
                    v => return Err(bad_value(key, v, "0|1|2")),
                }
            }
            // Accepted for fuse-overlayfs' command line; rovl's own behaviour
            // already covers them (see README, differences).
            "writeback" | "fast_ino" => {
                flag01(key, val)?;
            }
            "plugins" => {
                return Err(Error::new(
                    "mount option \"plugins\" is not supported (rovl reads layers from directories only)",
                ))
            }
            _ if key.starts_with("x-") => {}
            _ => {
                const FLAGS: &[&str] = &[
                    "rw",
                    "ro",
                    "allow_other",
                    "allow_root",
                    "default_permissions",
                    "userxattr",
                    "volatile",
                    "noacl",
                    "static_nlink",
                    "ino32_t",
                    "debug",
                    "user",
                    "users",
                    "nouser",
                    "auto",
                    "noauto",
                    "nofail",
                    "_netdev",
                    "defaults",
                ];
                let group = vfs_group(key);
                if group.is_none() && !FLAGS.contains(&key) {
                    return Err(Error::new(format!("unknown mount option \"{key}\"")));
                }
                no_value(key, val)?;
                match key {
                    "rw" => cfg.read_only = false,
                    "ro" => cfg.read_only = true,
                    "allow_other" => cfg.allow_other = true,
                    "allow_root" => cfg.allow_root = true,
                    "default_permissions" => cfg.default_permissions = true,
                    "userxattr" => cfg.userxattr = true,
                    "volatile" => cfg.volatile = true,
                    "noacl" => cfg.noacl = true,
                    "static_nlink" => cfg.static_nlink = true,
                    "debug" => cfg.debug = true,
                    // fstab words mount(8) passes on; ino32_t: rovl's inode
                    // numbers are the kernel's (see README).
                    "ino32_t" | "user" | "users" | "nouser" | "auto" | "noauto" | "nofail"
                    | "_netdev" | "defaults" => {}
                    _ => {
                        let group = group.unwrap_or_default();
                        cfg.vfs_flags.retain(|f| !group.contains(&f.as_str()));
                        cfg.vfs_flags.push(key.to_string());
                    }
                }
            }
        }
    }

    if lowers.is_empty() {
        return Err(Error::new("missing lowerdir"));
    }
    if cfg.allow_other && cfg.allow_root {
        return Err(Error::new(
            "allow_other and allow_root are mutually exclusive",
        ));
    }
    match (&upper, &work) {
        (Some(_), None) => return Err(Error::new("upperdir requires workdir")),
        (None, Some(w)) => {
            // The kernel ignores it too.
            log::warn!(
                "option \"workdir={}\" is useless without upperdir, ignoring it",
                w.display()
            );
            work = None;
        }
        _ => {}
    }
    if upper.is_none() {
        if lowers.len() < 2 {
            return Err(Error::new(
                "at least 2 lowerdir are needed without upperdir",
            ));
        }
        if cfg.index {
            log::warn!("option \"index=on\" is useless without upperdir, ignoring it");
            cfg.index = false;
        }
        if cfg.volatile {
            log::warn!("option \"volatile\" is meaningless without upperdir, ignoring it");
            cfg.volatile = false;
        }
    }
    resolve_features(&mut cfg, set_redirect, set_metacopy, upper.is_some())?;

    cfg.lowerdirs = lowers;
    cfg.upperdir = upper;
    cfg.workdir = work;
    cfg.source = fsname
        .or_else(|| source.map(str::to_string))
        .unwrap_or_else(|| "rovl".to_string());
    Ok(cfg)
}

/// Switches a mount to the kernel's `userxattr` layout, where `trusted.*`
/// cannot be written, with the implications the option has.
pub fn use_userxattr(cfg: &mut MountConfig) {
    cfg.userxattr = true;
    if cfg.redirect_dir != RedirectDir::NoFollow || cfg.metacopy {
        log::info!("userxattr: redirect_dir=nofollow and metacopy=off, as the kernel has them");
    }
    cfg.redirect_dir = RedirectDir::NoFollow;
    cfg.metacopy = false;
}

fn redirect_name(r: RedirectDir) -> &'static str {
    match r {
        RedirectDir::On => "on",
        RedirectDir::Follow => "follow",
        RedirectDir::NoFollow => "nofollow",
        RedirectDir::Off => "off",
    }
}

/// The kernel's dependency rules between metacopy, redirect_dir and userxattr
/// (`ovl_fs_params_verify`): explicit conflicts fail, implicit ones are resolved.
fn resolve_features(
    cfg: &mut MountConfig,
    set_redirect: bool,
    set_metacopy: bool,
    has_upper: bool,
) -> Result<()> {
    // Without upper, following redirects is all redirect_dir=on would do.
    let redirect_ok = cfg.redirect_dir == RedirectDir::On
        || (!has_upper && cfg.redirect_dir == RedirectDir::Follow);
    if cfg.metacopy && !redirect_ok {
        if set_redirect && set_metacopy {
            return Err(Error::new(format!(
                "conflicting options: metacopy=on,redirect_dir={}",
                redirect_name(cfg.redirect_dir)
            )));
        }
        if set_redirect {
            log::warn!(
                "disabling metacopy due to redirect_dir={}",
                redirect_name(cfg.redirect_dir)
            );
            cfg.metacopy = false;
        } else {
            cfg.redirect_dir = RedirectDir::On;
        }
    }
    if cfg.userxattr {
        if set_redirect && cfg.redirect_dir != RedirectDir::NoFollow {
            return Err(Error::new(format!(
                "conflicting options: userxattr,redirect_dir={}",
                redirect_name(cfg.redirect_dir)
            )));
        }
        if cfg.metacopy && set_metacopy {
            return Err(Error::new("conflicting options: userxattr,metacopy=on"));
        }
        cfg.redirect_dir = RedirectDir::NoFollow;
        cfg.metacopy = false;
    }
    Ok(())
}

fn stat_dir(what: &str, p: &Path) -> Result<fs::Metadata> {
    let md = fs::metadata(p).map_err(|e| Error::new(format!("{what} {}: {e}", p.display())))?;
    if !md.is_dir() {
        return Err(Error::new(format!(
            "{what} {}: not a directory",
            p.display()
        )));
    }
    Ok(md)
}

fn canonical(what: &str, p: &Path) -> Result<PathBuf> {
    fs::canonicalize(p).map_err(|e| Error::new(format!("{what} {}: {e}", p.display())))
}

/// The mount id of `p` (statx), when the kernel reports it.
fn mount_id(p: &Path) -> Option<u64> {
    crate::sys::mount_id_of_path(p)
}

fn is_read_only_fs(p: &Path) -> bool {
    crate::sys::statvfs(p).is_ok_and(|sv| sv.f_flag & libc::ST_RDONLY != 0)
}

/// Read-only checks on disk (stat only): layers and mountpoint exist and are
/// directories, upper/work share a mount and are separate subtrees, no two
/// layers overlap (as the kernel requires), and no layer lies in the mountpoint
/// (the daemon would look itself up).
pub fn validate(cfg: &MountConfig) -> std::result::Result<(), Error> {
    stat_dir("mountpoint", &cfg.mountpoint)?;
    let mnt = canonical("mountpoint", &cfg.mountpoint)?;

    // (kind, as given, canonical)
    let mut layers: Vec<(&str, &Path, PathBuf)> = Vec::new();
    for l in &cfg.lowerdirs {
        stat_dir("lowerdir", l)?;
        layers.push(("lowerdir", l, canonical("lowerdir", l)?));
    }
    if let (Some(u), Some(w)) = (&cfg.upperdir, &cfg.workdir) {
        let um = stat_dir("upperdir", u)?;
        let wm = stat_dir("workdir", w)?;
        if is_read_only_fs(u) {
            return Err(Error::new(format!(
                "upperdir {}: read-only file system",
                u.display()
            )));
        }
        let same_mount = match (mount_id(u), mount_id(w)) {
            (Some(a), Some(b)) => a == b,
            _ => um.dev() == wm.dev(),
        };
        if um.dev() != wm.dev() || !same_mount {
            return Err(Error::new(format!(
                "workdir {} and upperdir {} must reside under the same mount",
                w.display(),
                u.display()
            )));
        }
        let uc = canonical("upperdir", u)?;
        let wc = canonical("workdir", w)?;
        if uc.starts_with(&wc) || wc.starts_with(&uc) {
            return Err(Error::new(format!(
                "workdir {} and upperdir {} must be separate subtrees",
                w.display(),
                u.display()
            )));
        }
        layers.push(("upperdir", u, uc));
        layers.push(("workdir", w, wc));
    }

    for (kind, p, c) in &layers {
        if c.starts_with(&mnt) {
            return Err(Error::new(format!(
                "{kind} {} is inside the mountpoint {}",
                p.display(),
                cfg.mountpoint.display()
            )));
        }
    }
    for (i, (ki, pi, ci)) in layers.iter().enumerate() {
        for (kj, pj, cj) in &layers[i + 1..] {
            if ci == cj {
                return Err(Error::new(format!(
                    "conflicting layer paths: {ki} {} and {kj} {} are the same directory",
                    pi.display(),
                    pj.display()
                )));
            }
            let (inner, outer) = if ci.starts_with(cj) {
                ((ki, pi), (kj, pj))
            } else if cj.starts_with(ci) {
                ((kj, pj), (ki, pi))
            } else {
                continue;
            };
            return Err(Error::new(format!(
                "overlapping layer paths: {} {} is inside {} {}",
                inner.0,
                inner.1.display(),
                outer.0,
                outer.1.display()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(opts: &str) -> Result<MountConfig> {
        parse(
            &split_options(opts),
            Path::new("mnt"),
            None,
            Path::new("/cwd"),
        )
    }

    fn err(opts: &str) -> String {
        p(opts).expect_err(opts).to_string()
    }

    #[test]
    fn split_honors_escapes() {
        assert_eq!(
            split_options(r"a,b\,c,,d=e\\,f"),
            vec!["a", r"b\,c", r"d=e\\", "f"]
        );
        assert_eq!(split_options(""), Vec::<String>::new());
        assert_eq!(
            split_options(r#"a,,context="u:r:t:s0:c1,c2",b,"#),
            vec!["a", r#"context="u:r:t:s0:c1,c2""#, "b"]
        );
        assert_eq!(split_options(r"x\"), vec![r"x\"]);
    }

    #[test]
    fn basic_upper_mount() {
        let c = p("lowerdir=/l1:/l2,upperdir=/u,workdir=/w").unwrap();
        assert_eq!(
            c.lowerdirs,
            vec![PathBuf::from("/l1"), PathBuf::from("/l2")]
        );
        assert_eq!(c.upperdir, Some(PathBuf::from("/u")));
        assert_eq!(c.workdir, Some(PathBuf::from("/w")));
        assert_eq!(c.mountpoint, PathBuf::from("/cwd/mnt"));
        assert_eq!(c.source, "rovl");
        assert_eq!(c.cache_entries, 65536);
        assert_eq!(c.threads, 0);
        assert_eq!(c.redirect_dir, RedirectDir::On);
        assert!(!c.index && !c.metacopy && !c.userxattr && !c.volatile && !c.read_only);
        assert!(c.selinux_enotsup);
        assert_eq!(c.passthrough, PassthroughMode::All);
    }

    #[test]
    fn escapes_in_paths() {
        let c = p(r"lowerdir=/a\:b:/c\,d:/e\\f,upperdir=/u\,1,workdir=/w\:2").unwrap();
        assert_eq!(
            c.lowerdirs,
            vec![
                PathBuf::from("/a:b"),
                PathBuf::from("/c,d"),
                PathBuf::from(r"/e\f")
            ]
        );
        assert_eq!(c.upperdir, Some(PathBuf::from("/u,1")));
        assert_eq!(c.workdir, Some(PathBuf::from("/w:2")));
        assert!(err(r"lowerdir=/a:/b\").contains("trailing backslash"));
    }

    #[test]
    fn relative_paths_join_cwd() {
        let c = parse(
            &split_options("lowerdir=l1:../l2,upperdir=u,workdir=./w"),
            Path::new("/abs/mnt"),
            Some("src"),
            Path::new("/base"),
        )
        .unwrap();
        assert_eq!(
            c.lowerdirs,
            vec![PathBuf::from("/base/l1"), PathBuf::from("/base/../l2")]
        );
        assert_eq!(c.upperdir, Some(PathBuf::from("/base/u")));
        assert_eq!(c.workdir, Some(PathBuf::from("/base/w")));
        assert_eq!(c.mountpoint, PathBuf::from("/abs/mnt"));
        assert_eq!(c.source, "src");
    }

    #[test]
    fn lower_limit() {
        let ok: Vec<String> = (0..MAX_LOWERS).map(|i| format!("/l{i}")).collect();
        let c = p(&format!("lowerdir={}", ok.join(":"))).unwrap();
        assert_eq!(c.lowerdirs.len(), MAX_LOWERS);
        let bad: Vec<String> = (0..=MAX_LOWERS).map(|i| format!("/l{i}")).collect();
        assert!(err(&format!("lowerdir={}", bad.join(":"))).contains("too many lower"));
        let plus: Vec<String> = bad.iter().map(|l| format!("lowerdir+={l}")).collect();
        assert!(err(&plus.join(",")).contains("too many lower"));
        let plus_ok = &plus[..MAX_LOWERS];
        assert_eq!(p(&plus_ok.join(",")).unwrap().lowerdirs.len(), MAX_LOWERS);
    }

    #[test]
    fn lowerdir_plus_and_replacement() {
        let c = p(r"lowerdir+=/a,lowerdir+=b\:c").unwrap();
        assert_eq!(
            c.lowerdirs,
            vec![PathBuf::from("/a"), PathBuf::from(r"/cwd/b\:c")]
        );
        assert!(err("lowerdir=/a:/b,lowerdir+=/c").contains("cannot follow"));
        let c = p("lowerdir+=/x,lowerdir=/a:/b").unwrap();
        assert_eq!(c.lowerdirs, vec![PathBuf::from("/a"), PathBuf::from("/b")]);
        let c = p("lowerdir=/x:/y,lowerdir=/a:/b,upperdir=/u1,upperdir=/u,workdir=/w").unwrap();
        assert_eq!(c.lowerdirs, vec![PathBuf::from("/a"), PathBuf::from("/b")]);
        assert_eq!(c.upperdir, Some(PathBuf::from("/u")));
        assert!(err("lowerdir+=").contains("needs a value"));
    }

    #[test]
    fn lowerdir_errors() {
        assert!(err("upperdir=/u,workdir=/w").contains("missing lowerdir"));
        assert!(err("lowerdir=").contains("lowerdir is empty"));
        assert!(err("lowerdir").contains("lowerdir is empty"));
        assert!(err("lowerdir=:/a").contains("starts with ':'"));
        assert!(err("lowerdir=/a:/b:").contains("trailing colon"));
        assert!(err("lowerdir=/a::/b").contains("empty component"));
        assert!(err("lowerdir=/a:::/b").contains("empty component"));
    }

    #[test]
    fn upper_work_pairing() {
        assert!(err("lowerdir=/a,upperdir=/u").contains("upperdir requires workdir"));
        assert!(err("lowerdir=/a,upperdir=,workdir=/w").contains("needs a value"));
        assert!(err("lowerdir=/a,upperdir=/u,workdir=").contains("needs a value"));
        // Like the kernel: workdir alone is ignored, and a lone lower needs an upper.
        let c = p("lowerdir=/a:/b,workdir=/w").unwrap();
        assert_eq!(c.workdir, None);
        assert!(err("lowerdir=/a,workdir=/w").contains("at least 2 lowerdir"));
        assert!(err("lowerdir=/a").contains("at least 2 lowerdir"));
        assert!(p("lowerdir=/a,upperdir=/u,workdir=/w").is_ok());
    }

    #[test]
    fn generic_options() {
        let c = p("lowerdir=/a:/b,ro,nodev,dev,nosuid,noexec,noatime,relatime,lazytime,sync,dirsync,allow_other,default_permissions,subtype=x,x-systemd.automount,x-foo=bar").unwrap();
        assert!(c.read_only && c.allow_other && c.default_permissions);
        assert_eq!(
            c.vfs_flags,
            vec!["dev", "nosuid", "noexec", "relatime", "lazytime", "sync", "dirsync"]
        );
        assert!(!p("lowerdir=/a:/b,ro,rw").unwrap().read_only);
        assert!(p("lowerdir=/a:/b,allow_root").unwrap().allow_root);
        assert!(err("lowerdir=/a:/b,allow_root,allow_other").contains("mutually exclusive"));
        assert_eq!(
            p("lowerdir=/a:/b,fsname=my\\,src").unwrap().source,
            "my,src"
        );
        let c = parse(
            &split_options("lowerdir=/a:/b,fsname=f"),
            Path::new("/m"),
            Some("s"),
            Path::new("/"),
        )
        .unwrap();
        assert_eq!(c.source, "f");
    }

    #[test]
    fn value_errors() {
        assert_eq!(
            err("lowerdir=/a:/b,foo"),
            "rovl: unknown mount option \"foo\""
        );
        assert!(err("lowerdir=/a:/b,foo=1").contains("unknown mount option \"foo\""));
        assert!(err("lowerdir=/a:/b,ro=1").contains("takes no value"));
        assert!(err("lowerdir=/a:/b,userxattr=y").contains("takes no value"));
        assert!(err("lowerdir=/a:/b,cache_entries=0").contains("cache_entries"));
        assert!(err("lowerdir=/a:/b,cache_entries=x").contains("cache_entries"));
        assert!(err("lowerdir=/a:/b,cache_entries").contains("needs a value"));
        assert!(err("lowerdir=/a:/b,threads=-1").contains("threads"));
        assert!(err("lowerdir=/a:/b,redirect_dir=maybe").contains("redirect_dir"));
        assert!(err("lowerdir=/a:/b,index=yes").contains("index"));
        assert!(err("lowerdir=/a:/b,metacopy=1").contains("metacopy"));
        assert!(err("lowerdir=/a:/b,xino=sometimes").contains("xino"));
        assert!(err("lowerdir=/a:/b,fsname=").contains("needs a value"));
        let e = parse(&[], Path::new(""), None, Path::new("/"));
        assert!(e.unwrap_err().to_string().contains("mountpoint"));
    }

    #[test]
    fn own_options() {
        let c = p("lowerdir=/a,upperdir=/u,workdir=/w,cache_entries=7,threads=3,index=on,xino=auto,volatile,redirect_dir=nofollow").unwrap();
        assert_eq!(c.cache_entries, 7);
        assert_eq!(c.threads, 3);
        assert!(c.index && c.volatile);
        assert_eq!(c.redirect_dir, RedirectDir::NoFollow);
        assert!(
            !p("lowerdir=/a:/b,selinux_missing=enodata")
                .unwrap()
                .selinux_enotsup
        );
        assert!(
            p("lowerdir=/a:/b,selinux_missing=enotsup")
                .unwrap()
                .selinux_enotsup
        );
        assert!(err("lowerdir=/a:/b,selinux_missing=yes").contains("selinux_missing"));
        for (v, m) in [
            ("off", PassthroughMode::Off),
            ("upper", PassthroughMode::Upper),
            ("all", PassthroughMode::All),
        ] {
            let c = p(&format!("lowerdir=/a:/b,passthrough={v}")).unwrap();
            assert_eq!(c.passthrough, m);
        }
        assert!(err("lowerdir=/a:/b,passthrough=lower").contains("passthrough"));
        assert!(p("lowerdir=/a:/b").unwrap().io_uring);
        assert!(!p("lowerdir=/a:/b,io_uring=off").unwrap().io_uring);
        assert!(err("lowerdir=/a:/b,io_uring=1").contains("io_uring"));
        for (v, r) in [
            ("on", RedirectDir::On),
            ("follow", RedirectDir::Follow),
            ("off", RedirectDir::Off),
        ] {
            let c = p(&format!("lowerdir=/a:/b,redirect_dir={v}")).unwrap();
            assert_eq!(c.redirect_dir, r);
        }
        // Meaningless without upper, as in the kernel.
        let c = p("lowerdir=/a:/b,index=on,volatile").unwrap();
        assert!(!c.index && !c.volatile);
        let c = p("lowerdir=/a,upperdir=/u,workdir=/w,userxattr").unwrap();
        assert!(c.userxattr);
        assert_eq!(c.redirect_dir, RedirectDir::NoFollow);
    }

    #[test]
    fn feature_dependencies() {
        let up = "lowerdir=/a,upperdir=/u,workdir=/w";
        let c = p(&format!("{up},metacopy=on")).unwrap();
        assert!(c.metacopy);
        assert_eq!(c.redirect_dir, RedirectDir::On);
        assert!(err(&format!("{up},metacopy=on,redirect_dir=off")).contains("conflicting"));
        assert!(err(&format!("{up},metacopy=on,redirect_dir=follow")).contains("conflicting"));
        assert!(
            p("lowerdir=/a:/b,metacopy=on,redirect_dir=follow")
                .unwrap()
                .metacopy
        );
        assert!(err(&format!("{up},userxattr,redirect_dir=on")).contains("conflicting"));
        assert!(err(&format!("{up},userxattr,redirect_dir=off")).contains("conflicting"));
        assert!(err(&format!("{up},userxattr,metacopy=on")).contains("conflicting"));
        let c = p(&format!(
            "{up},userxattr,redirect_dir=nofollow,metacopy=off"
        ))
        .unwrap();
        assert_eq!(c.redirect_dir, RedirectDir::NoFollow);
    }

    #[test]
    fn fuse_overlayfs_options() {
        // What podman passes with --userns=keep-id, empty options included.
        let c = p("lowerdir=l/A:l/B,upperdir=X/diff,workdir=X/work,,volatile,\
                   uidmapping=:0:1:1001:1001:0:1:1002:1002:64535,\
                   gidmapping=:0:1:1001:1001:0:1:1002:1002:64535,context=\"u:r:t:s0:c1,c2\",")
        .unwrap();
        assert!(c.volatile && !c.syncs());
        assert_eq!(c.ids.uid.shown(1001), 0);
        assert_eq!(c.ids.gid.disk(1), 0);
        assert_eq!(c.context.as_deref(), Some("\"u:r:t:s0:c1,c2\""));
        let c = p(
            "lowerdir=a:b,squash_to_uid=7,squash_to_gid=8,fsync=0,noxattrs=1,noacl,\
                   static_nlink,timeout=2.5,threaded=0,writeback=1,fast_ino=1,ino32_t,\
                   xattr_permissions=2,debug,user,noauto",
        )
        .unwrap();
        assert_eq!((c.ids.uid.shown(0), c.ids.gid.shown(0)), (7, 8));
        assert!(!c.fsync && c.noxattrs && c.noacl && c.static_nlink && c.debug);
        assert_eq!(c.threads, 1);
        assert_eq!(c.timeout, Some(std::time::Duration::from_millis(2500)));
        let c = p("lowerdir=a:b,squash_to_root").unwrap();
        assert_eq!(c.ids.uid.shown(1234), 0);
        for bad in [
            "uidmapping=0:1",
            "squash_to_uid=x",
            "fsync=2",
            "xattr_permissions=3",
            "timeout=-1",
            "plugins=x",
        ] {
            assert!(p(&format!("lowerdir=a:b,{bad}")).is_err(), "{bad}");
        }
    }

    fn mkdirs(root: &Path, names: &[&str]) {
        for n in names {
            fs::create_dir_all(root.join(n)).unwrap();
        }
    }

    fn cfg_in(root: &Path, opts: &str) -> MountConfig {
        parse(&split_options(opts), Path::new("m"), None, root).unwrap()
    }

    fn verr(root: &Path, opts: &str) -> String {
        validate(&cfg_in(root, opts)).expect_err(opts).to_string()
    }

    #[test]
    fn validate_checks() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        mkdirs(r, &["a/sub", "b", "u/x", "w", "m/in"]);
        fs::write(r.join("f"), b"").unwrap();
        let good = "lowerdir=a:b,upperdir=u,workdir=w";
        validate(&cfg_in(r, good)).unwrap();
        validate(&cfg_in(r, "lowerdir=a:b")).unwrap();

        assert!(verr(r, "lowerdir=a:nope").contains("nope"));
        assert!(verr(r, "lowerdir=a:f").contains("not a directory"));
        assert!(verr(r, "lowerdir=a,upperdir=nope,workdir=w").contains("upperdir"));
        assert!(verr(r, "lowerdir=a,upperdir=u,workdir=f").contains("workdir"));
        assert!(verr(r, "lowerdir=a,upperdir=u,workdir=u/x").contains("separate subtrees"));
        assert!(verr(r, "lowerdir=a,upperdir=w,workdir=w").contains("separate subtrees"));
        assert!(verr(r, "lowerdir=a:a").contains("conflicting"));
        assert!(verr(r, "lowerdir=a:b,upperdir=a,workdir=w").contains("conflicting"));
        assert!(verr(r, "lowerdir=a:a/sub").contains("overlapping"));
        assert!(verr(r, "lowerdir=u/x,upperdir=u,workdir=w").contains("overlapping"));
        assert!(verr(r, "lowerdir=a/sub,upperdir=u,workdir=a").contains("overlapping"));
        assert!(verr(r, "lowerdir=m/in:b").contains("inside the mountpoint"));
        assert!(verr(r, "lowerdir=m:b").contains("inside the mountpoint"));
        // A symlink to a layer is the same layer.
        std::os::unix::fs::symlink(r.join("a"), r.join("sym")).unwrap();
        assert!(verr(r, "lowerdir=sym:a").contains("conflicting"));

        let mut c = cfg_in(r, good);
        c.mountpoint = r.join("f");
        assert!(validate(&c).unwrap_err().to_string().contains("mountpoint"));
        c.mountpoint = r.join("nomnt");
        assert!(validate(&c).unwrap_err().to_string().contains("mountpoint"));
    }

    #[test]
    fn validate_different_mounts() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        mkdirs(r, &["a", "u", "m"]);
        let other = Path::new("/proc/self");
        let w = other.display().to_string();
        let c = cfg_in(r, &format!("lowerdir=a,upperdir=u,workdir={w}"));
        let e = validate(&c).unwrap_err().to_string();
        assert!(e.contains("same mount"), "{e}");
    }

    #[test]
    fn validate_changes_nothing() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        mkdirs(r, &["a", "u", "w", "m"]);
        validate(&cfg_in(r, "lowerdir=a,upperdir=u,workdir=w")).unwrap();
        assert_eq!(fs::read_dir(r.join("w")).unwrap().count(), 0);
        assert_eq!(fs::read_dir(r.join("u")).unwrap().count(), 0);
    }

    fn path_strategy() -> impl Strategy<Value = String> {
        // Absolute, non-empty components, any chars but NUL and '/'.
        prop::collection::vec("[^\u{0}/]{1,8}", 1..4).prop_map(|c| format!("/{}", c.join("/")))
    }

    proptest! {
        #[test]
        fn lowerdir_round_trip(paths in prop::collection::vec(path_strategy(), 1..20),
                               upper in path_strategy()) {
            let lower: Vec<String> = paths.iter().map(|p| escape_path(p)).collect();
            let opts = format!(
                "lowerdir={},upperdir={},workdir=/w",
                lower.join(":"),
                escape_path(&upper)
            );
            let c = parse(&split_options(&opts), Path::new("/m"), None, Path::new("/"))
                .unwrap();
            let want: Vec<PathBuf> = paths.iter().map(PathBuf::from).collect();
            prop_assert_eq!(c.lowerdirs, want);
            prop_assert_eq!(c.upperdir, Some(PathBuf::from(upper)));
        }

        #[test]
        fn split_round_trip(items in prop::collection::vec("[^\u{0}]{1,12}", 0..10)) {
            let joined: Vec<String> = items.iter().map(|s| s.replace('\\', r"\\").replace(',', r"\,")).collect();
            let split = split_options(&joined.join(","));
            prop_assert_eq!(split, joined);
        }
    }
}
