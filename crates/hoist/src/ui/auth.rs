//! Who may see the live web view: the decision made at start (where it listens, whether a token is
//! needed) and the check every request passes.

use axum::extract::{Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

/// How requests are let in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Loopback without a token: anyone on this machine may look. The Host header must name a
    /// loopback host too, so a web page elsewhere cannot read the view through DNS rebinding.
    Loopback,
    /// Every request carries this token (`Authorization: Bearer` or `?token=`).
    Token(String),
}

/// The token from `--token-file` (its first line, trimmed) or else `HOIST_UI_TOKEN`.
pub fn token(file: Option<&Path>, env: Option<String>) -> anyhow::Result<Option<String>> {
    let (token, from) = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading the token file {}: {e}", path.display()))?;
            (text.lines().next().unwrap_or_default().trim().to_string(), format!("the token file {}", path.display()))
        }
        None => match env {
            Some(value) => (value.trim().to_string(), "HOIST_UI_TOKEN".to_string()),
            None => return Ok(None),
        },
    };
    anyhow::ensure!(!token.is_empty(), "{from} is empty: a token must not be guessable as nothing");
    Ok(Some(token))
}

/// Whether `listen` may be served with `token`: a token is required anywhere but on loopback,
/// because the page shows the fleet's layout and every node's problems to whoever can reach it.
pub fn decide(listen: SocketAddr, token: Option<String>) -> Result<Access, String> {
    match token {
        Some(token) => Ok(Access::Token(token)),
        None if listen.ip().is_loopback() => Ok(Access::Loopback),
        None => Err(format!(
            "refusing to serve the web view on {listen} without a token: it is not a loopback address; \
             give one with --token-file PATH or HOIST_UI_TOKEN (or listen on 127.0.0.1)"
        )),
    }
}

impl Access {
    /// Whether a request with these headers and query may be answered; `Err` is why not.
    pub fn admits(&self, host: Option<&str>, authorization: Option<&str>, query_token: Option<&str>) -> Result<(), Denied> {
        match self {
            Access::Loopback if host.is_some_and(loopback_host) => Ok(()),
            Access::Loopback => Err(Denied::NotLoopbackHost),
            Access::Token(token) => {
                let bearer = authorization.and_then(|a| a.strip_prefix("Bearer "));
                let given = bearer.or(query_token).unwrap_or_default();
                if same(given.as_bytes(), token.as_bytes()) { Ok(()) } else { Err(Denied::Token) }
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Denied {
    NotLoopbackHost,
    Token,
}

/// `localhost`, `127.x.x.x` or `[::1]`, with or without a port.
fn loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Equality whose time does not depend on where the first difference is, so the token cannot be
/// found a byte at a time by timing answers. Only its length can be learnt that way.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The middleware in front of every route.
pub async fn guard(State(access): State<Arc<Access>>, request: Request, next: Next) -> Response {
    // Decided before awaiting anything: a borrowed request (its body is not Sync) cannot be held across.
    let admitted = {
        let header = |name| request.headers().get(name).and_then(|v| v.to_str().ok());
        let query = Query::<HashMap<String, String>>::try_from_uri(request.uri()).map(|q| q.0).unwrap_or_default();
        access.admits(header(header::HOST), header(header::AUTHORIZATION), query.get("token").map(String::as_str))
    };
    match admitted {
        Ok(()) => next.run(request).await,
        Err(Denied::Token) => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "a token is needed: Authorization: Bearer TOKEN, or ?token=TOKEN in the address\n",
        )
            .into_response(),
        Err(Denied::NotLoopbackHost) => {
            (StatusCode::FORBIDDEN, "served to loopback host names only (127.0.0.1, localhost); give a token to serve others\n")
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_token_is_required_off_loopback_only() {
        assert_eq!(decide(addr("127.0.0.1:8089"), None), Ok(Access::Loopback));
        assert_eq!(decide(addr("[::1]:8089"), None), Ok(Access::Loopback));
        for open in ["0.0.0.0:8089", "10.1.2.3:80", "[::]:8089"] {
            let refused = decide(addr(open), None).unwrap_err();
            assert!(refused.contains("--token-file") && refused.contains("HOIST_UI_TOKEN"), "{refused}");
        }
        assert_eq!(decide(addr("0.0.0.0:8089"), Some("s3cret".into())), Ok(Access::Token("s3cret".into())));
        // A token given on loopback is required there too: the operator asked for it.
        assert_eq!(decide(addr("127.0.0.1:8089"), Some("s3cret".into())), Ok(Access::Token("s3cret".into())));
    }

    #[test]
    fn a_token_comes_from_the_file_first_and_is_never_empty() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "  from-file \nsecond line\n").unwrap();
        assert_eq!(token(Some(&file), Some("from-env".into())).unwrap().as_deref(), Some("from-file"));
        assert_eq!(token(None, Some("from-env\n".into())).unwrap().as_deref(), Some("from-env"));
        assert_eq!(token(None, None).unwrap(), None);
        std::fs::write(&file, "\n").unwrap();
        assert!(token(Some(&file), None).unwrap_err().to_string().contains("is empty"));
        assert!(token(None, Some(" ".into())).is_err());
        assert!(token(Some(&dir.path().join("none")), None).unwrap_err().to_string().contains("reading the token file"));
    }

    #[test]
    fn requests_carry_the_token_in_a_header_or_the_query() {
        let access = Access::Token("s3cret".into());
        assert_eq!(access.admits(Some("h"), Some("Bearer s3cret"), None), Ok(()));
        assert_eq!(access.admits(Some("h"), None, Some("s3cret")), Ok(()));
        assert_eq!(access.admits(Some("h"), None, None), Err(Denied::Token));
        assert_eq!(access.admits(Some("h"), Some("Bearer s3cre"), None), Err(Denied::Token));
        assert_eq!(access.admits(Some("h"), Some("Bearer s3cret!"), None), Err(Denied::Token));
        assert_eq!(access.admits(Some("h"), Some("Basic s3cret"), None), Err(Denied::Token));
        assert_eq!(access.admits(Some("h"), None, Some("")), Err(Denied::Token));
    }

    #[test]
    fn loopback_access_wants_a_loopback_host_name() {
        let access = Access::Loopback;
        for host in ["127.0.0.1:8089", "localhost:8089", "LOCALHOST", "[::1]:8089", "127.0.0.2"] {
            assert_eq!(access.admits(Some(host), None, None), Ok(()), "{host}");
        }
        for host in ["evil.example:8089", "10.0.0.1:8089", "[2001:db8::1]:80", "localhost.evil.example"] {
            assert_eq!(access.admits(Some(host), None, None), Err(Denied::NotLoopbackHost), "{host}");
        }
        assert_eq!(access.admits(None, None, None), Err(Denied::NotLoopbackHost));
    }
}
