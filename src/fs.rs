//! The `fuser::Filesystem` impl: a thin dispatcher over the other modules.

use crate::options::MountConfig;
use std::io;

/// The overlay filesystem served over FUSE.
pub struct OverlayFs {}

impl OverlayFs {
    /// Opens the layers named by `cfg`. Changes nothing on disk.
    pub fn new(_cfg: &MountConfig) -> io::Result<Self> {
        Err(io::Error::other("not implemented yet"))
    }
}

impl fuser::Filesystem for OverlayFs {}
