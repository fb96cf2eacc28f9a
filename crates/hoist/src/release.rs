//! `hoist release`: move a container's fleet, wave by wave, to the digest a tag names now
//! (`hoist_core::release`); show, abort or resume the recorded release.

use crate::kv_access::KvAccess;
use crate::output;
use clap::{Args, Subcommand};
use hoist_core::backend::{HOIST_BUCKET, tag_key};
use hoist_core::clock::unix_now_ms;
use hoist_core::config::{AgentConfig, load_containers};
use hoist_core::release::{self, Budget, Policy, ReleaseRecord, ReleaseState, WaveSize};
use hoist_core::spec::ImageVersion;
use hoist_docker::DockerRuntime;

#[derive(Args)]
#[command(subcommand_negates_reqs = true)]
pub struct ReleaseArgs {
    #[command(subcommand)]
    action: Option<ReleaseAction>,
    /// The container to release, by its name in the data files (e.g. `web`).
    #[arg(required = true)]
    container: Option<String>,
    /// The tag to release; it is resolved to its registry digest once, and every node runs that digest.
    #[arg(required = true)]
    tag: Option<String>,
    /// The image repository, when this machine's data files do not declare the container.
    #[arg(long, value_name = "REPO")]
    image: Option<String>,
    /// Canary waves: the nodes that have it once each wave has started, as counts or shares of the
    /// fleet, e.g. `1,10%,50%,100%` (default: all at once, still one at a time per governor).
    #[arg(long, value_name = "SIZES", value_delimiter = ',', value_parser = WaveSize::parse)]
    waves: Vec<WaveSize>,
    /// How long a wave must stay healthy, with no failure, before the next starts (e.g. 5m).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "0s")]
    bake: std::time::Duration,
    /// Failures allowed before the release is aborted: a count (`2`), or a share of the nodes that
    /// finished (`10%`, once --min-sample have). Default 0: the first failure aborts.
    #[arg(long, value_name = "N|N%", value_parser = parse_budget, default_value = "0")]
    budget: (usize, Option<u8>),
    /// For a share budget: how many nodes must have finished before the share counts.
    #[arg(long, value_name = "N", default_value_t = 3)]
    min_sample: usize,
}

#[derive(Subcommand)]
enum ReleaseAction {
    /// Print the recorded release of a container.
    Show {
        /// The container, by its name in the data files.
        container: String,
    },
    /// Abort a release: nodes that run it go back under their governors to what the tag key said
    /// before; nodes it had not reached are left alone.
    Abort {
        /// The container, by its name in the data files.
        container: String,
    },
    /// Resume an aborted release where it stopped, its failures forgotten.
    Resume {
        /// The container, by its name in the data files.
        container: String,
    },
}

/// `2` (failures) or `10%` (of the nodes that finished).
fn parse_budget(text: &str) -> Result<(usize, Option<u8>), String> {
    match text.strip_suffix('%') {
        Some(p) => match p.parse::<u8>() {
            Ok(p) if p <= 100 => Ok((usize::MAX, Some(p))),
            _ => Err(format!("{text:?}: a share is 0% to 100%")),
        },
        None => text.parse().map(|n| (n, None)).map_err(|_| format!("{text:?}: a number of failures, or a share such as 10%")),
    }
}

pub async fn run(cfg: &AgentConfig, access: &KvAccess, args: ReleaseArgs, json: bool) -> anyhow::Result<()> {
    let kv = access.kv();
    let record = match args.action {
        Some(ReleaseAction::Show { container }) => {
            release::current(kv, &container).await?.ok_or_else(|| release::ReleaseError::NoRelease(container.clone()))?.0
        }
        Some(ReleaseAction::Abort { container }) => release::abort(kv, &container, &who(cfg), unix_now_ms()).await?,
        Some(ReleaseAction::Resume { container }) => release::resume(kv, &container, &who(cfg), unix_now_ms()).await?,
        None => {
            let (container, tag) = (args.container.expect("required by clap"), args.tag.expect("required by clap"));
            let waves = if args.waves.is_empty() { Policy::default().waves } else { args.waves };
            let (failures, percent) = args.budget;
            let policy = Policy { waves, bake: args.bake, budget: Budget { failures, percent, min_sample: args.min_sample } };
            make(cfg, kv, &container, &tag, args.image, policy).await?
        }
    };
    crate::print(json, &record, describe);
    Ok(())
}

/// Resolves, records and applies a release. Nothing is written unless the tag resolved.
async fn make(
    cfg: &AgentConfig,
    kv: &dyn hoist_core::backend::Kv,
    container: &str,
    tag: &str,
    image: Option<String>,
    policy: Policy,
) -> anyhow::Result<ReleaseRecord> {
    ImageVersion::parse(tag).map_err(|e| anyhow::anyhow!("refusing to release {tag:?}: {e}"))?;
    let declared = declared(cfg, container);
    let image = match (image, &declared) {
        (Some(image), _) => image,
        (None, Some((image, _))) => image.clone(),
        (None, None) => anyhow::bail!(
            "container {container} is not declared in this machine's data files ({}); give its repository with --image",
            cfg.data.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        ),
    };
    let docker = DockerRuntime::new(cfg.docker.host.as_deref())?;
    let resolve = |version: &str| {
        let reference = reference(&image, version);
        let docker = &docker;
        async move { docker.resolve_digest(&reference).await }
    };
    let digest = resolve(tag).await.map_err(|e| anyhow::anyhow!("cannot resolve {tag} to a digest, so nothing was released: {e}"))?;
    let last = release::current(kv, container).await?.map(|(_, revision)| revision);
    let tag_entry = kv.get(HOIST_BUCKET, &tag_key(container)).await?;
    let (previous, tag_revision) = (tag_entry.as_ref().map(|e| e.value_str()), tag_entry.map(|e| e.revision));
    // What ran before: the tag key's version, else the data files'; informational, so a failure to
    // resolve it is no reason not to release.
    let before = previous.clone().or_else(|| declared.map(|(_, tag)| tag));
    let previous_digest = match before {
        Some(version) => resolve(&version).await.ok(),
        None => None,
    };
    // Planned here, from the nodes that report running the container, so the nodes need not each
    // read the fleet to do it; with none reporting, the first node to act plans.
    let id = hoist_core::machine::uuid_v4();
    let nodes = release::running(kv, container).await?;
    let plan = (!nodes.is_empty()).then(|| release::waves::plan_for(&nodes, &id));
    let record = ReleaseRecord {
        id,
        container: container.into(),
        image,
        tag: tag.into(),
        digest,
        previous,
        previous_digest,
        tag_revision,
        policy,
        plan,
        wave: 0,
        through: None,
        state: ReleaseState::Rolling,
        reason: None,
        by: who(cfg),
        at_ms: unix_now_ms(),
    };
    release::publish(kv, &record, last).await?;
    Ok(record)
}

/// The container's repository and tag in this machine's data files, if it declares it.
fn declared(cfg: &AgentConfig, container: &str) -> Option<(String, String)> {
    let set = load_containers(&cfg.data, &cfg.facts()).ok()?;
    let c = set.containers.get(container)?;
    Some((c.image.clone(), c.image_tag.to_string()))
}

/// `repo:tag`, or `repo@digest` for a digest.
fn reference(image: &str, version: &str) -> String {
    if version.starts_with("sha256:") { format!("{image}@{version}") } else { format!("{image}:{version}") }
}

/// `user@host` for the record.
fn who(cfg: &AgentConfig) -> String {
    let user = std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "unknown".into());
    let host = cfg.facts()["hostname"].as_str().unwrap_or("unknown").to_string();
    format!("{user}@{host}")
}

/// Where a release stands, in a few words: its state (and wave), and why it ended as it did.
pub fn progress(r: &ReleaseRecord) -> String {
    let state = match r.state {
        ReleaseState::Rolling => format!("rolling out, wave {} of {}", r.wave + 1, r.waves()),
        ReleaseState::Complete => "complete".into(),
        ReleaseState::Aborted => "aborted".into(),
    };
    match &r.reason {
        Some(why) => format!("{state} ({why})"),
        None => state,
    }
}

fn describe(r: &ReleaseRecord) -> String {
    let (progress, at) = (progress(r), output::rfc3339((r.at_ms / 1000) as i64));
    let before = match (&r.previous, &r.previous_digest) {
        (Some(value), Some(digest)) if value != digest => format!("{value} ({digest})"),
        (Some(value), _) => value.clone(),
        (None, Some(digest)) => format!("the data files' tag ({digest})"),
        (None, None) => "the data files' tag".into(),
    };
    output::clean_lines(&format!(
        "release of {}: {}:{} = {}\n  {progress}, by {} at {at}\n  before: {before}\n",
        r.container, r.image, r.tag, r.digest, r.by
    ))
}
