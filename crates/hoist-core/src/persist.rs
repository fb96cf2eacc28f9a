//! What a machine remembers across agent restarts: its state (so maintenance survives a restart), the
//! KV tag it was told, the last image that ran healthy, and its restart count. One small JSON file per
//! container under `<state_dir>/machines/`, replaced atomically.

use crate::fsm::State;
use serde::{Deserialize, Serialize};
use std::io;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remembered {
    pub state: State,
    pub desired_version: Option<String>,
    pub last_good_image: Option<String>,
    pub restarts: u64,
    /// A version rolled back from (absent in files written before rollbacks existed).
    #[serde(default)]
    pub bad_version: Option<String>,
    /// The node where `bad_version` failed, when it was another node's rollback that stopped it here.
    #[serde(default)]
    pub bad_version_node: Option<String>,
    /// The container the machine managed, so a restarted agent adopts that one and no look-alike.
    #[serde(default)]
    pub container_id: Option<String>,
}

#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    pub fn new(state_dir: impl Into<PathBuf>) -> StateStore {
        StateStore { dir: state_dir.into().join("machines") }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    /// None when nothing (or nothing readable) was remembered: the machine then starts afresh.
    pub async fn load(&self, name: &str) -> Option<Remembered> {
        let bytes = tokio::fs::read(self.path(name)).await.ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(container = name, error = %e, "ignoring unreadable machine state");
                None
            }
        }
    }

    pub async fn save(&self, name: &str, remembered: &Remembered) -> io::Result<()> {
        tokio::fs::create_dir_all(&self.dir).await?;
        let tmp = self.dir.join(format!(".{name}.json.tmp"));
        tokio::fs::write(&tmp, serde_json::to_vec_pretty(remembered)?).await?;
        tokio::fs::rename(&tmp, self.path(name)).await
    }

    pub async fn forget(&self, name: &str) -> io::Result<()> {
        match tokio::fs::remove_file(self.path(name)).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}
