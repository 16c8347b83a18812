//! rovl: a userspace overlay (union) filesystem over FUSE.
//!
//! The layout follows the kernel's `fs/overlayfs`: one concern per module.
//! `fs` is the thin `fuser::Filesystem` dispatcher over the others.
//! Every `unsafe` block is in `sys`, the one syscall boundary.

#![deny(unsafe_code)]

pub mod apply;
pub mod copyup;
pub mod diff;
pub mod dir;
pub mod error;
pub mod file;
pub mod fs;
pub mod fsck;
pub mod idmap;
pub mod index;
pub mod inode;
pub mod inode_ops;
pub mod layer;
pub mod lookup;
pub mod mountinfo;
pub mod ondisk;
pub mod options;
pub mod overlay;
pub mod override_stat;
pub mod prepare;
pub mod readdir;
pub mod registry;
pub mod request;
pub mod resolve;
pub mod session;
pub mod stats;
#[allow(unsafe_code)]
pub mod sys;
pub mod whiteout;
pub mod workdir;
pub mod xattr;
