//! `hoist release`: pin a container's fleet to the digest a tag names now (`hoist_core::release`),
//! show the recorded release, or abort it.

use crate::kv_access::KvAccess;
use crate::output;
use clap::{Args, Subcommand};
use hoist_core::backend::{HOIST_BUCKET, tag_key};
use hoist_core::clock::unix_now_ms;
use hoist_core::config::{AgentConfig, load_containers};
use hoist_core::release::{self, ReleaseRecord, ReleaseState};
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
}

#[derive(Subcommand)]
enum ReleaseAction {
    /// Print the recorded release of a container.
    Show {
        /// The container, by its name in the data files.
        container: String,
    },
    /// Abort a release: the tag key goes back to what it said before; nodes that run the release go
    /// back under their governors, nodes it had not reached are left alone.
    Abort {
        /// The container, by its name in the data files.
        container: String,
    },
}

pub async fn run(cfg: &AgentConfig, access: &KvAccess, args: ReleaseArgs, json: bool) -> anyhow::Result<()> {
    let kv = access.kv();
    let record = match args.action {
        Some(ReleaseAction::Show { container }) => {
            release::current(kv, &container).await?.ok_or_else(|| release::ReleaseError::NoRelease(container.clone()))?.0
        }
        Some(ReleaseAction::Abort { container }) => release::abort(kv, &container, &who(cfg), unix_now_ms()).await?,
        None => {
            let (container, tag) = (args.container.expect("required by clap"), args.tag.expect("required by clap"));
            make(cfg, kv, &container, &tag, args.image).await?
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
    let previous = kv.get(HOIST_BUCKET, &tag_key(container)).await?.map(|e| e.value_str());
    // What ran before: the tag key's version, else the data files'; informational, so a failure to
    // resolve it is no reason not to release.
    let before = previous.clone().or_else(|| declared.map(|(_, tag)| tag));
    let previous_digest = match before {
        Some(version) => resolve(&version).await.ok(),
        None => None,
    };
    let record = ReleaseRecord {
        container: container.into(),
        image,
        tag: tag.into(),
        digest,
        previous,
        previous_digest,
        state: ReleaseState::Rolling,
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

fn describe(r: &ReleaseRecord) -> String {
    let at = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(r.at_ms));
    let state = match r.state {
        ReleaseState::Rolling => "rolling out",
        ReleaseState::Aborted => "aborted",
    };
    let before = match (&r.previous, &r.previous_digest) {
        (Some(value), Some(digest)) if value != digest => format!("{value} ({digest})"),
        (Some(value), _) => value.clone(),
        (None, Some(digest)) => format!("the data files' tag ({digest})"),
        (None, None) => "the data files' tag".into(),
    };
    output::clean_lines(&format!(
        "release of {}: {}:{} = {}\n  {state}, by {} at {at}\n  before: {before}\n",
        r.container, r.image, r.tag, r.digest, r.by
    ))
}
