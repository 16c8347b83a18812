//! rovl: a userspace overlay (union) filesystem over FUSE.
//!
//! The layout follows the kernel's `fs/overlayfs`: one concern per module.
//! `fs` is the thin `fuser::Filesystem` dispatcher over the others.

pub mod fs;
pub mod options;
pub mod session;
pub mod workdir;
