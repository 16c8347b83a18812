//! Layers: the upper dir and the lower dirs, each held by a directory fd.

use crate::error::{Errno, Error, Result, StartResult};
use crate::sys;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Index into `Layers::all`; the upper layer, when present, is index 0.
pub type LayerIdx = u16;

pub struct Layer {
    /// `O_PATH | O_DIRECTORY` fd of the layer root.
    pub root: Arc<OwnedFd>,
    pub dev: u64,
    pub path: PathBuf,
    /// The layer filesystem's UUID (null when it has none), for origin file handles.
    pub uuid: [u8; 16],
    /// The layer root on its attached mount: `open_by_handle_at` refuses
    /// the private clone.
    pub handle_root: OwnedFd,
    /// On an idmapped mount: its ids are already shown as the mount's
    /// (containers/storage idmaps lowers and may pass `uidmapping=` too).
    pub idmapped: bool,
}

impl Layer {
    /// Opens a lower layer root as a private clone of its mount, so mounts
    /// inside it (the overlay's own mountpoint among them) are never crossed.
    pub fn open_lower(path: &Path, idmapped_mounts: &[u64]) -> StartResult<Layer> {
        let root = match sys::open_tree_clone(path) {
            Ok(fd) => fd,
            Err(e) => {
                log::debug!("open_tree({}): {e}; using the path", path.display());
                sys::open_dir_path(path).map_err(|e| Error::at("lowerdir", path, e))?
            }
        };
        let attached = sys::open_dir_path(path).map_err(|e| Error::at("lowerdir", path, e))?;
        Self::with_root(root, attached.as_fd(), path, idmapped_mounts)
            .map_err(|e| Error::at("lowerdir", path, e))
    }

    /// The upper layer, from the root the workdir preparation opened (and
    /// locked): it must share its mount with the workdir for renames, so
    /// it is used as it is.
    pub fn upper(root: BorrowedFd<'_>, path: &Path, idmapped_mounts: &[u64]) -> StartResult<Layer> {
        let root_fd = root.try_clone_to_owned().map_err(Errno::from);
        root_fd
            .and_then(|fd| Self::with_root(fd, root, path, idmapped_mounts))
            .map_err(|e| Error::at("upperdir", path, e))
    }

    /// `attached`: the root on the mount it is attached to (the caller's).
    fn with_root(
        root: OwnedFd,
        attached: BorrowedFd<'_>,
        path: &Path,
        idmapped_mounts: &[u64],
    ) -> Result<Layer> {
        let st = sys::fstat(root.as_fd())?;
        let uuid = sys::fs_uuid(root.as_fd()).unwrap_or([0; 16]);
        let idmapped = sys::mount_id(attached).is_ok_and(|id| idmapped_mounts.contains(&id));
        // open_by_handle_at takes no O_PATH fd.
        let handle_root = sys::reopen(attached, libc::O_RDONLY | libc::O_DIRECTORY)?;
        Ok(Layer {
            handle_root,
            idmapped,
            root: Arc::new(root),
            dev: st.st_dev,
            path: path.to_path_buf(),
            uuid,
        })
    }
}

/// All layers of a mount, upper first when there is one.
pub struct Layers {
    pub all: Vec<Layer>,
    pub has_upper: bool,
}

pub const UPPER: LayerIdx = 0;

impl Layers {
    pub fn is_upper(&self, l: LayerIdx) -> bool {
        self.has_upper && l == UPPER
    }

    /// All layers on one filesystem (the kernel's "samefs").
    pub fn same_fs(&self) -> bool {
        self.all.windows(2).all(|w| w[0].dev == w[1].dev)
    }

    /// The kernel's fs ids: 0 for the upper fs (reserved even without an
    /// upper layer), then each other filesystem in layer order.
    pub fn fs_devs(&self) -> Vec<u64> {
        let mut devs = Vec::new();
        if self.has_upper {
            devs.push(self.all[0].dev);
        } else {
            devs.push(u64::MAX);
        }
        for l in &self.all {
            if !devs.contains(&l.dev) {
                devs.push(l.dev);
            }
        }
        devs
    }

    /// The kernel's xino bits: enough high bits for the fs id plus one,
    /// or 0 when all layers share one filesystem.
    pub fn xino_bits(&self) -> u32 {
        if self.same_fs() {
            return 0;
        }
        let numfs = self.fs_devs().len() as u32;
        (numfs - 1).ilog2() + 2
    }

    pub fn get(&self, l: LayerIdx) -> &Layer {
        &self.all[l as usize]
    }

    /// All layer indices, top-down.
    pub fn indices(&self) -> impl Iterator<Item = LayerIdx> {
        0..self.all.len() as LayerIdx
    }
}
