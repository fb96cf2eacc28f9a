//! Governor acquire/release throughput on both backends: capacity 1 with one sequential holder, and
//! capacity 10 with ten concurrent holders (each its own connection on NATS, as ten agents would be).

use crate::real::NatsServer;
use crate::report::Row;
use hoist_core::backend::Governor;
use hoist_nats::{NatsBackend, NatsOptions};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub async fn throughput(window: Duration) -> anyhow::Result<Vec<Row>> {
    let dir = tempfile::tempdir()?;
    let store = hoist_embedded::EmbeddedStore::open(&dir.path().join("bench.redb"))?;
    let embedded: Vec<Arc<dyn Governor>> = (0..10).map(|_| Arc::new(store.clone()) as Arc<dyn Governor>).collect();
    let mut rows = measure("embedded", &embedded, window).await?;

    let server = NatsServer::start().await?;
    let mut nats: Vec<Arc<dyn Governor>> = Vec::new();
    for i in 0..10 {
        let opts = NatsOptions { servers: vec![server.url.clone()], name: format!("hoist-bench holder {i}"), ..NatsOptions::default() };
        nats.push(Arc::new(NatsBackend::connect(opts).await?));
    }
    rows.extend(measure("nats", &nats, window).await?);
    Ok(rows)
}

/// `holders[0]` alone at capacity 1, then all of them at capacity 10.
async fn measure(backend: &str, holders: &[Arc<dyn Governor>], window: Duration) -> anyhow::Result<Vec<Row>> {
    let scenario = format!("governor {backend}");
    let mut rows = Vec::new();
    for (name, capacity, count) in [("BENCH1", 1, 1), ("BENCH10", 10, holders.len())] {
        holders[0].add(name, capacity, Duration::from_secs(60), 1).await?;
        let until = Instant::now() + window;
        let tasks: Vec<_> = holders[..count]
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let g = g.clone();
                tokio::spawn(async move {
                    let mut ops = 0u64;
                    while Instant::now() < until {
                        let lease = g.acquire(name, &format!("holder{i}"), Duration::from_secs(30)).await?;
                        g.release(&lease).await?;
                        ops += 1;
                    }
                    anyhow::Ok(ops)
                })
            })
            .collect();
        let mut total = 0;
        for t in tasks {
            total += t.await??;
        }
        let rate = total as f64 / window.as_secs_f64();
        let metric = format!("acquire+release, capacity {capacity}, {count} holder{}", if count == 1 { "" } else { "s" });
        rows.push(Row::info(&scenario, &metric, rate, "ops/s", format!("{total} cycles in {:.0} s", window.as_secs_f64())));
        holders[0].remove(name).await?;
    }
    Ok(rows)
}
