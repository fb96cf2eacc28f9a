//! What a machine remembers across agent restarts: its state (so maintenance survives a restart), the
//! KV tag it was told, the last image that ran healthy, and its restart count. One small JSON file per
//! container under `<state_dir>/machines/`, replaced atomically.

use crate::fsm::State;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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
    /// `bad_version` failed its preflight here (it never ran), rather than its health gate.
    #[serde(default)]
    pub bad_in_preflight: bool,
    /// The container the machine managed, so a restarted agent adopts that one and no look-alike.
    #[serde(default)]
    pub container_id: Option<String>,
}

/// Where the machines' `Remembered` states are kept: files under the state_dir, or, for the fault
/// simulator, memory it hands to each run of a simulated agent (kept or lost across a crash).
#[derive(Debug, Clone)]
pub struct StateStore {
    place: Place,
}

#[derive(Debug, Clone)]
enum Place {
    Dir(PathBuf),
    Memory(Arc<Mutex<BTreeMap<String, Remembered>>>),
}

impl StateStore {
    pub fn new(state_dir: impl Into<PathBuf>) -> StateStore {
        StateStore { place: Place::Dir(state_dir.into().join("machines")) }
    }

    /// Nothing on disk: for the simulator, where file I/O would make runs depend on the OS's timing.
    pub fn in_memory() -> StateStore {
        StateStore { place: Place::Memory(Arc::default()) }
    }

    fn path(dir: &Path, name: &str) -> PathBuf {
        dir.join(format!("{name}.json"))
    }

    /// None when nothing (or nothing readable) was remembered: the machine then starts afresh.
    pub async fn load(&self, name: &str) -> Option<Remembered> {
        let dir = match &self.place {
            Place::Dir(dir) => dir,
            Place::Memory(states) => return states.lock().expect("not poisoned").get(name).cloned(),
        };
        let bytes = tokio::fs::read(Self::path(dir, name)).await.ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(container = name, error = %e, "ignoring unreadable machine state");
                None
            }
        }
    }

    pub async fn save(&self, name: &str, remembered: &Remembered) -> io::Result<()> {
        let dir = match &self.place {
            Place::Dir(dir) => dir,
            Place::Memory(states) => {
                states.lock().expect("not poisoned").insert(name.to_string(), remembered.clone());
                return Ok(());
            }
        };
        tokio::fs::create_dir_all(dir).await?;
        let tmp = dir.join(format!(".{name}.json.tmp"));
        tokio::fs::write(&tmp, serde_json::to_vec_pretty(remembered)?).await?;
        tokio::fs::rename(&tmp, Self::path(dir, name)).await
    }

    pub async fn forget(&self, name: &str) -> io::Result<()> {
        let dir = match &self.place {
            Place::Dir(dir) => dir,
            Place::Memory(states) => {
                states.lock().expect("not poisoned").remove(name);
                return Ok(());
            }
        };
        match tokio::fs::remove_file(Self::path(dir, name)).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}
