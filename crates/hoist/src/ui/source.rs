//! Where the web view's data comes from, chosen as the other commands choose: this node's agent
//! through its control socket on the embedded backend (or when `--socket` is given), every agent of
//! the fleet through NATS on the NATS backend.

use super::snapshot::Snapshot;
use crate::control::client::ControlClient;
use futures_util::stream::BoxStream;
use hoist_core::backend::{BackendError, BackendResult, Events, Governor, GovernorInfo, TransitionEvent};
use hoist_core::clock::unix_now_ms;
use hoist_core::config::{AgentConfig, BackendKind};
use hoist_core::fleet::{self, Filter, FleetRequest, Operation};
use hoist_core::fleet_auth::read_seed;
use hoist_nats::NatsBackend;
use nkeys::{KeyPair, KeyPairType};
use std::path::PathBuf;
use std::time::Duration;

/// How long the fleet's agents are given to answer a status request, as `hoist status --fleet`.
const FLEET_TIMEOUT: Duration = Duration::from_secs(2);
/// A snapshot that takes longer (an agent that accepts but does not answer) is reported as unavailable.
const GATHER_TIMEOUT: Duration = Duration::from_secs(10);

pub enum Source {
    Node(ControlClient),
    // Boxed: the NATS connection's handle is large, and there is one for the process.
    Fleet(Box<FleetSource>),
}

/// The fleet's NATS connection and the operator key its status requests are signed with.
pub struct FleetSource {
    nats: NatsBackend,
    key: Option<KeyPair>,
}

impl Source {
    /// The source for this agent file; on NATS, connected (and the operator key read) once, here.
    pub async fn open(cfg: &AgentConfig, socket: Option<PathBuf>) -> anyhow::Result<Source> {
        if cfg.backend == BackendKind::Nats && socket.is_none() {
            // Fleet status requests are signed like `hoist status --fleet`'s; without a key only
            // agents with fleet.allow_unsigned answer, the others say how to set one up.
            let key = match &cfg.fleet.key {
                Some(path) => Some(read_seed(path, KeyPairType::User).map_err(|e| anyhow::anyhow!("the operator key (fleet.key): {e}"))?),
                None => None,
            };
            return Ok(Source::Fleet(Box::new(FleetSource { nats: crate::fleet::connect(cfg).await?, key })));
        }
        Ok(Source::Node(ControlClient::new(socket.unwrap_or_else(|| cfg.control.socket.clone()))))
    }

    pub fn scope(&self) -> &'static str {
        match self {
            Source::Node(_) => "node",
            Source::Fleet(_) => "fleet",
        }
    }

    /// Everything the page shows now; `Err` is why the agent (or NATS) could not be asked, for the page.
    pub async fn snapshot(&self) -> Result<Snapshot, String> {
        match tokio::time::timeout(GATHER_TIMEOUT, self.gather()).await {
            Ok(result) => result,
            Err(_) => Err(format!("no answer within {GATHER_TIMEOUT:?}")),
        }
    }

    async fn gather(&self) -> Result<Snapshot, String> {
        let mut warnings = Vec::new();
        let (nodes, missing, refusals) = match self {
            Source::Node(client) => (vec![client.status(None).await.map_err(|e| e.to_string())?], Vec::new(), Vec::new()),
            Source::Fleet(fleet) => {
                let FleetSource { nats, key } = fleet.as_ref();
                let request = FleetRequest { filter: Filter::default(), operation: Operation::Status };
                let answer = fleet::ask(nats, nats, &request, key.as_ref(), FLEET_TIMEOUT).await.map_err(|e| e.to_string())?;
                if let Some(refusal) = nats.last_refusal() {
                    warnings.push(format!("NATS refused a request: {refusal}"));
                }
                let refusals: Vec<String> =
                    answer.replies.iter().filter_map(|r| r.refused.as_ref().map(|why| format!("{} refused: {why}", r.node))).collect();
                let nodes = answer.replies.into_iter().filter(|r| r.refused.is_none()).map(|r| r.status).collect();
                (nodes, answer.missing, refusals)
            }
        };
        warnings.extend(refusals);
        let governors = match self.governors().await {
            Ok(governors) => governors,
            // The containers matter more than the slots: show them and say what is missing.
            Err(e) => {
                warnings.push(format!("governors: {e}"));
                Vec::new()
            }
        };
        Ok(Snapshot::build(self.scope(), unix_now_ms(), &nodes, &governors, missing, warnings))
    }

    async fn governors(&self) -> BackendResult<Vec<GovernorInfo>> {
        let governor: &dyn Governor = match self {
            Source::Node(client) => client,
            Source::Fleet(fleet) => &fleet.nats,
        };
        let mut infos = Vec::new();
        for name in governor.list().await? {
            match governor.view(&name).await {
                Ok(info) => infos.push(info),
                // Removed since it was listed.
                Err(BackendError::NoGovernor(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(infos)
    }

    /// Transition events: this node's, or every node's.
    pub async fn events(&self) -> BackendResult<BoxStream<'static, TransitionEvent>> {
        match self {
            Source::Node(client) => client.watch().await,
            Source::Fleet(fleet) => fleet.nats.subscribe().await,
        }
    }
}
