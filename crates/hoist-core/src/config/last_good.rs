//! The last container set that loaded without errors, kept in `<state_dir>/last-good.json`. An agent
//! that starts (after a reboot, say) while a data file is broken runs this set instead of refusing to
//! start, so one bad file does not leave the node's containers unmanaged. Only a node that never had a
//! good set refuses: starting with nothing declared would purge whatever runs.

use super::ContainerSet;
use serde::{Deserialize, Serialize};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub const LAST_GOOD_FILE: &str = "last-good.json";

/// The validated set as it was loaded: facts are already interpolated, so running it again needs
/// neither the data files nor the facts of that time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastGood {
    /// Unix seconds when it was loaded.
    pub saved: i64,
    pub set: ContainerSet,
}

impl LastGood {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(LAST_GOOD_FILE)
    }

    /// Replaces the file atomically and durably: a crash or power loss leaves the old set or the new
    /// one, never a torn file — it is read exactly when things have already gone wrong.
    pub fn save(state_dir: &Path, set: &ContainerSet, saved: i64) -> io::Result<()> {
        let record = LastGood { saved, set: set.clone() };
        let tmp = state_dir.join(format!(".{LAST_GOOD_FILE}.tmp"));
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&serde_json::to_vec_pretty(&record)?)?;
        file.sync_all()?;
        std::fs::rename(&tmp, Self::path(state_dir))?;
        std::fs::File::open(state_dir)?.sync_all()
    }

    /// None when no good set was ever saved; an error when the file exists but cannot be used (then
    /// it is not trusted: the caller refuses, as with no good set).
    pub fn load(state_dir: &Path) -> Result<Option<LastGood>, String> {
        let path = Self::path(state_dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| format!("{} is unreadable: {e}", path.display())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }
}
