//! The CLI's fleet mode: `status`, `transition` and `watch` across every agent on the NATS backend,
//! talking to NATS directly (not through the local agent), so it works from any machine with the
//! agent file and credentials.

use crate::output;
use anyhow::Context;
use clap::Args;
use comfy_table::{Table, presets::NOTHING};
use hoist_core::backend::{Events, Kv};
use hoist_core::config::{AgentConfig, BackendKind};
use hoist_core::fleet::{self, Filter, FleetAnswer, FleetRequest, Operation};
use hoist_core::fleet_auth::read_seed;
use hoist_core::presence::{self, NODES_BUCKET, NodeSeen, PRESENCE_INTERVAL};
use hoist_nats::NatsBackend;
use nkeys::KeyPairType;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

#[derive(Args, Debug, Default)]
pub struct FleetArgs {
    /// Ask every agent of the fleet (NATS backend) instead of this node's agent.
    #[arg(long)]
    pub fleet: bool,
    /// Only these nodes (implies --fleet); repeatable.
    #[arg(long = "node", value_name = "NODE")]
    pub nodes: Vec<String>,
    /// Only nodes with this fact, e.g. `role=web` or `networking.ip=10.0.0.1` (implies --fleet); repeatable.
    #[arg(long = "fact", value_name = "PATH=VALUE", value_parser = parse_fact)]
    pub facts: Vec<(String, String)>,
    /// How long to wait for answers from nodes that have not answered yet.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// The operator key (seed file from `hoist key new`) to sign fleet requests with; default:
    /// `fleet.key` from the agent file.
    #[arg(long, env = "HOIST_KEY", value_name = "FILE")]
    pub key: Option<PathBuf>,
}

impl FleetArgs {
    pub fn wanted(&self) -> bool {
        self.fleet || !self.nodes.is_empty() || !self.facts.is_empty()
    }

    fn filter(&self, container: Option<&str>) -> Filter {
        Filter { nodes: self.nodes.clone(), containers: container.map(str::to_string).into_iter().collect(), facts: self.facts.clone() }
    }
}

fn parse_fact(s: &str) -> Result<(String, String), String> {
    let (path, value) = s.split_once('=').ok_or_else(|| format!("{s:?} is not PATH=VALUE"))?;
    Ok((path.trim_start_matches("facts.").to_string(), value.to_string()))
}

pub async fn connect(cfg: &AgentConfig) -> anyhow::Result<NatsBackend> {
    anyhow::ensure!(
        cfg.backend == BackendKind::Nats,
        "fleet commands need `backend: nats` in {} (this node runs alone on the embedded store)",
        cfg.path.as_ref().map_or_else(|| "the agent file".into(), |p| p.display().to_string())
    );
    NatsBackend::connect(crate::agent::nats_options(cfg)).await.context("connecting to NATS")
}

pub async fn ask(cfg: &AgentConfig, args: &FleetArgs, container: Option<&str>, operation: Operation) -> anyhow::Result<FleetAnswer> {
    // Without a key the request goes unsigned, which only agents with fleet.allow_unsigned take;
    // the others answer how to set one up.
    let key = match args.key.as_ref().or(cfg.fleet.key.as_ref()) {
        Some(path) => {
            Some(read_seed(path, KeyPairType::User).map_err(|e| anyhow::anyhow!("the operator key (--key, HOIST_KEY or fleet.key): {e}"))?)
        }
        None => None,
    };
    let nats = connect(cfg).await?;
    let request = FleetRequest { filter: args.filter(container), operation };
    let answer = fleet::ask(&nats, &nats, &request, key.as_ref(), args.timeout).await?;
    // A refused publish reaches no agent and shows only as silence: say so instead.
    if let Some(refusal) = nats.last_refusal() {
        anyhow::bail!("{}", refused_by_nats(cfg, &refusal));
    }
    Ok(answer)
}

/// What to tell an operator whose NATS user may not do what they asked.
pub fn refused_by_nats(cfg: &AgentConfig, refusal: &str) -> String {
    let file = cfg.path.as_ref().map_or_else(|| "the agent file".into(), |p| p.display().to_string());
    format!("NATS refused it: {refusal}; the NATS user of {file} does not have that permission (see \"Securing a fleet\" in the README)")
}

/// Whether the answer should fail the command: a node missing or refusing, or an answer that could
/// not be believed.
pub fn incomplete(answer: &FleetAnswer) -> bool {
    !answer.missing.is_empty() || !answer.untrusted.is_empty() || answer.replies.iter().any(|r| r.refused.is_some())
}

/// The status table of every node that answered, the summaries across them, and who did not answer.
pub fn render(answer: &FleetAnswer) -> String {
    let nodes: Vec<_> = answer.replies.iter().filter(|r| r.refused.is_none()).map(|r| r.status.clone()).collect();
    let mut out = output::status(&nodes);
    for r in &answer.replies {
        for t in &r.transitions {
            match (&t.state, &t.error) {
                (Some(state), _) => out.push_str(&format!("{} {}: → {state}\n", r.node, t.container)),
                (None, Some(e)) => out.push_str(&format!("{} {}: refused: {e}\n", r.node, t.container)),
                (None, None) => {}
            }
        }
    }
    for r in &answer.replies {
        if let Some(reason) = &r.refused {
            out.push_str(&format!("{} refused: {reason}\n", r.node));
        }
    }
    for u in &answer.untrusted {
        out.push_str(&format!("not counted, from {}: {}\n", u.node, u.reason));
    }
    out.push_str(&format!("\n{} node(s) answered", answer.replies.len()));
    let refused = answer.replies.iter().filter(|r| r.refused.is_some()).count();
    if refused > 0 {
        out.push_str(&format!(", {refused} refused"));
    }
    if answer.missing.is_empty() {
        out.push('\n');
    } else {
        out.push_str(&format!(", {} did not:\n", answer.missing.len()));
        for m in &answer.missing {
            if m.alive {
                out.push_str(&format!("  {} did not answer in time (alive, last seen {})\n", m.node, when(m.last_seen)));
            } else {
                out.push_str(&format!("  {} missing since {}\n", m.node, when(m.last_seen)));
            }
        }
    }
    out
}

/// `2026-12-01T10:31:02Z (3m12s ago)`.
pub fn when(t: SystemTime) -> String {
    let ago = SystemTime::now().duration_since(t).unwrap_or_default();
    let ago = humantime::format_duration(Duration::from_secs(ago.as_secs())).to_string().replace(' ', "");
    format!("{} ({ago} ago)", humantime::format_rfc3339_seconds(t))
}

/// Every node `HOIST_NODES` remembers.
pub async fn nodes(cfg: &AgentConfig) -> anyhow::Result<Vec<NodeSeen>> {
    let nats = connect(cfg).await?;
    let now = SystemTime::now();
    Ok(presence::announced(&nats).await?.iter().map(|a| a.seen(now)).collect())
}

pub fn render_nodes(nodes: &[NodeSeen]) -> String {
    if nodes.is_empty() {
        return format!("no nodes have announced themselves in {NODES_BUCKET}\n");
    }
    let mut t = Table::new();
    t.load_style(NOTHING).set_header(vec!["NODE", "LAST SEEN", "ALIVE"]);
    for n in nodes {
        t.add_row(vec![n.node.clone(), when(n.last_seen), if n.alive { "yes" } else { "no" }.to_string()]);
    }
    format!("{t}\n")
}

/// Removes a dead node's entry. A live one is refused: its agent would announce it again at once.
pub async fn forget(cfg: &AgentConfig, node: &str) -> anyhow::Result<NodeSeen> {
    let nats = connect(cfg).await?;
    let now = SystemTime::now();
    let seen = presence::announcement(&nats, node)
        .await?
        .with_context(|| format!("no node named {node:?} is remembered in {NODES_BUCKET} (see `hoist node ls`)"))?
        .seen(now);
    anyhow::ensure!(
        !seen.alive,
        "node {node} is alive (last seen {}): its agent would announce it again within {}; stop that agent first",
        when(seen.last_seen),
        humantime::format_duration(PRESENCE_INTERVAL)
    );
    nats.delete(NODES_BUCKET, node).await?;
    Ok(seen)
}

/// Transition events from every node.
pub async fn watch(cfg: &AgentConfig) -> anyhow::Result<futures_util::stream::BoxStream<'static, hoist_core::backend::TransitionEvent>> {
    Ok(connect(cfg).await?.subscribe().await?)
}
