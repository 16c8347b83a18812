//! Mounting: builds the filesystem and the FUSE session for a config.

use crate::fs::OverlayFs;
use crate::options::MountConfig;
use std::io;

/// Mounts `cfg` at `cfg.mountpoint` and completes the FUSE handshake.
/// The caller runs the returned session (`Session::run`) to serve requests.
/// `workdir` must already be prepared (see [`crate::workdir`]).
pub fn mount(cfg: &MountConfig) -> io::Result<fuser::Session<OverlayFs>> {
    let fs = OverlayFs::new(cfg)?;
    let config = fuser::Config::default();
    fuser::Session::new(fs, &cfg.mountpoint, &config)
}
