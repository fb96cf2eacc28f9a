//! Image references as the pull API wants them, and registry credentials from the Docker CLI's config.

use bollard::auth::DockerCredentials;
use std::path::PathBuf;

/// Splits a reference into the pull API's `fromImage` and `tag`. The tag is after the last `:` of the
/// last path component, so a registry port (`127.0.0.1:5000/team/web:v1`) is not taken for a tag;
/// a digest reference goes whole into `fromImage` with no tag.
pub(crate) fn split_reference(reference: &str) -> (&str, &str) {
    let last_component = reference.rfind('/').map_or(0, |slash| slash + 1);
    if reference.contains('@') {
        return (reference, "");
    }
    match reference[last_component..].rfind(':') {
        Some(colon) => {
            let at = last_component + colon;
            (&reference[..at], &reference[at + 1..])
        }
        None => (reference, "latest"),
    }
}

/// The registry a reference points at, as the Docker CLI keys it in `auths`. The first component is a
/// registry only when it looks like a host (a dot, a port or `localhost`); otherwise it is Docker Hub.
fn registry_host(reference: &str) -> &str {
    match reference.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => first,
        _ => "https://index.docker.io/v1/",
    }
}

/// Basic-auth credentials for the reference's registry from `$DOCKER_CONFIG/config.json` (default
/// `~/.docker/config.json`), if it holds an `auths` entry with an `auth` field. Credential helpers
/// are not supported; anything unreadable means "no credentials" and the pull goes anonymous.
pub(crate) fn credentials(reference: &str) -> Option<DockerCredentials> {
    let dir = std::env::var_os("DOCKER_CONFIG")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".docker")))?;
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("config.json")).ok()?).ok()?;
    credentials_from_config(&config, registry_host(reference))
}

fn credentials_from_config(config: &serde_json::Value, registry: &str) -> Option<DockerCredentials> {
    // Keys are written either bare (`host:5000`) or as URLs (`https://host:5000/v1/`): compare hosts.
    let host = |key: &str| key.trim_start_matches("https://").trim_start_matches("http://").split('/').next().unwrap_or("").to_string();
    let wanted = host(registry);
    let entry = config.get("auths")?.as_object()?.iter().find(|(key, _)| host(key) == wanted)?.1;
    let decoded = String::from_utf8(base64_decode(entry.get("auth")?.as_str()?)?).ok()?;
    let (username, password) = decoded.split_once(':')?;
    Some(DockerCredentials {
        username: Some(username.to_string()),
        password: Some(password.to_string()),
        serveraddress: Some(registry.to_string()),
        ..Default::default()
    })
}

/// Standard base64 with optional padding; the daemon wants the user and password decoded, and this
/// is the only base64 hoist needs.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut bits, mut nbits) = (0u32, 0u32);
    for c in text.trim_end_matches('=').bytes() {
        let value = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        bits = (bits << 6) | u32::from(value);
        nbits += 6;
        if nbits >= 8 {
            nbits -= 8;
            out.push((bits >> nbits) as u8);
            bits &= (1 << nbits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_references() {
        assert_eq!(split_reference("127.0.0.1:5000/hoist/test:v1"), ("127.0.0.1:5000/hoist/test", "v1"));
        assert_eq!(split_reference("127.0.0.1:5000/hoist/test"), ("127.0.0.1:5000/hoist/test", "latest"));
        assert_eq!(split_reference("busybox:1.36"), ("busybox", "1.36"));
        assert_eq!(split_reference("busybox"), ("busybox", "latest"));
        let digest = "reg:5000/web@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        assert_eq!(split_reference(digest), (digest, ""));
    }

    #[test]
    fn finds_registries() {
        assert_eq!(registry_host("127.0.0.1:5000/hoist/test:v1"), "127.0.0.1:5000");
        assert_eq!(registry_host("registry.example.net/team/web:v1"), "registry.example.net");
        assert_eq!(registry_host("localhost/web"), "localhost");
        assert_eq!(registry_host("team/web:v1"), "https://index.docker.io/v1/");
        assert_eq!(registry_host("busybox"), "https://index.docker.io/v1/");
    }

    #[test]
    fn decodes_base64() {
        assert_eq!(base64_decode("dXNlcjpwYXNz").unwrap(), b"user:pass");
        assert_eq!(base64_decode("YTpi").unwrap(), b"a:b");
        assert_eq!(base64_decode("YTpiYw==").unwrap(), b"a:bc");
        assert!(base64_decode("not base64!").is_none());
    }

    #[test]
    fn reads_auths_entries() {
        let config = serde_json::json!({"auths": {
            "https://reg.example.net:5000/v1/": {"auth": "dXNlcjpwYXNz"},
            "https://index.docker.io/v1/": {"auth": "aHViOnNlY3JldA=="},
            "other.example.net": {}
        }});
        let creds = credentials_from_config(&config, "reg.example.net:5000").unwrap();
        assert_eq!((creds.username.as_deref(), creds.password.as_deref()), (Some("user"), Some("pass")));
        let hub = credentials_from_config(&config, "https://index.docker.io/v1/").unwrap();
        assert_eq!(hub.username.as_deref(), Some("hub"));
        assert!(credentials_from_config(&config, "other.example.net").is_none());
        assert!(credentials_from_config(&config, "nowhere.example.net").is_none());
    }
}
