//! The CLI's side of the control API: HTTP/1.1 over the agent's Unix socket.

use super::{ErrorReply, GovernorSettings, TransitionReply, TransitionRequest, segment};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use hoist_core::backend::{
    BackendError, BackendResult, BucketConfig, Governor, GovernorInfo, Kv, KvEntry, Lease, LeaseInfo, TransitionEvent,
};
use hoist_core::fsm::{State, Transition};
use hoist_core::status::NodeStatus;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use std::path::PathBuf;
use std::time::Duration;

/// How a request went wrong: the agent could not be reached, or it answered no.
enum Sent {
    Unreachable(BackendError),
    Refused(Refusal),
}

/// The agent refused a request, with its status and reason.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub status: StatusCode,
    pub message: String,
}

impl Refusal {
    /// The CLI's exit code for a refused transition, so scripts can tell the cases apart: 3 not allowed
    /// from the current state, 4 no such container, 5 the agent is shutting down, 2 a transition that
    /// cannot be requested (a usage error), 1 anything else.
    pub fn exit_code(&self) -> u8 {
        match self.status {
            StatusCode::CONFLICT => 3,
            StatusCode::NOT_FOUND => 4,
            StatusCode::SERVICE_UNAVAILABLE => 5,
            StatusCode::BAD_REQUEST => 2,
            _ => 1,
        }
    }
}

#[derive(Clone, Debug)]
pub struct ControlClient {
    socket: PathBuf,
}

type Response = hyper::Response<hyper::body::Incoming>;

impl ControlClient {
    pub fn new(socket: PathBuf) -> ControlClient {
        ControlClient { socket }
    }

    /// One request whose non-success answer becomes an error carrying the agent's message.
    async fn send(&self, method: Method, path: &str, body: Bytes) -> BackendResult<Response> {
        self.send_or_refusal(method, path, body).await.map_err(|e| match e {
            Sent::Unreachable(e) => e,
            Sent::Refused(refusal) if refusal.status == StatusCode::SERVICE_UNAVAILABLE => BackendError::Unavailable(refusal.message),
            Sent::Refused(refusal) => BackendError::Other(refusal.message),
        })
    }

    /// One request; a non-success answer comes back with its status, for callers that tell refusals apart.
    async fn send_or_refusal(&self, method: Method, path: &str, body: Bytes) -> Result<Response, Sent> {
        let unreachable = |e: String| Sent::Unreachable(BackendError::Unavailable(e));
        let stream = tokio::net::UnixStream::connect(&self.socket).await.map_err(|e| {
            unreachable(format!(
                "cannot reach the hoist agent at {}: {e} (is `hoist agent` running? set --socket or control.socket)",
                self.socket.display()
            ))
        })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| unreachable(e.to_string()))?;
        tokio::spawn(conn);
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "hoist")
            .header("content-type", "application/json")
            .body(Full::new(body))
            .expect("static request parts");
        let response = sender.send_request(request).await.map_err(|e| unreachable(e.to_string()))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let message = serde_json::from_slice::<ErrorReply>(&body)
            .map(|e| e.error)
            .unwrap_or_else(|_| format!("{status}: {}", String::from_utf8_lossy(&body)));
        Err(Sent::Refused(Refusal { status, message }))
    }

    async fn call<T: DeserializeOwned>(&self, method: Method, path: &str, body: Bytes) -> BackendResult<T> {
        decode(self.send(method, path, body).await?).await
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> BackendResult<T> {
        self.call(Method::GET, path, Bytes::new()).await
    }

    /// A newline-delimited JSON stream; it ends when the agent closes it.
    async fn stream<T: DeserializeOwned + Send + 'static>(&self, path: &str) -> BackendResult<BoxStream<'static, T>> {
        let body = self.send(Method::GET, path, Bytes::new()).await?.into_body();
        let lines = futures_util::stream::unfold((body, Vec::<u8>::new()), |(mut body, mut buf)| async move {
            loop {
                if let Some(end) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=end).collect();
                    return Some((line, (body, buf)));
                }
                match body.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            buf.extend_from_slice(&data);
                        }
                    }
                    _ => return None,
                }
            }
        });
        Ok(lines.filter_map(|line| async move { serde_json::from_slice(&line).ok() }).boxed())
    }

    pub async fn status(&self, container: Option<&str>) -> BackendResult<NodeStatus> {
        match container {
            Some(c) => self.get(&format!("/v1/status?container={}", segment(c))).await,
            None => self.get("/v1/status").await,
        }
    }

    /// The state the machine is in after `transition`; a refusal keeps the agent's status, which says
    /// why (`Refusal::exit_code`).
    pub async fn transition(&self, container: &str, transition: Transition) -> anyhow::Result<State> {
        let body = serde_json::to_vec(&TransitionRequest { container: container.into(), transition }).expect("serialises");
        let response = match self.send_or_refusal(Method::POST, "/v1/transition", body.into()).await {
            Ok(response) => response,
            Err(Sent::Unreachable(e)) => return Err(e.into()),
            Err(Sent::Refused(refusal)) => return Err(refusal.into()),
        };
        let bytes = response.into_body().collect().await.map_err(|e| BackendError::Unavailable(e.to_string()))?.to_bytes();
        let reply: TransitionReply =
            serde_json::from_slice(&bytes).map_err(|e| anyhow::anyhow!("unexpected answer from the agent: {e}"))?;
        Ok(reply.state)
    }

    pub async fn watch(&self) -> BackendResult<BoxStream<'static, TransitionEvent>> {
        self.stream("/v1/watch").await
    }

    pub async fn metrics(&self) -> BackendResult<String> {
        let response = self.send(Method::GET, "/metrics", Bytes::new()).await?;
        let bytes = response.into_body().collect().await.map_err(|e| BackendError::Unavailable(e.to_string()))?.to_bytes();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// A successful answer's JSON body.
async fn decode<T: DeserializeOwned>(response: Response) -> BackendResult<T> {
    let bytes = response.into_body().collect().await.map_err(|e| BackendError::Unavailable(e.to_string()))?.to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| BackendError::Other(format!("unexpected answer from the agent: {e}")))
}

fn entry_path(bucket: &str, key: &str) -> String {
    format!("/v1/kv/{}/entry/{}", segment(bucket), key.split('/').map(segment).collect::<Vec<_>>().join("/"))
}

#[async_trait]
impl Kv for ControlClient {
    async fn create_bucket(&self, bucket: &str, config: BucketConfig) -> BackendResult<()> {
        let body = serde_json::to_vec(&config).expect("serialises");
        let _: BucketConfig = self.call(Method::PUT, &format!("/v1/kv/{}", segment(bucket)), body.into()).await?;
        Ok(())
    }

    async fn bucket_config(&self, bucket: &str) -> BackendResult<BucketConfig> {
        self.get(&format!("/v1/kv/{}", segment(bucket))).await
    }

    async fn delete_bucket(&self, bucket: &str) -> BackendResult<()> {
        Err(BackendError::Other(format!(
            "deleting bucket {bucket} is not available through the hoist agent: deleting HOIST would silently stop every KV-driven update"
        )))
    }

    async fn list_buckets(&self) -> BackendResult<Vec<String>> {
        self.get("/v1/kv").await
    }

    async fn get(&self, bucket: &str, key: &str) -> BackendResult<Option<KvEntry>> {
        self.get(&entry_path(bucket, key)).await
    }

    async fn put(&self, bucket: &str, key: &str, value: &[u8]) -> BackendResult<u64> {
        self.call(Method::PUT, &entry_path(bucket, key), Bytes::copy_from_slice(value)).await
    }

    async fn update(&self, bucket: &str, key: &str, value: &[u8], last: Option<u64>) -> BackendResult<u64> {
        let expect = last.map_or_else(|| "none".to_string(), |r| r.to_string());
        let path = format!("{}?expect={expect}", entry_path(bucket, key));
        let response = self.send_or_refusal(Method::PUT, &path, Bytes::copy_from_slice(value)).await.map_err(|e| match e {
            Sent::Refused(refusal) if refusal.status == StatusCode::CONFLICT => {
                BackendError::Conflict { bucket: bucket.into(), key: key.into() }
            }
            Sent::Refused(refusal) if refusal.status == StatusCode::SERVICE_UNAVAILABLE => BackendError::Unavailable(refusal.message),
            Sent::Refused(refusal) => BackendError::Other(refusal.message),
            Sent::Unreachable(e) => e,
        })?;
        decode(response).await
    }

    async fn delete(&self, bucket: &str, key: &str) -> BackendResult<()> {
        self.call(Method::DELETE, &entry_path(bucket, key), Bytes::new()).await
    }

    async fn keys(&self, bucket: &str) -> BackendResult<Vec<String>> {
        self.get(&format!("/v1/kv/{}/keys", segment(bucket))).await
    }

    async fn watch(&self, bucket: &str, pattern: &str) -> BackendResult<BoxStream<'static, KvEntry>> {
        self.stream(&format!("/v1/kv/{}/watch?pattern={}", segment(bucket), segment(pattern))).await
    }
}

#[async_trait]
impl Governor for ControlClient {
    async fn add(&self, name: &str, capacity: u64, expire: Duration, replicas: u8) -> BackendResult<()> {
        let body = serde_json::to_vec(&GovernorSettings { capacity, expire, replicas }).expect("serialises");
        let _: GovernorInfo = self.call(Method::PUT, &format!("/v1/governors/{}", segment(name)), body.into()).await?;
        Ok(())
    }

    async fn acquire(&self, name: &str, _holder: &str, _timeout: Duration) -> BackendResult<Lease> {
        Err(BackendError::Other(format!("governor {name}: leases are taken by agents, not through the control socket")))
    }

    async fn release(&self, lease: &Lease) -> BackendResult<()> {
        self.evict(&lease.governor, lease.seq).await.map(|_| ())
    }

    async fn holds(&self, lease: &Lease) -> BackendResult<bool> {
        Ok(self.view(&lease.governor).await?.leases.iter().any(|l| l.seq == lease.seq))
    }

    async fn view(&self, name: &str) -> BackendResult<GovernorInfo> {
        self.get(&format!("/v1/governors/{}", segment(name))).await
    }

    async fn evict(&self, name: &str, seq: u64) -> BackendResult<LeaseInfo> {
        self.call(Method::DELETE, &format!("/v1/governors/{}/leases/{seq}", segment(name)), Bytes::new()).await
    }

    async fn reset(&self, name: &str) -> BackendResult<()> {
        self.call(Method::POST, &format!("/v1/governors/{}/reset", segment(name)), Bytes::new()).await
    }

    async fn remove(&self, name: &str) -> BackendResult<()> {
        self.call(Method::DELETE, &format!("/v1/governors/{}", segment(name)), Bytes::new()).await
    }

    async fn list(&self) -> BackendResult<Vec<String>> {
        self.get("/v1/governors").await
    }
}
