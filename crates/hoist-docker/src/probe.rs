//! Network probes against a container's address. The caller bounds them with a timeout.

use hoist_core::runtime::ProbeError;
use std::net::{IpAddr, SocketAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub(crate) async fn tcp(ip: IpAddr, port: u16) -> Result<TcpStream, ProbeError> {
    let addr = SocketAddr::new(ip, port);
    TcpStream::connect(addr).await.map_err(|e| io_error(format!("connect to {addr}"), &e))
}

/// Errno values that say this host, not the container, is in trouble.
const LOCAL_ERRNOS: [i32; 4] = [
    12,  // ENOMEM
    23,  // ENFILE
    24,  // EMFILE
    105, // ENOBUFS
];

/// A failed socket call: the container's fault (refused, reset, timed out…) or this host's (out of
/// descriptors or memory), which must not count against the container.
pub(crate) fn io_error(what: String, e: &std::io::Error) -> ProbeError {
    let message = format!("{what}: {e}");
    if e.raw_os_error().is_some_and(|errno| LOCAL_ERRNOS.contains(&errno)) {
        ProbeError::Local(message)
    } else {
        ProbeError::Failed(message)
    }
}

/// A plain HTTP/1.0 GET: enough to read a status line, with no HTTP client dependency and no
/// keep-alive to clean up. 2xx and 3xx pass.
pub(crate) async fn http(ip: IpAddr, port: u16, path: &str) -> Result<(), ProbeError> {
    let mut stream = tcp(ip, port).await?;
    let host = SocketAddr::new(ip, port);
    let request = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(|e| io_error("sending the request".into(), &e))?;
    let status_line = read_status_line(&mut stream).await?;
    let code =
        parse_status(&status_line).ok_or_else(|| ProbeError::Failed(format!("not an HTTP response: {:?}", status_line.trim_end())))?;
    if (200..400).contains(&code) { Ok(()) } else { Err(ProbeError::Failed(format!("HTTP {code}"))) }
}

async fn read_status_line(stream: &mut TcpStream) -> Result<String, ProbeError> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    // A status line is short; stop at its end, at EOF, or after a few KB of nonsense.
    while !buf.contains(&b'\n') && buf.len() < 4096 {
        let n = stream.read(&mut chunk).await.map_err(|e| io_error("reading the response".into(), &e))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
    Ok(String::from_utf8_lossy(line).into_owned())
}

/// The status code of `HTTP/1.x NNN reason`.
fn parse_status(line: &str) -> Option<u16> {
    let mut parts = line.split_whitespace();
    parts.next().filter(|version| version.starts_with("HTTP/"))?;
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn parses_status_lines() {
        assert_eq!(parse_status("HTTP/1.0 200 OK\r"), Some(200));
        assert_eq!(parse_status("HTTP/1.1 302 Found"), Some(302));
        assert_eq!(parse_status("SSH-2.0-OpenSSH"), None);
        assert_eq!(parse_status(""), None);
    }

    async fn serve_once(response: &'static str) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let n = conn.read(&mut buf).await.unwrap();
            assert!(buf[..n].starts_with(b"GET /health HTTP/1.0\r\n"));
            conn.write_all(response.as_bytes()).await.unwrap();
        });
        port
    }

    #[tokio::test]
    async fn http_passes_on_2xx_3xx_only() {
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        let ok = serve_once("HTTP/1.0 204 No Content\r\n\r\n").await;
        assert_eq!(http(local, ok, "/health").await, Ok(()));
        let redirect = serve_once("HTTP/1.1 301 Moved\r\nLocation: /\r\n\r\n").await;
        assert_eq!(http(local, redirect, "/health").await, Ok(()));
        let failing = serve_once("HTTP/1.0 500 Internal Server Error\r\n\r\n").await;
        assert_eq!(http(local, failing, "/health").await, Err(ProbeError::Failed("HTTP 500".to_string())));
    }

    #[test]
    fn running_out_of_descriptors_is_no_verdict_on_the_container() {
        let emfile = std::io::Error::from_raw_os_error(24);
        assert!(matches!(io_error("connect".into(), &emfile), ProbeError::Local(_)));
        let refused = std::io::Error::from_raw_os_error(111);
        assert!(matches!(io_error("connect".into(), &refused), ProbeError::Failed(_)));
    }
}
