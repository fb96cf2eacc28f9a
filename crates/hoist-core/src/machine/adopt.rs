//! Which existing container a machine adopts at start.

use super::*;

/// What a machine knows of the container it should adopt.
pub(crate) struct Preferred {
    /// The container it managed before (from its state file).
    pub id: Option<String>,
    /// What it wants to run.
    pub spec: ContainerSpec,
}

/// The container to adopt among several of one name (left by a crash mid-replacement, or a look-alike
/// someone made with copied labels): the one the machine managed before, else one under hoist's own
/// name for it that matches the definition, else one under its name, each preferring a running one,
/// then the newest. Never a stopped or foreign container over a running one of its own. Duplicates
/// under hoist's name are removed; a container that only copies the labels is left alone.
pub(crate) async fn pick_adoptable(runtime: &dyn Runtime, candidates: Vec<ContainerInfo>, preferred: &Preferred) -> Option<ContainerInfo> {
    let hash = preferred.spec.hash();
    let rank = |c: &ContainerInfo| {
        let named = c.container_name == preferred.spec.container_name;
        let matching = named && c.label(LABEL_SPEC) == Some(hash.as_str()) && c.image == preferred.spec.image_ref();
        let running = c.state == RunState::Running;
        (preferred.id.as_deref() == Some(c.id.as_str()) && running, running && matching, running && named, running, named, c.created)
    };
    let mut candidates = candidates;
    candidates.sort_by_key(|c| std::cmp::Reverse(rank(c)));
    let mut candidates = candidates.into_iter();
    let keep = candidates.next();
    for extra in candidates {
        // A leftover of a replacement hoist was in the middle of holds hoist's name for it (or held
        // it: a stopped one renamed by nobody); anything else is someone's copy.
        if extra.container_name == preferred.spec.container_name || extra.state != RunState::Running {
            tracing::warn!(container = %extra.container_name, id = %extra.id, "removing a duplicate container");
            let _ = runtime.remove(&extra.id).await;
        } else {
            tracing::warn!(container = %extra.container_name, id = %extra.id, "a container carries this machine's labels under another name; left alone");
        }
    }
    keep
}
