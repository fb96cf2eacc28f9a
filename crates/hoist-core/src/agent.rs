//! The agent: one supervisor task per node that owns the set of machines. It adopts the containers
//! the runtime already has, spawns a machine per declared container, routes runtime events to the
//! right machine, applies config reloads as a diff (new → spawn, changed → reconfigure, gone → stop
//! and purge), and removes labelled orphans. Operators reach it through `AgentHandle`.

use crate::backend::TransitionEvent;
use crate::config::{ContainerConfig, ContainerSet, Ensure};
use crate::fsm::{State, Transition, TransitionError};
use crate::machine::{self, Input, MachineDeps, MachineHandle};
use crate::runtime::{ContainerInfo, RunState, RuntimeEvent};
use crate::spec::LABEL_NAME;
use crate::status::NodeStatus;
use futures_util::StreamExt;
use futures_util::future::join_all;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

/// How often the governors' warnings are re-checked besides at every load.
const GOVERNOR_CHECK: Duration = Duration::from_secs(30);
/// How long shutdown waits for governor slots to be released (the governor's expiry is the fallback).
const SHUTDOWN_RELEASES: Duration = Duration::from_secs(5);

enum Command {
    Status {
        container: Option<String>,
        reply: oneshot::Sender<NodeStatus>,
    },
    Transition {
        container: String,
        transition: Transition,
        reply: oneshot::Sender<Result<State, TransitionError>>,
    },
    Reload {
        set: Result<ContainerSet, String>,
        reply: oneshot::Sender<()>,
    },
    RuntimeEvent(RuntimeEvent),
    RuntimeReconnected,
    /// Look again at orphans that were too young to purge.
    Purge,
    /// Look again at the governors the containers use (every `GOVERNOR_CHECK`).
    CheckGovernors,
    Warnings(Vec<String>),
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

#[derive(Clone)]
pub struct AgentHandle {
    tx: mpsc::Sender<Command>,
    node: String,
}

impl AgentHandle {
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Status of every machine, or of one container.
    pub async fn status(&self, container: Option<String>) -> NodeStatus {
        let (reply, rx) = oneshot::channel();
        let _ = self.tx.send(Command::Status { container, reply }).await;
        rx.await.unwrap_or_else(|_| NodeStatus { node: self.node.clone(), machines: vec![], config_error: None, warnings: vec![] })
    }

    pub async fn transition(&self, container: &str, transition: Transition) -> Result<State, TransitionError> {
        let (reply, rx) = oneshot::channel();
        let _ = self.tx.send(Command::Transition { container: container.into(), transition, reply }).await;
        rx.await.unwrap_or_else(|_| Err(TransitionError::ShuttingDown("the agent".into())))
    }

    /// Applies a freshly loaded container set, or records why loading it failed (nothing changes then).
    pub async fn reload(&self, set: Result<ContainerSet, String>) {
        let (reply, rx) = oneshot::channel();
        let _ = self.tx.send(Command::Reload { set, reply }).await;
        let _ = rx.await;
    }

    /// Stops managing; containers keep running and are adopted by the next agent.
    pub async fn shutdown(&self) {
        let (reply, rx) = oneshot::channel();
        let _ = self.tx.send(Command::Shutdown { reply }).await;
        let _ = rx.await;
    }
}

struct Agent {
    deps: Arc<MachineDeps>,
    set: ContainerSet,
    machines: BTreeMap<String, MachineHandle>,
    config_error: Option<String>,
    /// From the latest `check_governors` (at every load and every `GOVERNOR_CHECK`), shown in status.
    warnings: Vec<String>,
    /// Whether a `Purge` is already on its way for an orphan spared for being young.
    purge_due: bool,
    /// Weak, so the agent's own timers do not keep it alive once every handle is gone.
    inbox: mpsc::WeakSender<Command>,
    /// Owns every task the agent starts (its machines' supervisors, its timers, the answers it
    /// gathers off its loop): they end with the agent, none is left detached.
    tasks: JoinSet<()>,
}

/// Starts the agent with an initial container set. Containers labelled for this node but declared
/// nowhere are purged (when the set says so) once older than `docker.purge_grace`: a container seconds
/// old may be in the middle of being made by someone else, such as the previous agent during a handover.
pub async fn start(deps: Arc<MachineDeps>, set: ContainerSet) -> AgentHandle {
    let (tx, rx) = mpsc::channel(1024);
    let handle = AgentHandle { tx: tx.clone(), node: deps.node.clone() };
    let inbox = tx.downgrade();
    let mut tasks = JoinSet::new();
    tasks.spawn(recheck_governors(inbox.clone()));
    tasks.spawn(pump_runtime_events(deps.clone(), tx));
    let mut agent = Agent {
        deps,
        set: ContainerSet::default(),
        machines: BTreeMap::new(),
        config_error: None,
        warnings: Vec::new(),
        purge_due: false,
        inbox,
        tasks,
    };
    agent.apply(set).await;
    tokio::spawn(agent.run(rx));
    handle
}

impl Agent {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        while let Some(cmd) = rx.recv().await {
            while self.tasks.try_join_next().is_some() {}
            match cmd {
                // Answered off the loop: the agent routes, and never waits on a machine, which may be
                // busy (an operator's `update` waits for the fleet's mark to be deleted, say).
                Command::Status { container, reply } => {
                    let handles: Vec<MachineHandle> =
                        self.machines.values().filter(|m| container.as_ref().is_none_or(|c| *c == m.name)).cloned().collect();
                    let mut warnings = self.deps.conditions.list();
                    warnings.extend(self.warnings.iter().cloned());
                    let (node, config_error) = (self.deps.node.clone(), self.config_error.clone());
                    self.tasks.spawn(async move {
                        let machines = join_all(handles.iter().map(|m| m.status())).await.into_iter().flatten().collect();
                        let _ = reply.send(NodeStatus { node, machines, config_error, warnings });
                    });
                }
                Command::Transition { container, transition, reply } => match self.machines.get(&container).cloned() {
                    Some(m) => {
                        self.tasks.spawn(async move {
                            let _ = reply.send(m.request(transition).await);
                        });
                    }
                    None => {
                        let _ = reply.send(Err(TransitionError::UnknownContainer { container, node: self.deps.node.clone() }));
                    }
                },
                Command::Reload { set, reply } => {
                    match set {
                        Ok(set) => {
                            self.config_error = None;
                            self.apply(set).await;
                        }
                        Err(e) => {
                            tracing::error!(errors = %e, "config refused; the running set is unchanged");
                            self.publish_refusal(&e);
                            self.config_error = Some(e);
                        }
                    }
                    let _ = reply.send(());
                }
                Command::RuntimeEvent(event) => {
                    if let Some(m) = self.machines.get(&event.name) {
                        m.send(Input::Runtime(event)).await;
                    }
                }
                Command::RuntimeReconnected => {
                    for m in self.machines.values() {
                        m.send(Input::Resync).await;
                    }
                    self.purge_orphans().await;
                }
                Command::Purge => {
                    self.purge_due = false;
                    self.purge_orphans().await;
                }
                Command::CheckGovernors => self.check_governors(),
                Command::Warnings(warnings) => {
                    for new in warnings.iter().filter(|w| !self.warnings.contains(w)) {
                        tracing::warn!("{new}");
                    }
                    self.warnings = warnings;
                }
                Command::Shutdown { reply } => {
                    join_all(self.machines.values().map(|m| m.shutdown(false))).await;
                    // Every slot the machines let go of is released before the agent exits, and what
                    // they handed off (a rollback's record for the fleet) is given the same time.
                    self.deps.slots.settle(SHUTDOWN_RELEASES).await;
                    self.deps.background.close();
                    if tokio::time::timeout(SHUTDOWN_RELEASES, self.deps.background.wait()).await.is_err() {
                        tracing::warn!(left = self.deps.background.len(), "work handed off by machines did not finish before shutdown");
                    }
                    let _ = reply.send(());
                    return;
                }
            }
        }
    }

    /// A refused config in the event stream (`hoist watch`, and NATS for a fleet), in the transition
    /// shape the machines' own error events use, from the agent itself (machine `hoist`) rather than
    /// one container's machine.
    fn publish_refusal(&self, errors: &str) {
        let event = TransitionEvent {
            detail: Some(errors.to_string()),
            ..TransitionEvent::now(&self.deps.node, &self.deps.node, "hoist", "config_refused", "", "")
        };
        // Through the outbox: the agent's loop routes and never waits on the backend.
        self.deps.outbox.send(event);
    }

    /// Moves from the current set to `set`.
    async fn apply(&mut self, set: ContainerSet) {
        let existing = match self.deps.runtime.list(&self.deps.node).await {
            Ok(list) => list,
            Err(e) => {
                tracing::error!(error = %e, "cannot list containers; machines will find their containers as events arrive");
                Vec::new()
            }
        };
        let mut by_name: HashMap<String, Vec<ContainerInfo>> = HashMap::new();
        for c in existing {
            if let Some(name) = c.label(LABEL_NAME) {
                by_name.entry(name.to_string()).or_default().push(c);
            }
        }
        let present: BTreeMap<&String, &ContainerConfig> = set.containers.iter().filter(|(_, c)| c.ensure == Ensure::Present).collect();

        // Gone from the config (or now `ensure: absent`): stop managing, and remove when purging.
        let gone: Vec<String> = self.machines.keys().filter(|n| !present.contains_key(n)).cloned().collect();
        for name in gone {
            let absent = set.containers.get(&name).is_some_and(|c| c.ensure == Ensure::Absent);
            let machine = self.machines.remove(&name).expect("listed above");
            machine.shutdown(set.purge || absent).await;
            by_name.remove(&name);
        }
        for (name, cfg) in present {
            match self.machines.get(name) {
                Some(m) => {
                    if self.set.containers.get(name) != Some(cfg) {
                        m.send(Input::Reconfigure(Box::new(cfg.clone()))).await;
                    }
                }
                None => {
                    // A preflight the agent died in the middle of: no machine of this name ran yet.
                    for c in by_name.remove(&format!("{name}.{}", crate::preflight::SUFFIX)).unwrap_or_default() {
                        self.remove_container(&c, "left over from a preflight").await;
                    }
                    let candidates = by_name.remove(name).unwrap_or_default();
                    let handle = machine::spawn(cfg.clone(), self.deps.clone(), candidates, &mut self.tasks).await;
                    self.machines.insert(name.clone(), handle);
                }
            }
        }
        // Declared absent but never managed by this agent run: remove whatever is left of it.
        for (name, _) in set.containers.iter().filter(|(_, c)| c.ensure == Ensure::Absent) {
            for c in by_name.remove(name).unwrap_or_default() {
                self.remove_container(&c, "ensure: absent").await;
            }
        }
        self.set = set;
        self.check_governors();
        self.purge_orphans().await;
    }

    /// Checks, off the agent's loop, the governors the containers use: missing ones (every update
    /// would fail), and ones whose slots expire before an update can finish (a Choria governor lease
    /// has no keepalive, so a slot that expires mid-update lets the next node go while this one is
    /// still down). The answer comes back as `Command::Warnings`.
    fn check_governors(&mut self) {
        let names: BTreeSet<String> = self
            .set
            .containers
            .values()
            .filter(|c| c.ensure == Ensure::Present)
            .flat_map(|c| [&c.restart_governor, &c.update_governor])
            .flatten()
            .cloned()
            .collect();
        let (governor, deadline, inbox) = (self.deps.governor.clone(), self.deps.rollout.healthy_deadline, self.inbox.clone());
        self.tasks.spawn(async move {
            let mut warnings = Vec::new();
            for name in names {
                warnings.push(match governor.view(&name).await {
                    Err(e) => format!("governor {name} is not usable: {e}"),
                    Ok(info) if info.expire < deadline => format!(
                        "governor {name}'s slots expire after {}, before an update may finish (pull, start and rollout.healthy_deadline {}): a slow update can lose its slot and let another node start; raise its expiry",
                        humantime::format_duration(info.expire),
                        humantime::format_duration(deadline)
                    ),
                    Ok(_) => continue,
                });
            }
            if let Some(tx) = inbox.upgrade() {
                let _ = tx.send(Command::Warnings(warnings)).await;
            }
        });
    }

    /// Removes containers labelled for this node that no machine manages, when purge is on.
    async fn purge_orphans(&mut self) {
        if !self.set.purge {
            return;
        }
        let Ok(list) = self.deps.runtime.list(&self.deps.node).await else { return };
        let grace = i64::try_from(self.deps.docker.purge_grace.as_secs()).unwrap_or(i64::MAX);
        let mut next_look: Option<i64> = None;
        for c in list {
            // A machine's preflight is its own, running or not: it removes it itself.
            let managed = c.label(LABEL_NAME).is_some_and(|n| {
                self.machines.contains_key(n) || crate::preflight::of(n).is_some_and(|base| self.machines.contains_key(base))
            });
            if managed {
                continue;
            }
            let age = crate::clock::unix_now() - c.created;
            if age < grace {
                tracing::info!(container = %c.container_name, id = %c.id, age_s = age, "not in the config, but too new to purge yet");
                next_look = Some(next_look.map_or(grace - age, |n| n.min(grace - age)));
                continue;
            }
            self.remove_container(&c, "purge: not in the config").await;
        }
        if let Some(wait) = next_look.filter(|_| !self.purge_due) {
            self.purge_due = true;
            let inbox = self.inbox.clone();
            self.tasks.spawn(async move {
                // A second over, as creation times are whole seconds.
                tokio::time::sleep(Duration::from_secs(wait.unsigned_abs() + 1)).await;
                if let Some(tx) = inbox.upgrade() {
                    let _ = tx.send(Command::Purge).await;
                }
            });
        }
    }

    async fn remove_container(&self, c: &ContainerInfo, why: &str) {
        tracing::info!(container = %c.container_name, id = %c.id, reason = why, "removing container");
        if c.state == RunState::Running {
            let _ = self.deps.runtime.stop(&c.id, self.deps.docker.stop_grace).await;
        }
        if let Err(e) = self.deps.runtime.remove(&c.id).await {
            tracing::warn!(container = %c.container_name, error = %e, "could not remove");
        }
    }
}

/// Governors change under a running agent (`hoist governor add`, another node's operator): keeps the
/// warnings in status current.
async fn recheck_governors(inbox: mpsc::WeakSender<Command>) {
    loop {
        tokio::time::sleep(GOVERNOR_CHECK).await;
        let Some(tx) = inbox.upgrade() else { return };
        if tx.send(Command::CheckGovernors).await.is_err() {
            return;
        }
    }
}

/// Forwards runtime events to the agent, reconnecting with backoff when the runtime goes away (a
/// Docker daemon restart) and asking every machine to re-inspect once it is back.
async fn pump_runtime_events(deps: Arc<MachineDeps>, tx: mpsc::Sender<Command>) {
    let mut retry = Duration::from_millis(250);
    let mut first = true;
    loop {
        match deps.runtime.events(&deps.node).await {
            Ok(mut events) => {
                retry = Duration::from_millis(250);
                if !first {
                    tracing::info!("reconnected to the container runtime; re-reading containers");
                    if tx.send(Command::RuntimeReconnected).await.is_err() {
                        return;
                    }
                }
                while let Some(event) = events.next().await {
                    if tx.send(Command::RuntimeEvent(event)).await.is_err() {
                        return;
                    }
                }
                tracing::warn!("runtime event stream ended; reconnecting");
            }
            Err(e) => tracing::warn!(error = %e, "runtime events unavailable; retrying"),
        }
        // Not before: an engine that was down when the agent started is also "reconnected" to.
        first = false;
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(retry).await;
        // Capped low: this is how fast containers come back after an engine restart.
        retry = (retry * 2).min(Duration::from_secs(5));
    }
}
