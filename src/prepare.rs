//! Mount preparation (the kernel's `params.c` keeping the paths it parsed,
//! and `super.c` `ovl_get_layers`/`ovl_get_workdir`): every directory the
//! options name is opened here, once. Nothing after this resolves a layer
//! or workdir path; the overlay and the session get these fds.

use crate::error::{Error, StartResult};
use crate::layer::{Layer, Layers};
use crate::options::MountConfig;
use crate::workdir::{self, WorkDir};

/// What a mount holds from the start: the layer roots (upper first) and,
/// with an upper layer, the prepared workdir with its locks.
pub struct Prepared {
    pub layers: Layers,
    /// `W`, `W/work` and the locks on W and the upper dir; the daemon keeps
    /// it for its whole life. A mount that fails gives it back with
    /// [`WorkDir::abandon`].
    pub workdir: Option<WorkDir>,
}

/// Opens (and for a writable mount locks and cleans) what `cfg` names.
/// Call only after [`crate::options::validate`] passed.
pub fn prepare(cfg: &MountConfig) -> StartResult<Prepared> {
    // Read once: a layer on an idmapped mount already shows mapped ids.
    let idmapped = crate::mountinfo::idmapped_ids();
    let mut all = Vec::with_capacity(cfg.lowerdirs.len() + 1);
    let workdir = match (&cfg.upperdir, &cfg.workdir) {
        (Some(upper), Some(work)) => {
            let w = workdir::prepare(work, upper)?;
            all.push(Layer::upper(w.upper_fd(), upper, &idmapped)?);
            Some(w)
        }
        // (An upper dir without a workdir never gets past the options.)
        _ => None,
    };
    for l in &cfg.lowerdirs {
        all.push(Layer::open_lower(l, &idmapped)?);
    }
    if all.len() > u16::MAX as usize {
        return Err(Error::new(format!(
            "{} layers: at most {} fit",
            all.len(),
            u16::MAX
        )));
    }
    let has_upper = workdir.is_some();
    Ok(Prepared {
        layers: Layers { all, has_upper },
        workdir,
    })
}
