//! What both examples share: finding the rovl binary, printing steps, and a
//! `rovl mount -f` child that is always unmounted.

#[path = "../../tests/common/child.rs"]
mod child;

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

/// How long the daemon may take to mount, or to exit once unmounted.
const WAIT: Duration = Duration::from_secs(10);

pub type Result<T> = std::result::Result<T, String>;

/// `ROVL_BIN`, else `rovl` in the target dir this example was built into
/// (the example lives in `target/<profile>/examples/`).
pub fn find_rovl() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("ROVL_BIN") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("ROVL_BIN={} is not a file", p.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    let profile_dir = exe.parent().and_then(Path::parent);
    if let Some(dir) = profile_dir {
        let p = dir.join("rovl");
        if p.is_file() {
            return Ok(p);
        }
        // A debug example can still use a release build, and vice versa.
        if let Some(target) = dir.parent() {
            for profile in ["debug", "release"] {
                let p = target.join(profile).join("rovl");
                if p.is_file() {
                    return Ok(p);
                }
            }
        }
    }
    Err(
        "the rovl binary is not built: run `cargo build` (or `cargo build --release`) first, \
         or point ROVL_BIN at it"
            .to_string(),
    )
}

pub fn step(n: u32, title: &str) {
    println!("\n=== {n}. {title}");
}

pub fn cmd(c: &str) {
    println!("$ {c}");
}

pub fn check(ok: bool, what: &str) -> Result<()> {
    if ok {
        println!("   ok: {what}");
        Ok(())
    } else {
        Err(format!("unexpected: {what} does not hold"))
    }
}

pub fn io_err(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> String {
    move |e| format!("{what}: {e}")
}

/// The fstype at exactly `p` in /proc/self/mountinfo, if mounted.
pub fn mounted_fstype(p: &Path) -> Option<String> {
    rovl::mountinfo::top_at(p).ok().flatten().map(|m| m.fstype)
}

/// A `rovl mount -f` child this example owns. Dropping it unmounts (lazily if
/// busy) and reaps the daemon, so no mount outlives the example.
pub struct Mount {
    pub child: Option<Child>,
    pub mountpoint: PathBuf,
}

impl Mount {
    /// Runs `rovl mount -f -o OPTS MERGED` in `cwd` and waits (bounded) until
    /// the mount shows up in mountinfo.
    pub fn start(rovl: &Path, cwd: &Path, opts: &str, merged_rel: &str) -> Result<Mount> {
        // Without a leading "./", so it compares equal to mountinfo's entry.
        let rel: PathBuf = Path::new(merged_rel)
            .components()
            .filter(|c| !matches!(c, std::path::Component::CurDir))
            .collect();
        let mountpoint = cwd.join(rel);
        let child = Command::new(rovl)
            .current_dir(cwd)
            .args(["mount", "-f", "-o", opts, merged_rel])
            .spawn()
            .map_err(io_err(format!("cannot run {}", rovl.display())))?;
        let mut m = Mount {
            child: Some(child),
            mountpoint,
        };
        let c = m.child.as_mut().expect("just set");
        let rovl_up = |i: &rovl::mountinfo::MountInfo| i.fstype == "fuse.rovl";
        match child::wait_mounted(c, &m.mountpoint, WAIT, rovl_up) {
            child::Mounted::Up(_) => Ok(m),
            child::Mounted::Exited(st) => {
                m.child = None;
                Err(format!("rovl exited before the mount was ready ({st})"))
            }
            child::Mounted::TimedOut => Err(format!("rovl did not mount within {WAIT:?}")),
        }
    }

    /// `rovl umount MERGED`, then waits for the daemon to exit 0.
    pub fn unmount(mut self, rovl: &Path, cwd: &Path, merged_rel: &str) -> Result<()> {
        let st = Command::new(rovl)
            .current_dir(cwd)
            .args(["umount", merged_rel])
            .status()
            .map_err(io_err("rovl umount"))?;
        if !st.success() {
            return Err(format!("rovl umount failed ({st})"));
        }
        let Some(mut c) = self.child.take() else {
            return Err("no daemon to wait for".to_string());
        };
        match child::wait_bounded(&mut c, WAIT) {
            (st, true) if st.success() => Ok(()),
            (st, true) => Err(format!("the rovl daemon exited with {st}")),
            (_, false) => Err("the rovl daemon did not exit after unmount".to_string()),
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = child::stop(&mut c, &self.mountpoint, WAIT);
        }
    }
}
