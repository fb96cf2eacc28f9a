//! Governors: named counting semaphores whose leases expire, with Choria's semantics. Each governor
//! is one record holding its settings and leases, so every change is a single small write.

use crate::{EmbeddedStore, Fail, Inner, names, now_ms};
use async_trait::async_trait;
use hoist_core::backend::{BackendError, BackendResult, Governor, GovernorInfo, Lease, LeaseInfo, validate_bucket};
use redb::{ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio::time::Instant;

/// Governor name → JSON `State`.
const GOVERNORS: TableDefinition<&str, &[u8]> = TableDefinition::new("governors");

#[derive(Serialize, Deserialize)]
struct State {
    capacity: u64,
    /// Lease lifetime in milliseconds; 0 means leases never expire.
    expire_ms: u64,
    replicas: u8,
    /// Never reused, like a stream sequence, so a stale lease cannot release a newer one.
    next_seq: u64,
    /// Oldest first.
    leases: Vec<LeaseInfo>,
}

impl State {
    fn expires_ms(&self, lease: &LeaseInfo) -> Option<u64> {
        (self.expire_ms > 0).then(|| lease.taken_ms.saturating_add(self.expire_ms))
    }

    fn live(&self, lease: &LeaseInfo, now: u64) -> bool {
        self.expires_ms(lease).is_none_or(|at| at > now)
    }

    fn drop_expired(&mut self, now: u64) {
        let leases = std::mem::take(&mut self.leases);
        self.leases = leases.into_iter().filter(|l| self.live(l, now)).collect();
    }

    fn take_lease(&mut self, seq: u64) -> Option<LeaseInfo> {
        let index = self.leases.iter().position(|l| l.seq == seq)?;
        Some(self.leases.remove(index))
    }
}

enum Attempt {
    Taken(Lease),
    /// Full; the earliest lease expires after this long, if any can.
    Full(Option<Duration>),
}

pub(crate) fn create_tables(txn: &WriteTransaction) -> Result<(), Fail> {
    txn.open_table(GOVERNORS)?;
    Ok(())
}

fn load(table: &impl ReadableTable<&'static str, &'static [u8]>, name: &str) -> Result<Option<State>, Fail> {
    Ok(table.get(name)?.map(|raw| serde_json::from_slice(raw.value())).transpose()?)
}

fn read(inner: &Inner, name: &str) -> Result<Option<State>, Fail> {
    load(&inner.begin_read()?.open_table(GOVERNORS)?, name)
}

/// Changes an existing governor, expired leases already gone, in one transaction.
fn update<T>(inner: &Inner, name: &str, change: impl FnOnce(&mut State) -> Result<T, Fail>) -> Result<T, Fail> {
    inner.write(|txn| {
        let mut table = txn.open_table(GOVERNORS)?;
        let mut state = load(&table, name)?.ok_or_else(|| BackendError::NoGovernor(name.into()))?;
        state.drop_expired(now_ms());
        let out = change(&mut state)?;
        table.insert(name, serde_json::to_vec(&state)?.as_slice())?;
        Ok(out)
    })
}

fn no_lease(name: &str, seq: u64) -> BackendError {
    BackendError::NoLease { governor: name.into(), seq }
}

impl EmbeddedStore {
    fn slot_freed(&self) {
        self.inner.slot_freed.notify_waiters();
    }
}

#[async_trait]
impl Governor for EmbeddedStore {
    async fn add(&self, name: &str, capacity: u64, expire: Duration, replicas: u8) -> BackendResult<()> {
        validate_bucket(name)?;
        if capacity == 0 {
            return Err(BackendError::Invalid { what: "capacity", value: "0".into(), reason: "allow at least one holder".into() });
        }
        let name = name.to_owned();
        self.run(move |inner| {
            inner.write(|txn| {
                let mut table = txn.open_table(GOVERNORS)?;
                let mut state = load(&table, &name)?.unwrap_or(State { capacity, expire_ms: 0, replicas, next_seq: 1, leases: Vec::new() });
                state.capacity = capacity;
                state.expire_ms = expire.as_millis() as u64;
                state.replicas = replicas;
                state.drop_expired(now_ms());
                // As nats-server does when a stream's message limit drops: the oldest go first.
                let excess = state.leases.len().saturating_sub(capacity as usize);
                state.leases.drain(..excess);
                table.insert(name.as_str(), serde_json::to_vec(&state)?.as_slice())?;
                Ok(())
            })
        })
        .await?;
        self.slot_freed();
        Ok(())
    }

    async fn acquire(&self, name: &str, holder: &str, timeout: Duration) -> BackendResult<Lease> {
        validate_bucket(name)?;
        let deadline = Instant::now() + timeout;
        loop {
            // Registered before looking, so a slot freed while we look still wakes us.
            let freed = self.inner.slot_freed.notified();
            let mut freed = std::pin::pin!(freed);
            freed.as_mut().enable();

            let (governor, holder) = (name.to_owned(), holder.to_owned());
            let attempt = self
                .run(move |inner| {
                    update(inner, &governor, |state| {
                        let now = now_ms();
                        if (state.leases.len() as u64) < state.capacity {
                            let seq = state.next_seq;
                            state.next_seq += 1;
                            state.leases.push(LeaseInfo { seq, holder, taken_ms: now });
                            return Ok(Attempt::Taken(Lease { governor: governor.clone(), seq }));
                        }
                        let earliest = state.leases.iter().filter_map(|l| state.expires_ms(l)).min();
                        Ok(Attempt::Full(earliest.map(|at| Duration::from_millis(at.saturating_sub(now) + 1))))
                    })
                })
                .await?;
            let expiry = match attempt {
                Attempt::Taken(lease) => return Ok(lease),
                Attempt::Full(expiry) => expiry,
            };
            let lease_expired = async {
                match expiry {
                    Some(after) => tokio::time::sleep(after).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = freed => {}
                _ = lease_expired => {}
                _ = tokio::time::sleep_until(deadline) => return Err(BackendError::GovernorTimeout(timeout, name.into())),
            }
        }
    }

    async fn release(&self, lease: &Lease) -> BackendResult<()> {
        let Lease { governor, seq } = lease.clone();
        self.run(move |inner| match update(inner, &governor, |state| Ok(state.take_lease(seq))) {
            Ok(Some(_)) => Ok(()),
            Ok(None) | Err(Fail::Backend(BackendError::NoGovernor(_))) => Err(no_lease(&governor, seq).into()),
            Err(e) => Err(e),
        })
        .await?;
        self.slot_freed();
        Ok(())
    }

    async fn holds(&self, lease: &Lease) -> BackendResult<bool> {
        let Lease { governor, seq } = lease.clone();
        self.run(move |inner| {
            let now = now_ms();
            Ok(read(inner, &governor)?.is_some_and(|state| state.leases.iter().any(|l| l.seq == seq && state.live(l, now))))
        })
        .await
    }

    async fn view(&self, name: &str) -> BackendResult<GovernorInfo> {
        validate_bucket(name)?;
        let name = name.to_owned();
        self.run(move |inner| {
            let mut state = read(inner, &name)?.ok_or_else(|| BackendError::NoGovernor(name.clone()))?;
            state.drop_expired(now_ms());
            Ok(GovernorInfo {
                name,
                capacity: state.capacity,
                expire: Duration::from_millis(state.expire_ms),
                replicas: state.replicas,
                leases: state.leases,
            })
        })
        .await
    }

    async fn evict(&self, name: &str, seq: u64) -> BackendResult<LeaseInfo> {
        validate_bucket(name)?;
        let name = name.to_owned();
        let evicted =
            self.run(move |inner| update(inner, &name, |state| state.take_lease(seq).ok_or_else(|| no_lease(&name, seq).into()))).await?;
        self.slot_freed();
        Ok(evicted)
    }

    async fn reset(&self, name: &str) -> BackendResult<()> {
        validate_bucket(name)?;
        let name = name.to_owned();
        self.run(move |inner| {
            update(inner, &name, |state| {
                state.leases.clear();
                Ok(())
            })
        })
        .await?;
        self.slot_freed();
        Ok(())
    }

    async fn remove(&self, name: &str) -> BackendResult<()> {
        validate_bucket(name)?;
        let name = name.to_owned();
        self.run(move |inner| {
            inner.write(|txn| match txn.open_table(GOVERNORS)?.remove(name.as_str())? {
                Some(_) => Ok(()),
                None => Err(BackendError::NoGovernor(name.clone()).into()),
            })
        })
        .await?;
        // Waiters look again and find the governor gone.
        self.slot_freed();
        Ok(())
    }

    async fn list(&self) -> BackendResult<Vec<String>> {
        self.run(|inner| names(inner, GOVERNORS)).await
    }
}
