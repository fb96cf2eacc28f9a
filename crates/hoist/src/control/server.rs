//! The agent's side of the control API.

use super::{ErrorReply, GovernorSettings, TransitionReply, TransitionRequest};
use crate::metrics;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::serve::Listener;
use futures_util::{Stream, StreamExt};
use hoist_core::agent::AgentHandle;
use hoist_core::backend::{BackendError, BucketConfig, Events, Governor, GovernorEvent, GovernorEventType, Kv};
use hoist_core::health::Conditions;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

#[derive(Clone)]
pub struct Control {
    pub agent: AgentHandle,
    pub kv: Arc<dyn Kv>,
    pub governor: Arc<dyn Governor>,
    pub events: Arc<dyn Events>,
    pub conditions: Conditions,
}

/// How long a client may take to send a request's headers, or to start its next request on a
/// kept-alive connection: a client that sends nothing is cut off instead of holding a connection.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long any request but a watch may take, its body included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once; more are closed as soon as they are accepted, so a flood of clients
/// costs neither memory nor the file descriptors the agent needs for its own work.
const MAX_CONNECTIONS: usize = 128;

/// There is no route to delete a bucket: deleting HOIST would silently stop every KV-driven update.
pub fn router(control: Control) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/transition", post(transition))
        .route("/v1/kv", get(list_buckets))
        .route("/v1/kv/{bucket}", put(create_bucket).get(bucket_config))
        .route("/v1/kv/{bucket}/keys", get(keys))
        .route("/v1/kv/{bucket}/entry/{*key}", get(kv_get).put(kv_put).delete(kv_delete))
        .route("/v1/governors", get(list_governors))
        .route("/v1/governors/{name}", put(add_governor).get(view_governor).delete(remove_governor))
        .route("/v1/governors/{name}/reset", post(reset_governor))
        .route("/v1/governors/{name}/leases/{seq}", delete(evict))
        .route("/metrics", get(metrics_text))
        .route_layer(axum::middleware::from_fn(time_limit))
        // Watches stream for as long as the client listens, so they are added after the time limit.
        .route("/v1/watch", get(watch_events))
        .route("/v1/kv/{bucket}/watch", get(watch_kv))
        .with_state(control)
}

/// Only `/metrics`, for the optional TCP listener.
pub fn metrics_router(control: Control) -> Router {
    Router::new().route("/metrics", get(metrics_text)).route_layer(axum::middleware::from_fn(time_limit)).with_state(control)
}

async fn time_limit(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError(StatusCode::REQUEST_TIMEOUT, format!("the request took longer than {REQUEST_TIMEOUT:?}")).into_response(),
    }
}

/// Serves `router` on `listener` with the limits above.
pub async fn serve(mut listener: impl Listener, router: Router) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let service = TowerToHyperService::new(router);
    // Refusals are counted and logged at most every 10 s, so a flood cannot fill the log instead.
    let (mut refused, mut last_warned) = (0u64, None::<Instant>);
    loop {
        // Accept errors (such as running out of file descriptors) are logged and retried by axum.
        let (io, _) = listener.accept().await;
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused += 1;
            if last_warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                tracing::warn!(limit = MAX_CONNECTIONS, refused, "too many control API connections; closing new ones");
                (refused, last_warned) = (0, Some(Instant::now()));
            }
            continue;
        };
        let service = service.clone();
        tokio::spawn(async move {
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(io), service);
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "control API connection ended");
            }
            drop(slot);
        });
    }
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(ErrorReply { error: self.1 })).into_response()
    }
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        let code = match e {
            BackendError::NoBucket(_) | BackendError::NoGovernor(_) | BackendError::NoLease { .. } => StatusCode::NOT_FOUND,
            BackendError::Invalid { .. } => StatusCode::BAD_REQUEST,
            BackendError::GovernorTimeout(..) => StatusCode::REQUEST_TIMEOUT,
            BackendError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            BackendError::Conflict { .. } => StatusCode::CONFLICT,
            BackendError::Other(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(code, e.to_string())
    }
}

type ApiResult<T> = Result<axum::Json<T>, ApiError>;

fn json<T>(v: T) -> ApiResult<T> {
    Ok(axum::Json(v))
}

/// Newline-delimited JSON, one value per line, for watches.
fn ndjson<T: Serialize + Send + 'static>(stream: impl Stream<Item = T> + Send + 'static) -> Response {
    let lines = stream.map(|v| {
        let mut line = serde_json::to_vec(&v).expect("events serialise");
        line.push(b'\n');
        Ok::<_, Infallible>(Bytes::from(line))
    });
    Response::builder().header("content-type", "application/x-ndjson").body(Body::from_stream(lines)).expect("static response parts")
}

#[derive(Deserialize)]
struct ContainerFilter {
    container: Option<String>,
}

async fn status(State(c): State<Control>, Query(q): Query<ContainerFilter>) -> ApiResult<hoist_core::status::NodeStatus> {
    json(c.agent.status(q.container).await)
}

async fn transition(State(c): State<Control>, axum::Json(req): axum::Json<TransitionRequest>) -> ApiResult<TransitionReply> {
    use hoist_core::fsm::TransitionError;
    match c.agent.transition(&req.container, req.transition).await {
        Ok(state) => json(TransitionReply { state }),
        Err(e) => {
            let code = match e {
                TransitionError::NotAllowed(_) => StatusCode::CONFLICT,
                TransitionError::NotRequestable(_) => StatusCode::BAD_REQUEST,
                TransitionError::UnknownContainer { .. } => StatusCode::NOT_FOUND,
                TransitionError::ShuttingDown(_) => StatusCode::SERVICE_UNAVAILABLE,
            };
            Err(ApiError(code, e.to_string()))
        }
    }
}

async fn watch_events(State(c): State<Control>) -> Result<Response, ApiError> {
    Ok(ndjson(c.events.subscribe().await?))
}

async fn list_buckets(State(c): State<Control>) -> ApiResult<Vec<String>> {
    json(c.kv.list_buckets().await?)
}

async fn create_bucket(
    State(c): State<Control>,
    Path(bucket): Path<String>,
    axum::Json(cfg): axum::Json<BucketConfig>,
) -> ApiResult<BucketConfig> {
    c.kv.create_bucket(&bucket, cfg.clone()).await?;
    json(cfg)
}

async fn bucket_config(State(c): State<Control>, Path(bucket): Path<String>) -> ApiResult<BucketConfig> {
    json(c.kv.bucket_config(&bucket).await?)
}

async fn keys(State(c): State<Control>, Path(bucket): Path<String>) -> ApiResult<Vec<String>> {
    json(c.kv.keys(&bucket).await?)
}

async fn watch_kv(
    State(c): State<Control>,
    Path(bucket): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let pattern = q.get("pattern").map_or(">", String::as_str);
    Ok(ndjson(c.kv.watch(&bucket, pattern).await?))
}

/// A missing key is `null`, not an error: only a missing bucket is.
async fn kv_get(State(c): State<Control>, Path((bucket, key)): Path<(String, String)>) -> ApiResult<Option<hoist_core::backend::KvEntry>> {
    json(c.kv.get(&bucket, &key).await?)
}

#[derive(Deserialize)]
struct WriteCondition {
    /// Compare-and-set: the revision the key must still have, or `none` for a key without a value.
    expect: Option<String>,
}

async fn kv_put(
    State(c): State<Control>,
    Path((bucket, key)): Path<(String, String)>,
    Query(q): Query<WriteCondition>,
    body: Bytes,
) -> ApiResult<u64> {
    let revision = match q.expect.as_deref() {
        None => c.kv.put(&bucket, &key, &body).await?,
        Some("none") => c.kv.update(&bucket, &key, &body, None).await?,
        Some(r) => {
            let last = r.parse().map_err(|_| ApiError(StatusCode::BAD_REQUEST, format!("expect={r:?} is neither a revision nor none")))?;
            c.kv.update(&bucket, &key, &body, Some(last)).await?
        }
    };
    json(revision)
}

async fn kv_delete(State(c): State<Control>, Path((bucket, key)): Path<(String, String)>) -> ApiResult<()> {
    json(c.kv.delete(&bucket, &key).await?)
}

async fn list_governors(State(c): State<Control>) -> ApiResult<Vec<String>> {
    json(c.governor.list().await?)
}

async fn add_governor(
    State(c): State<Control>,
    Path(name): Path<String>,
    axum::Json(s): axum::Json<GovernorSettings>,
) -> ApiResult<hoist_core::backend::GovernorInfo> {
    c.governor.add(&name, s.capacity, s.expire, s.replicas).await?;
    json(c.governor.view(&name).await?)
}

async fn view_governor(State(c): State<Control>, Path(name): Path<String>) -> ApiResult<hoist_core::backend::GovernorInfo> {
    json(c.governor.view(&name).await?)
}

async fn remove_governor(State(c): State<Control>, Path(name): Path<String>) -> ApiResult<()> {
    json(c.governor.remove(&name).await?)
}

async fn reset_governor(State(c): State<Control>, Path(name): Path<String>) -> ApiResult<()> {
    json(c.governor.reset(&name).await?)
}

/// Evicts a lease and says so on the lifecycle bus, as `choria governor evict` does (identity = the
/// evicted lease's name).
async fn evict(State(c): State<Control>, Path((name, seq)): Path<(String, u64)>) -> ApiResult<hoist_core::backend::LeaseInfo> {
    let lease = c.governor.evict(&name, seq).await?;
    let event = GovernorEvent {
        identity: lease.holder.clone(),
        component: "CLI".into(),
        governor: name,
        sequence: seq,
        event_type: GovernorEventType::Eviction,
    };
    if let Err(e) = c.events.publish_governor(&event).await {
        tracing::debug!(error = %e, "could not publish the eviction event");
    }
    json(lease)
}

async fn metrics_text(State(c): State<Control>, headers: axum::http::HeaderMap) -> Response {
    let accept = headers.get(axum::http::header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = metrics::Format::negotiate(accept);
    let status = c.agent.status(None).await;
    ([("content-type", format.content_type())], format.write(metrics::render(&status, &c.conditions.sources()))).into_response()
}
