//! One run: the fleet set up, the release, the faults applied at their times, then the wait for it
//! to settle, checked by `check.rs`.

use crate::engine::{Engine, EngineView};
use crate::plan::{Action, Fault, Plan, RELEASE_AT, V2_DIGEST};
use crate::view::NodeView;
use crate::world::World;
use crate::{Outcome, check, elapsed};
use futures_util::stream::{self, BoxStream, StreamExt};
use hoist_core::agent::{self, AgentHandle};
use hoist_core::backend::{BucketConfig, HOIST_BUCKET, KvOperation, tag_key};
use hoist_core::config::{AgentConfig, ContainerSet, DockerConfig, RolloutConfig, load_containers};
use hoist_core::degraded::DegradedPolicy;
use hoist_core::files::FileWatch;
use hoist_core::fsm::Transition;
use hoist_core::machine::MachineDeps;
use hoist_core::persist::StateStore;
use hoist_core::release::{self, OUTCOMES_BUCKET, Policy, ReleaseRecord, ReleaseState};
use hoist_core::rollout_status::{self, STATUS_BUCKET};
use hoist_core::slot::SlotKeeper;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

pub const GOVERNOR: &str = "RG";
/// The update governor: how many nodes pull at once.
const PULLS: &str = "UG";
pub const CONTAINER: &str = "web";
pub const IMAGE: &str = "registry.sim/web";
/// A second container on every node, outside the rollout: its machine shares the agent, the
/// engine and their faults with the one rolled out.
const NEIGHBOUR: &str = "cron";

/// `rollout.healthy_deadline` of the simulated agents.
pub const HEALTHY_DEADLINE: Duration = Duration::from_secs(60);

/// How long after the last fault every node must have settled.
pub const SETTLE_WITHIN: Duration = Duration::from_secs(15 * 60);

/// The one container every node runs, as an operator would declare it.
static SET: LazyLock<ContainerSet> = LazyLock::new(|| {
    let dir = tempfile::tempdir().expect("a temp dir");
    let data = dir.path().join("containers.yaml");
    let yaml = format!(
        "containers:\n  {CONTAINER}:\n    image: {IMAGE}\n    image_tag: v1\n    kv_update: true\n    restart_governor: {GOVERNOR}\n    update_governor: {PULLS}\n    dependency_check: {{ type: exec, command: [check-db], interval: 5s, retries: 2 }}\n  {NEIGHBOUR}:\n    image: {IMAGE}\n    image_tag: v1\n"
    );
    std::fs::write(&data, yaml).expect("writing the container data");
    load_containers(&[data], &serde_json::json!({})).expect("the simulated container data loads")
});

/// `restart_files` are not simulated: a watch that never fires.
struct NoFiles;

impl FileWatch for NoFiles {
    fn watch(&self, _paths: &[PathBuf]) -> BoxStream<'static, PathBuf> {
        stream::pending().boxed()
    }
}

/// A simulated machine: its engine and state file outlive the agent runs on it.
pub struct Node {
    pub name: String,
    pub engine: Arc<Engine>,
    store: Mutex<StateStore>,
    run: Mutex<Option<AgentRun>>,
}

struct AgentRun {
    alive: Arc<AtomicBool>,
    handle: AgentHandle,
}

impl Node {
    /// Starts an agent on this node, as `hoist agent` wires one.
    async fn start_agent(&self, world: &Arc<World>) {
        let alive = Arc::new(AtomicBool::new(true));
        let view = Arc::new(NodeView { world: world.clone(), node: self.name.clone(), alive: alive.clone() });
        let deps = Arc::new(MachineDeps {
            runtime: Arc::new(EngineView { engine: self.engine.clone(), alive: alive.clone() }),
            kv: view.clone(),
            governor: view.clone(),
            events: view.clone(),
            files: Arc::new(NoFiles),
            store: self.store.lock().expect("not poisoned").clone(),
            node: self.name.clone(),
            docker: DockerConfig { stop_grace: Duration::from_secs(2), ..AgentConfig::defaults().docker },
            rollout: RolloutConfig {
                healthy_deadline: HEALTHY_DEADLINE,
                min_healthy_time: Duration::from_secs(3),
                unverified_wait: Duration::from_secs(10),
                governor_timeout: Duration::from_secs(600),
                restart_backoff: Default::default(),
            },
            registration: hoist_core::config::RegistrationConfig { interval: Duration::from_secs(15), ccm: false },
            conditions: Default::default(),
            slots: SlotKeeper::start(view.clone(), view.clone(), self.name.clone()),
            outbox: hoist_core::outbox::Outbox::start(view),
            background: Default::default(),
        });
        world.note(format!("{} agent starts", self.name));
        let outbox = deps.outbox.clone();
        let handle = agent::start(deps, SET.clone()).await;
        // As `hoist agent` runs them: the rollout status records and the node's part in releases.
        // Once the agent dies, their store calls never return (`NodeView`).
        let kv: Arc<dyn hoist_core::backend::Kv> =
            Arc::new(NodeView { world: world.clone(), node: self.name.clone(), alive: alive.clone() });
        tokio::spawn(rollout_status::keep_published(kv.clone(), handle.clone()));
        tokio::spawn(release::conductor::conduct(kv.clone(), handle.clone()));
        tokio::spawn(hoist_core::degraded::lookout::keep_watch(kv, handle.clone(), outbox, DEGRADED));
        *self.run.lock().expect("not poisoned") = Some(AgentRun { alive, handle });
    }

    /// The agent process dies: nothing it does from now on reaches anything. False if none ran (a
    /// crash drawn while an earlier one is still down: the node's lock lets one agent run at a time).
    fn crash_agent(&self, world: &World, keeps_state: bool) -> bool {
        let Some(run) = self.run.lock().expect("not poisoned").take() else { return false };
        run.alive.store(false, std::sync::atomic::Ordering::SeqCst);
        if !keeps_state {
            *self.store.lock().expect("not poisoned") = StateStore::in_memory();
        }
        world.note(format!("{} agent crashed ({})", self.name, if keeps_state { "state kept" } else { "state file lost" }));
        true
    }

    pub fn agent(&self) -> Option<AgentHandle> {
        self.run.lock().expect("not poisoned").as_ref().map(|r| r.handle.clone())
    }
}

pub async fn simulate(plan: Plan) -> Outcome {
    let world = World::new();
    world.create_bucket(HOIST_BUCKET, BucketConfig::default());
    world.create_bucket(STATUS_BUCKET, BucketConfig::default());
    world.create_bucket(OUTCOMES_BUCKET, BucketConfig::default());
    world.add_governor(GOVERNOR, plan.capacity, plan.expire);
    world.add_governor(PULLS, 1, Duration::from_secs(120));
    world.write(HOIST_BUCKET, &tag_key(CONTAINER), b"v1", KvOperation::Put).expect("the bucket exists");
    world.note(format!("plan: {plan:?}"));
    let nodes: Vec<Arc<Node>> = (0..plan.nodes)
        .map(|i| {
            let name = format!("n{i}");
            let engine = Engine::new(&name, world.clone(), CONTAINER, GOVERNOR);
            if plan.broken {
                engine.with(|s| s.broken.insert(format!("{IMAGE}:v2")));
                engine.with(|s| s.broken.insert(format!("{IMAGE}@{V2_DIGEST}")));
            }
            Arc::new(Node { name, engine, store: Mutex::new(StateStore::in_memory()), run: Mutex::new(None) })
        })
        .collect();
    for node in &nodes {
        node.start_agent(&world).await;
    }

    let release = {
        let (world, policy) = (world.clone(), plan.release.clone());
        tokio::spawn(async move {
            tokio::time::sleep(RELEASE_AT).await;
            match policy {
                Some(p) => {
                    world.note(format!(
                        "release: a record asks for v2 ({V2_DIGEST}) in waves {:?}, bake {:?}, budget {}",
                        p.waves, p.bake, p.budget
                    ));
                    let policy = Policy {
                        waves: p.waves,
                        bake: p.bake,
                        budget: release::Budget { failures: p.budget, percent: None, min_sample: 1 },
                    };
                    let record = ReleaseRecord {
                        id: "sim-release".into(),
                        container: CONTAINER.into(),
                        image: IMAGE.into(),
                        tag: "v2".into(),
                        digest: V2_DIGEST.into(),
                        previous: Some("v1".into()),
                        previous_digest: None,
                        tag_revision: world.get(HOIST_BUCKET, &tag_key(CONTAINER)).ok().flatten().map(|e| e.revision),
                        policy,
                        plan: None,
                        wave: 0,
                        through: None,
                        state: ReleaseState::Rolling,
                        reason: None,
                        by: "operator@sim".into(),
                        at_ms: hoist_core::clock::unix_now_ms(),
                    };
                    let value = serde_json::to_vec(&record).expect("records serialise");
                    world.write(HOIST_BUCKET, &release::release_key(CONTAINER), &value, KvOperation::Put).expect("the bucket exists");
                }
                None => {
                    world.note("release: the KV asks for v2");
                    world.write(HOIST_BUCKET, &tag_key(CONTAINER), b"v2", KvOperation::Put).expect("the bucket exists");
                }
            }
        })
    };
    tokio::spawn(watch_degraded(world.clone()));
    for timed in plan.faults.clone() {
        let (world, nodes, expire) = (world.clone(), nodes.clone(), plan.expire);
        tokio::spawn(async move {
            tokio::time::sleep(timed.at).await;
            apply(&timed.fault, &world, &nodes, expire).await;
        });
    }
    tokio::time::sleep(plan.calm_at() + Duration::from_millis(1)).await;
    let _ = release.await;
    world.note("the faults are over");
    let may_roll_back = plan.faults.iter().any(|t| matches!(t.fault, Fault::ContainerCrash { .. }));
    check::settles(&world, &nodes, &plan, may_roll_back, SETTLE_WITHIN).await;
    // Once settled (or given up on), the shared outage, if the seed has one.
    let outage = match &plan.shared_outage {
        Some(o) => {
            tokio::time::sleep(o.after).await;
            let began = elapsed();
            world.set_dependency_away(true);
            tokio::time::sleep(o.lasts).await;
            world.set_dependency_away(false);
            Some((began, o.lasts))
        }
        None => None,
    };
    check::degraded_only_for_a_shared_outage(&world, &plan, outage, DEGRADED.window).await;
    if plan.broken {
        check::few_tried_the_broken_version(&world, &plan);
        check::pulls_kept_to_the_update_governor(&world, &plan);
    }
    let tried_broken = world.nodes_that_tried_broken().into_iter().collect();
    Outcome { violations: world.violations(), trace: world.trace(), tried_broken, simulated: elapsed(), plan }
}

/// The simulated agents' `fleet.degraded`: the default share and minimum, a shorter window (30 s,
/// not 2 min) so that a shared outage and its clearing fit in a short run.
pub const DEGRADED: DegradedPolicy = DegradedPolicy { share: 50, window: Duration::from_secs(30), min_nodes: 3 };

/// Looks at the fleet's degraded record every second, for `check.rs`.
async fn watch_degraded(world: Arc<World>) {
    loop {
        let entry = world.get(HOIST_BUCKET, &hoist_core::degraded::degraded_key(CONTAINER)).ok().flatten();
        world.saw_degraded(entry.and_then(|e| hoist_core::degraded::lookout::parse(&e.value)).is_some_and(|r| r.active));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn apply(fault: &Fault, world: &Arc<World>, nodes: &[Arc<Node>], expire: Duration) {
    world.note(format!("fault: {fault:?}"));
    match *fault {
        Fault::AgentCrash { node, down, keeps_state } => {
            if nodes[node].crash_agent(world, keeps_state) {
                tokio::time::sleep(down).await;
                nodes[node].start_agent(world).await;
            }
        }
        Fault::CutOff { node, lasts } => {
            world.set_cut_off(&nodes[node].name, true);
            tokio::time::sleep(lasts).await;
            world.set_cut_off(&nodes[node].name, false);
            world.note(format!("{} reaches the store again", nodes[node].name));
        }
        Fault::Outage { lasts } => {
            nodes.iter().for_each(|n| world.set_cut_off(&n.name, true));
            tokio::time::sleep(lasts).await;
            nodes.iter().for_each(|n| world.set_cut_off(&n.name, false));
            world.note("the store answers again");
        }
        Fault::EngineRestart { node, lasts, live_restore } => {
            nodes[node].engine.go_down(live_restore);
            tokio::time::sleep(lasts).await;
            nodes[node].engine.come_up();
        }
        Fault::ContainerCrash { node } => nodes[node].engine.crash(CONTAINER),
        Fault::Retag { to } => {
            world.write(HOIST_BUCKET, &tag_key(CONTAINER), to.as_bytes(), KvOperation::Put).expect("the bucket exists");
        }
        Fault::Operator { node, action } => {
            // The agent running when the operator asks (one may have crashed and restarted meanwhile).
            let ask = |transition: Transition| async move {
                let Some(agent) = nodes[node].agent() else {
                    world.note(format!("{} has no agent to ask", nodes[node].name));
                    return false;
                };
                let answer = agent.transition(CONTAINER, transition).await;
                world.note(format!("{} operator asks {transition}: {answer:?}", nodes[node].name));
                answer.is_ok()
            };
            match action {
                Action::Restart => _ = ask(Transition::Restart).await,
                Action::Update => _ = ask(Transition::Update).await,
                Action::Maintenance { lasts } => {
                    if ask(Transition::Maintenance).await {
                        tokio::time::sleep(lasts).await;
                        // As an operator would, until an agent answers.
                        while !ask(Transition::Resume).await {
                            tokio::time::sleep(Duration::from_secs(5)).await;
                        }
                    }
                }
            }
        }
        Fault::AdapterPanics { node, count } => nodes[node].engine.with(|s| s.panics += count),
        Fault::FailingPulls { node, count } => nodes[node].engine.with(|s| s.failing_pulls += count),
        Fault::SlowPulls { node, latency } => nodes[node].engine.with(|s| s.pull_latency = latency),
        Fault::Evict => {
            let oldest = world.view_governor(GOVERNOR).ok().and_then(|g| g.leases.first().map(|l| l.seq));
            if let Some(seq) = oldest {
                let _ = world.evict(GOVERNOR, seq);
            }
        }
        Fault::Capacity { to } => {
            world.add_governor(GOVERNOR, to, expire);
        }
    }
}
