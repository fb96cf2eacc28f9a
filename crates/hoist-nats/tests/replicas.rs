//! What a server reports about the size of its cluster, from which hoist takes its default replica
//! count.

#[allow(dead_code)] // each test binary uses a different part of the harness
mod harness;

use harness::{Cluster, Server, connect};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_reports_how_many_servers_its_cluster_has() {
    let cluster = Cluster::start();
    // A server learns its peers as their routes form and tells its clients again each time: the count
    // reaches the cluster's size soon after the cluster forms (on a loaded CI machine, the last
    // server's client address has been seen to take more than 10 s to spread).
    let sees_all = |backend: hoist_nats::NatsBackend, what: &'static str| async move {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(45);
        while backend.cluster_size() != 3 {
            assert!(std::time::Instant::now() < deadline, "{what}: still {} after 45 s", backend.cluster_size());
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    };
    sees_all(cluster.ready_backend().await, "a client of all three").await;
    sees_all(connect(vec![cluster.nodes[1].url()]).await, "a client that knows only one server").await;
    let server = Server::start();
    assert_eq!(connect(vec![server.url()]).await.cluster_size(), 1, "a standalone server");
}
