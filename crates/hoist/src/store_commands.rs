//! `hoist kv …` and `hoist governor …`: the coordination objects, through the local agent or (for
//! the KV on a NATS fleet) with the agent file's own NATS user, and `hoist services`, which reads the
//! registrations bucket.

use crate::{Global, agent_config, output, print, print_line};
use anyhow::Context;
use clap::Subcommand;
use futures_util::StreamExt;
use hoist_core::backend::{BucketConfig, Governor, Kv, read_all};
use hoist_core::config::BackendKind;
use hoist_core::registration::{SERVICES_BUCKET, ServiceEntry};
use hoist_core::spec::ImageVersion;
use std::time::Duration;

#[derive(Subcommand)]
pub enum KvCommand {
    /// Create a bucket, or change its settings.
    Add {
        /// The bucket's name (letters, digits, `_` and `-`).
        bucket: String,
        /// Values kept per key, the current one included.
        #[arg(long, default_value_t = 5)]
        history: u8,
        /// Entries older than this vanish, e.g. 1m.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Copies kept in a NATS cluster (default: `nats.replicas`, else one per server up to 3).
        #[arg(long)]
        replicas: Option<u8>,
    },
    /// Set KEY to VALUE (a container's tag key is checked to be a tag or a digest first).
    Put {
        /// The bucket, e.g. HOIST.
        bucket: String,
        /// The key, e.g. `container/web/tag`.
        key: String,
        /// The new value.
        value: String,
    },
    /// Print the value of KEY.
    Get {
        /// The bucket, e.g. HOIST.
        bucket: String,
        /// The key, e.g. `container/web/tag`.
        key: String,
    },
    /// Delete KEY.
    Del {
        /// The bucket, e.g. HOIST.
        bucket: String,
        /// The key, e.g. `container/web/tag`.
        key: String,
    },
    /// List buckets, or the keys of one bucket.
    Ls {
        /// This bucket's keys instead of the list of buckets.
        bucket: Option<String>,
    },
    /// Stream changes to matching keys (default: all).
    Watch {
        /// The bucket, e.g. HOIST.
        bucket: String,
        /// NATS-style key pattern: `container/*/tag`, `container/>` (default: every key).
        pattern: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum GovernorCommand {
    /// Create a governor or change its capacity and lease expiry live.
    Add {
        /// The governor's name, as containers' `restart_governor` and `update_governor` give it.
        name: String,
        /// How many holders at once, fleet-wide.
        capacity: u64,
        /// How long a slot is held at most before it is freed for another, e.g. 5m.
        #[arg(value_parser = humantime::parse_duration)]
        expire: Duration,
        /// Copies kept in a NATS cluster (default: `nats.replicas`, else one per server up to 3).
        #[arg(long)]
        replicas: Option<u8>,
    },
    /// Show capacity and the leases held.
    View {
        /// The governor's name.
        name: String,
    },
    /// Free one lease by its id.
    Evict {
        /// The governor's name.
        name: String,
        /// The lease's id, as `governor view` lists it.
        id: u64,
    },
    /// Free every lease.
    Reset {
        /// The governor's name.
        name: String,
    },
    /// Remove a governor and its leases.
    Rm {
        /// The governor's name.
        name: String,
    },
    /// List the governors.
    Ls,
}

/// The replica count the agent gives what it creates, for what an operator creates without `--replicas`.
async fn default_replicas(g: &Global) -> anyhow::Result<u8> {
    let cfg = agent_config(g)?;
    match cfg.backend {
        BackendKind::Embedded => Ok(1),
        BackendKind::Nats => Ok(crate::agent::replicas(&cfg, &crate::fleet::connect(&cfg).await?)),
    }
}

pub async fn services(g: &Global, kv: &dyn Kv, only: Option<&str>) -> anyhow::Result<()> {
    let mut found = Vec::new();
    for entry in read_all(kv, SERVICES_BUCKET).await? {
        match serde_json::from_slice::<ServiceEntry>(&entry.value) {
            Ok(service) if only.is_none_or(|s| s == service.service) => found.push((entry.key, service)),
            Ok(_) => {}
            Err(e) => tracing::debug!(key = %entry.key, error = %e, "not a service entry"),
        }
    }
    print(g.json, &found.iter().map(|(_, s)| s).collect::<Vec<_>>(), |_| output::services(&found));
    Ok(())
}

pub async fn kv(g: &Global, kv: &dyn Kv, cmd: KvCommand) -> anyhow::Result<()> {
    match cmd {
        KvCommand::Add { bucket, history, ttl, replicas } => {
            let replicas = match replicas {
                Some(n) => n,
                None => default_replicas(g).await?,
            };
            kv.create_bucket(&bucket, BucketConfig { history, ttl, replicas }).await?;
            // What the backend now holds, not what was asked for.
            let config = kv.bucket_config(&bucket).await?;
            print(g.json, &config, |c| {
                let ttl = c.ttl.map_or_else(|| "none".into(), |t| humantime::format_duration(t).to_string());
                format!("bucket {bucket}: history {}, ttl {ttl}, replicas {}\n", c.history, c.replicas)
            });
        }
        KvCommand::Put { bucket, key, value } => {
            if bucket == hoist_core::backend::HOIST_BUCKET && key.ends_with("/tag") {
                ImageVersion::parse(&value).map_err(|e| anyhow::anyhow!("refusing to write {key}: {e}"))?;
            }
            let revision = kv.put(&bucket, &key, value.as_bytes()).await?;
            print(g.json, &serde_json::json!({"revision": revision}), |_| format!("{key} = {value} (revision {revision})\n"));
        }
        KvCommand::Get { bucket, key } => {
            let entry = kv.get(&bucket, &key).await?.with_context(|| format!("no key {key} in bucket {bucket}"))?;
            print(g.json, &output::KvEntryView::from(&entry), |e| format!("{}\n", output::clean(&e.value)));
        }
        KvCommand::Del { bucket, key } => {
            kv.delete(&bucket, &key).await?;
            print(g.json, &serde_json::json!({"deleted": key}), |_| format!("deleted {key}\n"));
        }
        KvCommand::Ls { bucket: None } => {
            let buckets = kv.list_buckets().await?;
            print(g.json, &buckets, |b| output::names(b, "no buckets"));
        }
        KvCommand::Ls { bucket: Some(bucket) } => {
            let keys = kv.keys(&bucket).await?;
            print(g.json, &keys, |k| output::names(k, &format!("no keys in bucket {bucket}")));
        }
        KvCommand::Watch { bucket, pattern } => {
            let mut entries = kv.watch(&bucket, pattern.as_deref().unwrap_or(">")).await?;
            while let Some(e) = entries.next().await {
                print_line(g.json, &output::KvEntryView::from(&e), |e| {
                    format!("{} [{}] {:?} {} = {}", e.created, e.revision, e.operation, output::clean(e.key), output::clean(&e.value))
                });
            }
        }
    }
    Ok(())
}

pub async fn governor(g: &Global, gov: &dyn Governor, cmd: GovernorCommand) -> anyhow::Result<()> {
    match cmd {
        GovernorCommand::Add { name, capacity, expire, replicas } => {
            let replicas = match replicas {
                Some(n) => n,
                None => default_replicas(g).await?,
            };
            gov.add(&name, capacity, expire, replicas).await?;
            let info = gov.view(&name).await?;
            print(g.json, &info, output::governor);
        }
        GovernorCommand::View { name } => print(g.json, &gov.view(&name).await?, output::governor),
        GovernorCommand::Evict { name, id } => {
            let lease = gov.evict(&name, id).await?;
            print(g.json, &lease, |l| format!("evicted lease {} held by {}\n", l.seq, output::clean(&l.holder)));
        }
        GovernorCommand::Reset { name } => {
            gov.reset(&name).await?;
            print(g.json, &serde_json::json!({"reset": name}), |_| format!("governor {name} reset\n"));
        }
        GovernorCommand::Rm { name } => {
            gov.remove(&name).await?;
            print(g.json, &serde_json::json!({"removed": name}), |_| format!("governor {name} removed\n"));
        }
        GovernorCommand::Ls => {
            let names = gov.list().await?;
            print(g.json, &names, |n| output::names(n, "no governors"));
        }
    }
    Ok(())
}
