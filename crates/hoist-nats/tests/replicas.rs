//! What a server reports about the size of its cluster, from which hoist takes its default replica
//! count.

#[allow(dead_code)] // each test binary uses a different part of the harness
mod harness;

use harness::{Cluster, Server, connect};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_reports_how_many_servers_its_cluster_has() {
    let cluster = Cluster::start();
    assert_eq!(cluster.ready_backend().await.cluster_size(), 3, "a client of all three");
    assert_eq!(connect(vec![cluster.nodes[1].url()]).await.cluster_size(), 3, "a client that knows only one server");
    let server = Server::start();
    assert_eq!(connect(vec![server.url()]).await.cluster_size(), 1, "a standalone server");
}
