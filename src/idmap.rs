//! fuse-overlayfs' id mapping (`uidmapping=`, `gidmapping=`, `squash_to_*`):
//! layers keep the ids a container sees, the mount shows them as ids of the
//! mounter's namespace, so one store serves containers of several user
//! namespaces without chowning it.

/// The id shown for a layer id no mapping covers (the kernel's overflow id).
pub const OVERFLOW_ID: u32 = 65534;

/// Layer ids `disk..disk+len` show as `shown..shown+len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdRange {
    pub disk: u32,
    pub shown: u32,
    pub len: u32,
}

/// One kind of id (uid or gid): its ranges and squash.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdMap {
    /// Empty: ids pass unchanged.
    pub ranges: Vec<IdRange>,
    /// Every object shows this id (`squash_to_uid=`, `squash_to_root`).
    pub squash: Option<u32>,
}

impl IdMap {
    /// Parses `D:S:L[:D:S:L...]` as fuse-overlayfs does, empty fields (a
    /// leading `:`, as podman sends it) skipped.
    pub fn parse_ranges(v: &str) -> Result<Vec<IdRange>, String> {
        let nums = v
            .split(':')
            .filter(|f| !f.is_empty())
            .map(|f| {
                f.parse::<u32>()
                    .map_err(|_| format!("\"{f}\" is not an id"))
            })
            .collect::<Result<Vec<u32>, String>>()?;
        if nums.is_empty() || nums.len() % 3 != 0 {
            return Err("expected ID:MAPPED-ID:LEN triples".into());
        }
        nums.chunks(3)
            .map(|c| {
                let r = IdRange {
                    disk: c[0],
                    shown: c[1],
                    len: c[2],
                };
                let fits = |start: u32| start.checked_add(r.len).is_some();
                if r.len == 0 || !fits(r.disk) || !fits(r.shown) {
                    return Err(format!("bad range {}:{}:{}", c[0], c[1], c[2]));
                }
                Ok(r)
            })
            .collect()
    }

    /// The id the mount shows for a layer id.
    pub fn shown(&self, disk: u32) -> u32 {
        if let Some(s) = self.squash {
            return s;
        }
        if self.ranges.is_empty() {
            return disk;
        }
        self.ranges
            .iter()
            .find(|r| disk >= r.disk && disk - r.disk < r.len)
            .map_or(OVERFLOW_ID, |r| r.shown + (disk - r.disk))
    }

    /// The id shown for an id read from a layer: one on an idmapped mount
    /// already shows the mount's ids, and is only squashed.
    pub fn shown_from(&self, id: u32, idmapped: bool) -> u32 {
        match (self.squash, idmapped) {
            (Some(s), _) => s,
            (None, true) => id,
            (None, false) => self.shown(id),
        }
    }

    /// The id to store in the upper layer for an id read from a layer.
    pub fn copied(&self, id: u32, idmapped: bool) -> u32 {
        if idmapped {
            self.disk(id)
        } else {
            id
        }
    }

    /// The layer id for an id of the mounter's namespace (a caller's, or
    /// a chown's). `u32::MAX` ("unchanged" in chown) passes through.
    pub fn disk(&self, shown: u32) -> u32 {
        if self.ranges.is_empty() || shown == u32::MAX {
            return shown;
        }
        self.ranges
            .iter()
            .find(|r| shown >= r.shown && shown - r.shown < r.len)
            .map_or(OVERFLOW_ID, |r| r.disk + (shown - r.shown))
    }

    pub fn is_identity(&self) -> bool {
        self.ranges.is_empty() && self.squash.is_none()
    }
}

/// The uid and gid maps of a mount.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdMaps {
    pub uid: IdMap,
    pub gid: IdMap,
}

impl IdMaps {
    pub fn is_identity(&self) -> bool {
        self.uid.is_identity() && self.gid.is_identity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn podman_keep_id_mapping() {
        // podman --userns=keep-id for uid 1001, as containers/storage sends it.
        let m = IdMap {
            ranges: IdMap::parse_ranges(":0:1:1001:1001:0:1:1002:1002:64535").unwrap(),
            squash: None,
        };
        assert_eq!(m.ranges.len(), 3);
        assert_eq!(m.shown(0), 1);
        assert_eq!(m.shown(1000), 1001);
        assert_eq!(m.shown(1001), 0);
        assert_eq!(m.shown(1002), 1002);
        assert_eq!(m.shown(65536), 65536);
        assert_eq!(m.shown(65537), OVERFLOW_ID);
        for id in [0, 5, 1000, 1001, 1002, 65536] {
            assert_eq!(m.disk(m.shown(id)), id);
        }
        assert_eq!(m.disk(u32::MAX), u32::MAX);
        assert_eq!(m.disk(70000), OVERFLOW_ID);
    }

    #[test]
    fn parse_errors_and_squash() {
        assert!(IdMap::parse_ranges("0:1000").is_err());
        assert!(IdMap::parse_ranges("0:x:1").is_err());
        assert!(IdMap::parse_ranges("0:1:0").is_err());
        assert!(IdMap::parse_ranges("4294967295:0:2").is_err());
        assert!(IdMap::parse_ranges("").is_err());
        let m = IdMap {
            ranges: vec![],
            squash: Some(0),
        };
        assert_eq!(m.shown(1234), 0);
        assert_eq!(m.disk(1234), 1234);
        assert!(IdMaps::default().is_identity());
    }

    #[test]
    fn idmapped_layers_are_not_mapped_twice() {
        let m = IdMap {
            ranges: IdMap::parse_ranges("0:100000:65536").unwrap(),
            squash: None,
        };
        // A layer on an idmapped mount already shows 100000 for its 0.
        assert_eq!(m.shown_from(100000, true), 100000);
        assert_eq!(m.shown_from(0, false), 100000);
        // Its copy stores the layer's own id, as a plain lower's does.
        assert_eq!(m.copied(100000, true), 0);
        assert_eq!(m.copied(0, false), 0);
        let sq = IdMap {
            ranges: vec![],
            squash: Some(7),
        };
        assert_eq!(sq.shown_from(100000, true), 7);
    }
}
