//! A machine comes to be: from what it persisted (its state, the KV's tag, its last good version),
//! adopting the container it managed if it still exists, and run under its supervisor.

use super::*;

/// Spawns a machine for `cfg`, adopting one of `candidates` (the runtime's containers of this name) if
/// the runtime already has its container. It runs under a supervisor (`supervise.rs`): a machine
/// that panics is loaded again from what it persisted, not lost. The supervisor is a task of `owner`
/// (the agent's).
pub async fn spawn(
    cfg: ContainerConfig,
    deps: Arc<MachineDeps>,
    candidates: Vec<ContainerInfo>,
    owner: &mut tokio::task::JoinSet<()>,
) -> MachineHandle {
    let (tx, rx) = mpsc::channel(256);
    let handle = MachineHandle { name: cfg.name.clone(), tx: tx.clone() };
    let first = Machine::load(cfg.clone(), deps.clone(), candidates, supervise::Incarnation::first()).await;
    owner.spawn(supervise::supervise(first, cfg, deps, tx, rx));
    handle
}

impl Machine {
    /// A machine for `cfg` from what it persisted, adopting one of `candidates`; also how a
    /// supervisor brings back one that panicked.
    pub(super) async fn load(
        cfg: ContainerConfig,
        deps: Arc<MachineDeps>,
        candidates: Vec<ContainerInfo>,
        incarnation: supervise::Incarnation,
    ) -> (Machine, State) {
        let remembered = deps.store.load(&cfg.name).await;
        let kv_version = remembered.as_ref().and_then(|r| r.desired_version.as_deref()).and_then(|v| ImageVersion::parse(v).ok());
        let wanted = kv_version.filter(|_| cfg.kv_update).unwrap_or_else(|| cfg.image_tag.clone());
        let preferred =
            Preferred { id: remembered.as_ref().and_then(|r| r.container_id.clone()), spec: cfg.spec(&deps.node, &deps.docker, &wanted) };
        let existing = pick_adoptable(&*deps.runtime, candidates, &preferred).await;
        let settings = Settings { node: deps.node.clone(), docker: deps.docker.clone(), rollout: deps.rollout.clone() };
        Machine::new(cfg, settings, remembered, existing, incarnation)
    }

    /// A machine from what it remembered and the container it adopts, without I/O; and the state it
    /// begins in.
    pub(super) fn new(
        cfg: ContainerConfig,
        settings: Settings,
        remembered: Option<Remembered>,
        existing: Option<ContainerInfo>,
        incarnation: supervise::Incarnation,
    ) -> (Machine, State) {
        let kv_version = remembered.as_ref().and_then(|r| r.desired_version.as_deref()).and_then(|v| ImageVersion::parse(v).ok());
        let machine = Machine {
            instance_id: uuid_v4(),
            state: State::Start,
            container: existing,
            kv_version,
            last_good_image: remembered.as_ref().and_then(|r| r.last_good_image.clone()),
            lease: None,
            epoch: incarnation.first_epoch(),
            incident: incarnation.incident,
            job: Job::Idle,
            gate: Gate::default(),
            probing: false,
            fetch_ahead: None,
            fleet_health: Default::default(),
            registered: false,
            crash: CrashLoop::new(cfg.restart_backoff.unwrap_or(settings.rollout.restart_backoff)),
            next_delay: Duration::ZERO,
            pull_retry: Retry::default(),
            pull_due: None,
            backend_retry: Retry::default(),
            remediating: false,
            revive: None,
            handover: Handover::Nothing,
            // Without its state file a machine does not know what the KV last asked for: it keeps what runs
            // until the KV answers, rather than move it back to the configured tag meanwhile.
            kv_pending: cfg.kv_update && remembered.is_none(),
            restarts: remembered.as_ref().map_or(0, |r| r.restarts),
            replacing: None,
            rejected: remembered.as_ref().and_then(rejected),
            last_error: None,
            activity: None,
            governor_wait: Duration::ZERO,
            update_started: None,
            last_update: None,
            pending: Vec::new(),
            now: Now::read(),
            effects: Vec::new(),
            settings,
            cfg,
        };
        let initial = match remembered.map(|r| r.state) {
            // An operator's maintenance outlives an agent restart; an unfinished stop is finished.
            Some(State::Maintenance) => State::Maintenance,
            Some(State::Stop) => State::Stop,
            _ => State::Start,
        };
        (machine, initial)
    }
}

/// The version a machine rolled back from, as it remembered it.
fn rejected(remembered: &Remembered) -> Option<Rejected> {
    let version = ImageVersion::parse(remembered.bad_version.as_deref()?).ok()?;
    let at = match &remembered.bad_version_node {
        Some(node) => FailedAt::Node(node.clone()),
        None if remembered.bad_in_preflight => FailedAt::Preflight,
        None => FailedAt::Gate,
    };
    Some(Rejected { version, at })
}
