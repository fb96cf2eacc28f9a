//! `hoist ui`: a read-only live web view of this node or of the fleet — containers with their state,
//! version, health and what blocks them, the governors' slots, and a chart of the rollout, kept
//! current from the event stream. No route changes anything: there is nothing here to POST to.

mod auth;
mod snapshot;
mod source;
mod stream;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hoist_core::config::AgentConfig;
use source::Source;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// Where `hoist ui` listens unless told otherwise: loopback, so no token is needed.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8089";

/// The page, its script and style inline: no other file to serve, nothing fetched from elsewhere.
const PAGE: &str = include_str!("page.html");

/// Serves the view on `listen` until the process is stopped.
pub async fn run(cfg: AgentConfig, socket: Option<PathBuf>, listen: SocketAddr, token_file: Option<PathBuf>) -> anyhow::Result<()> {
    let token = auth::token(token_file.as_deref(), std::env::var("HOIST_UI_TOKEN").ok())?;
    let access = auth::decide(listen, token).map_err(|e| anyhow::anyhow!(e))?;
    let source = Arc::new(Source::open(&cfg, socket).await?);
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| anyhow::anyhow!("listening on {listen}: {e}"))?;
    let address = listener.local_addr()?;
    let with_token = if matches!(access, auth::Access::Token(_)) { "?token=…" } else { "" };
    eprintln!("hoist ui: serving the {} view on http://{address}/{with_token}", source.scope());
    crate::control::server::serve(listener, router(source, access)).await;
    Ok(())
}

fn router(source: Arc<Source>, access: auth::Access) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/api/snapshot", get(snapshot))
        .route("/api/events", get(events))
        .with_state(source)
        .layer(axum::middleware::from_fn_with_state(Arc::new(access), auth::guard))
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // The inline script and style only, and requests back to this server; the token may be in
            // the address, so it is never sent on as a referrer.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
            ),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
        .into_response()
}

/// 503 with the reason when the agent (or NATS) cannot be asked, so the page can say so.
async fn snapshot(State(source): State<Arc<Source>>) -> Response {
    match source.snapshot().await {
        Ok(snapshot) => ([(header::CACHE_CONTROL, "no-store")], axum::Json(snapshot)).into_response(),
        Err(error) => (StatusCode::SERVICE_UNAVAILABLE, axum::Json(serde_json::json!({ "error": error }))).into_response(),
    }
}

async fn events(State(source): State<Arc<Source>>) -> Response {
    stream::events(source)
}
