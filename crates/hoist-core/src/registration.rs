//! Service registration: a container's `register_ports` are written to the `CHORIA_SERVICES` bucket
//! while its machine is in RUN (it passed its health gate), every `registration.interval`, under the
//! key `<cluster>.<protocol>.<service>.<instance>` and in the JSON shape Choria's gossip watcher uses.
//! Leaving RUN withdraws them at once; an agent that dies stops refreshing them and the bucket's TTL
//! removes them. With `registration.ccm`, each refresh is also published on choria-io/ccm's subject
//! (`ServiceEntry::ccm_subject`), for registries that listen rather than read the bucket.

use crate::backend::{BucketConfig, Events, Kv};
use crate::config::{Registration, RegistrationConfig};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::AbortHandle;

pub const SERVICES_BUCKET: &str = "CHORIA_SERVICES";

/// The longest a withdrawal waits for the store.
const WITHDRAW_LIMIT: Duration = Duration::from_secs(5);

/// How long an entry outlives its last refresh: long enough to ride out a missed refresh or two,
/// short enough that a dead node's services vanish quickly.
pub fn services_bucket(interval: Duration, replicas: u8) -> BucketConfig {
    BucketConfig { history: 1, ttl: Some(interval * 3), replicas }
}

/// One registered endpoint, as published (Choria's JSON: the config's `ip` is `address` here).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceEntry {
    pub cluster: String,
    pub service: String,
    pub protocol: String,
    pub address: String,
    pub port: u16,
    pub priority: u32,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl ServiceEntry {
    pub fn of(r: &Registration) -> ServiceEntry {
        ServiceEntry {
            cluster: r.cluster.clone(),
            service: r.service.clone(),
            protocol: r.protocol.clone(),
            address: r.ip.clone(),
            port: r.port,
            priority: r.priority,
            annotations: r.annotations.clone(),
        }
    }

    /// `instance` is the machine's instance id, so two containers offering the same service on one
    /// node, or one container across agent restarts, never overwrite each other.
    pub fn key(&self, instance: &str) -> String {
        format!("{}.{}.{}.{instance}", self.cluster, self.protocol, self.service)
    }

    /// `choria.ccm.registration.v1.<cluster>.<protocol>.<service>.<address>.<instance>`. Cluster,
    /// protocol and service are single tokens already (checked at load); the address's dots and
    /// colons (`10.0.0.1`, `fe80::1`) would split it into several tokens, so they are written `_`.
    pub fn ccm_subject(&self, instance: &str) -> String {
        let address = self.address.replace(['.', ':'], "_");
        format!("choria.ccm.registration.v1.{}.{}.{}.{address}.{instance}", self.cluster, self.protocol, self.service)
    }
}

/// The refresh loop of one machine's registrations; `withdraw` ends it and deletes the entries.
pub struct Publisher {
    kv: Arc<dyn Kv>,
    keys: Vec<String>,
    task: AbortHandle,
}

impl Publisher {
    /// None when the container registers nothing.
    /// `events` carries the ccm publications when `settings.ccm` is on.
    pub fn start(
        kv: Arc<dyn Kv>,
        events: Arc<dyn Events>,
        registrations: &[Registration],
        instance: &str,
        settings: &RegistrationConfig,
    ) -> Option<Publisher> {
        if registrations.is_empty() {
            return None;
        }
        let entries: Vec<(String, String, Vec<u8>)> = registrations
            .iter()
            .map(ServiceEntry::of)
            .map(|e| (e.key(instance), e.ccm_subject(instance), serde_json::to_vec(&e).expect("entries serialise")))
            .collect();
        let keys = entries.iter().map(|(k, ..)| k.clone()).collect();
        let store = kv.clone();
        let (interval, ccm) = (settings.interval, settings.ccm);
        let task = tokio::spawn(async move {
            loop {
                for (key, subject, value) in &entries {
                    if let Err(e) = store.put(SERVICES_BUCKET, key, value).await {
                        tracing::warn!(%key, error = %e, "could not publish a service registration");
                    }
                    if ccm && let Err(e) = events.publish_registration(subject, value).await {
                        tracing::warn!(%subject, error = %e, "could not publish a service registration for ccm");
                    }
                }
                tokio::time::sleep(interval).await;
            }
        });
        Some(Publisher { kv, keys, task: task.abort_handle() })
    }

    /// Deletes the entries, giving up after `WITHDRAW_LIMIT` (the store may be unreachable): an entry
    /// left behind still expires with the bucket's TTL.
    pub async fn withdraw(self) {
        self.task.abort();
        let deletes = async {
            for key in &self.keys {
                if let Err(e) = self.kv.delete(SERVICES_BUCKET, key).await {
                    tracing::debug!(%key, error = %e, "could not withdraw a service registration");
                }
            }
        };
        if tokio::time::timeout(WITHDRAW_LIMIT, deletes).await.is_err() {
            tracing::debug!("withdrawing service registrations timed out; they expire with the bucket's TTL");
        }
    }
}

/// The refresh loop ends with its publisher, withdrawn or not.
impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_use_choria_field_names_and_keys() {
        let r = Registration {
            cluster: "lon".into(),
            service: "ginkgo".into(),
            protocol: "http".into(),
            ip: "192.168.1.1".into(),
            port: 8080,
            priority: 1,
            annotations: BTreeMap::new(),
        };
        let e = ServiceEntry::of(&r);
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"cluster":"lon","service":"ginkgo","protocol":"http","address":"192.168.1.1","port":8080,"priority":1}"#
        );
        assert_eq!(e.key("abc-1"), "lon.http.ginkgo.abc-1");
        assert_eq!(e.ccm_subject("abc-1"), "choria.ccm.registration.v1.lon.http.ginkgo.192_168_1_1.abc-1");
        let v6 = ServiceEntry { address: "fe80::1".into(), ..e };
        assert_eq!(v6.ccm_subject("abc-1"), "choria.ccm.registration.v1.lon.http.ginkgo.fe80__1.abc-1");
    }
}
