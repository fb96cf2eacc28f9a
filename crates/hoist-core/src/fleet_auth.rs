//! Who may command the fleet, and who answered. Operators sign every fleet request with an ed25519
//! key in NATS nkey form (`U…`); an agent acts only on a request signed by a key its agent file lists
//! under `fleet.operators` for that operation, issued within `fleet.max_clock_skew` and not seen
//! before. Agents sign their replies with their node key (`N…`, created in `<state_dir>/node.nk` and
//! announced in `HOIST_NODES`), so a caller can tell a node's answer from anyone else's. Whatever
//! arrives from the network is parsed as untrusted claims and believed only once its signature checks.

use crate::backend::BackendResult;
use crate::config::{FleetConfig, OperatorConfig, Permission};
use crate::fleet::{Filter, Fleet, FleetReply, FleetRequest, Operation, TransitionOutcome};
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use nkeys::KeyPair;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The node key's file inside the state directory.
pub const NODE_KEY_FILE: &str = "node.nk";

/// What travels on the wire: the claims as JSON text and a signature over exactly those bytes, so
/// nothing between signer and verifier (re-serialisation, field order) changes what was signed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sealed {
    pub claims: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

impl Sealed {
    pub fn seal<T: Serialize>(claims: &T, key: Option<&KeyPair>) -> Sealed {
        let claims = serde_json::to_string(claims).expect("claims serialise");
        // Every key here was read from a seed, so signing cannot fail.
        let signature = key.map(|k| B64.encode(k.sign(claims.as_bytes()).expect("a key read from its seed signs")));
        Sealed { claims, signature }
    }

    /// Whether the signature is `public_key`'s over the claims.
    pub fn signed_by(&self, public_key: &str) -> bool {
        let Some(signature) = &self.signature else { return false };
        match (KeyPair::from_public_key(public_key), B64.decode(signature)) {
            (Ok(key), Ok(signature)) => key.verify(self.claims.as_bytes(), &signature).is_ok(),
            _ => false,
        }
    }
}

/// What an operator signs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestClaims {
    pub request: FleetRequest,
    /// Unix milliseconds when the caller made it; agents refuse it outside `fleet.max_clock_skew`.
    pub issued_at: u64,
    /// Random, so an agent can refuse the same request a second time.
    pub nonce: String,
    /// Where answers go; signed so a captured request cannot be aimed at another subject.
    pub reply_to: String,
    /// The signer's public key (`U…`); None for an unsigned request.
    pub signer: Option<String>,
}

/// What a node signs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplyClaims {
    pub reply: FleetReply,
    /// The request's nonce: an answer to this request, not a copy of an older answer.
    pub nonce: String,
    /// The node key (`N…`) that signed.
    pub key: String,
}

/// An answer the caller could not believe, or could not count.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Untrusted {
    /// The node the answer claims to come from (`?` when it did not even say).
    pub node: String,
    pub reason: String,
}

/// Who asked, as the audit records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    /// The operator's name in `fleet.operators`; `unsigned` or `unlisted` (a key not listed) where
    /// `fleet.allow_unsigned` lets them in.
    pub name: String,
    pub key: Option<String>,
}

/// One accepted transition request, as published on `hoist.audit.<node>` and logged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// RFC 3339, when the node accepted it.
    pub time: String,
    pub node: String,
    pub caller: Caller,
    pub operation: Operation,
    pub filter: Filter,
    pub result: Vec<TransitionOutcome>,
}

/// A request that passed every check: who made it, and the filter as this caller may apply it.
#[derive(Debug, Clone, PartialEq)]
pub struct Admitted {
    pub caller: Caller,
    pub filter: Filter,
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The agent's side: decides whether a request is to be acted on.
#[derive(Debug)]
pub struct Authority {
    operators: Vec<OperatorConfig>,
    allow_unsigned: bool,
    skew: Duration,
    /// `<signer> <nonce>` of admitted requests → when (unix ms) they can be forgotten: once the
    /// request is stale anyway.
    seen: Mutex<HashMap<String, u64>>,
}

const HOW_TO_CONFIGURE: &str = "create an operator key with `hoist key new FILE`, list its public key under `fleet.operators` in this \
                                node's agent file (e.g. `fleet: { operators: [ { name: alice, key: U…, allow: [status, transition] } ] }`), \
                                and sign with `--key FILE`, HOIST_KEY or `fleet.key`";

impl Authority {
    pub fn new(cfg: &FleetConfig) -> Authority {
        Authority { operators: cfg.operators.clone(), allow_unsigned: cfg.allow_unsigned, skew: cfg.max_clock_skew, seen: Mutex::default() }
    }

    /// Checks `claims` (taken from `sealed`, which arrived on the subject of `operation`'s kind with
    /// replies to `reply_to`) at `now` (unix ms). The error is the reason the caller is shown.
    pub fn admit(&self, sealed: &Sealed, claims: &RequestClaims, subject_kind: &str, reply_to: &str, now: u64) -> Result<Admitted, String> {
        let request = &claims.request;
        if request.operation.kind() != subject_kind {
            return Err(format!("a {} request arrived on the {subject_kind} subject", request.operation.kind()));
        }
        let Some(key) = &claims.signer else {
            if self.allow_unsigned {
                return Ok(Admitted { caller: Caller { name: "unsigned".into(), key: None }, filter: request.filter.clone() });
            }
            if self.operators.is_empty() {
                return Err(format!("this node takes no fleet requests: no operator key is configured; {HOW_TO_CONFIGURE}"));
            }
            return Err("unsigned fleet requests are refused: sign with `--key FILE`, HOIST_KEY or `fleet.key` in the agent file".into());
        };
        // A signature that does not check says nothing about who sent it, so nothing else is believed.
        if !sealed.signed_by(key) {
            return Err(format!("the signature does not match the request and key {key} (altered on the way, or signed with another key)"));
        }
        if claims.reply_to != reply_to {
            return Err("the request was sent with another reply subject than the one it was signed for".into());
        }
        let Some(operator) = self.operators.iter().find(|o| &o.key == key) else {
            // A lab that takes unsigned requests takes a signed one too, whoever signed it.
            if self.allow_unsigned {
                return Ok(Admitted { caller: Caller { name: "unlisted".into(), key: Some(key.clone()) }, filter: request.filter.clone() });
            }
            if self.operators.is_empty() {
                return Err(format!("this node takes no fleet requests: no operator key is configured; {HOW_TO_CONFIGURE}"));
            }
            return Err(format!("key {key} is not listed under fleet.operators on this node"));
        };
        let age_ms = i128::from(now) - i128::from(claims.issued_at);
        let skew_ms = i128::try_from(self.skew.as_millis()).unwrap_or(i128::MAX);
        if age_ms.abs() > skew_ms {
            let (how, ms) = if age_ms > 0 { ("issued", age_ms) } else { ("dated", -age_ms) };
            let when = if age_ms > 0 { "ago" } else { "ahead of this node's clock" };
            return Err(format!(
                "stale request: {how} {:.1}s {when}, outside fleet.max_clock_skew ({}); check both clocks (NTP), or send it again",
                ms as f64 / 1000.0,
                humantime::format_duration(self.skew)
            ));
        }
        if !operator.allow.iter().any(|p| p.allows(&request.operation)) {
            let allowed: Vec<String> = operator.allow.iter().map(Permission::to_string).collect();
            return Err(format!("operator {} may not {}: allowed {}", operator.name, request.operation.describe(), allowed.join(", ")));
        }
        let filter = scoped(&request.filter, operator)?;
        if claims.nonce.is_empty() || claims.nonce.len() > 64 {
            return Err("the request's nonce must be 1 to 64 characters".into());
        }
        let mut seen = self.seen.lock().expect("not poisoned");
        seen.retain(|_, forget| *forget > now);
        let id = format!("{key} {}", claims.nonce);
        if seen.contains_key(&id) {
            return Err("replayed request: this node has already answered a request with this nonce".into());
        }
        seen.insert(id, claims.issued_at.saturating_add(u64::try_from(self.skew.as_millis()).unwrap_or(u64::MAX)));
        Ok(Admitted { caller: Caller { name: operator.name.clone(), key: Some(key.clone()) }, filter })
    }
}

/// The filter as `operator` may use it: an operator limited to some containers addresses only those,
/// and naming another container is refused rather than silently narrowed.
fn scoped(filter: &Filter, operator: &OperatorConfig) -> Result<Filter, String> {
    if operator.containers.is_empty() {
        return Ok(filter.clone());
    }
    if let Some(outside) = filter.containers.iter().find(|c| !operator.containers.contains(c)) {
        return Err(format!("operator {} may act on {} only, not {outside}", operator.name, operator.containers.join(", ")));
    }
    let containers = if filter.containers.is_empty() { operator.containers.clone() } else { filter.containers.clone() };
    Ok(Filter { containers, ..filter.clone() })
}

/// The caller's side: sends `request` (signed with `key`, if given) and sorts the answers into the
/// ones proven to come from the node they name and the ones that are not. `node_keys` are the keys
/// nodes announced; gathering ends early once every node in `expected` has answered provably.
pub async fn gather_signed(
    fleet: &dyn Fleet,
    request: &FleetRequest,
    key: Option<&KeyPair>,
    node_keys: &BTreeMap<String, Option<String>>,
    expected: &BTreeSet<String>,
    deadline: Duration,
) -> BackendResult<(Vec<FleetReply>, BTreeSet<Untrusted>)> {
    let reply_to = fleet.reply_subject();
    let nonce = new_nonce();
    let claims = RequestClaims {
        request: request.clone(),
        issued_at: now_ms(),
        nonce: nonce.clone(),
        reply_to: reply_to.clone(),
        signer: key.map(KeyPair::public_key),
    };
    let body = serde_json::to_vec(&Sealed::seal(&claims, key)).expect("requests serialise");
    // node → (the signed claims, the reply): an identical copy is the same answer, a different one a conflict.
    let mut proven: BTreeMap<String, (String, FleetReply)> = BTreeMap::new();
    let mut untrusted = BTreeSet::new();
    let mut collect = |bytes: &[u8]| {
        match check_reply(bytes, &nonce, node_keys) {
            Ok((claims, reply)) => match proven.get(&reply.node) {
                None => {
                    proven.insert(reply.node.clone(), (claims, reply));
                }
                Some((first, _)) if *first == claims => {}
                Some(_) => {
                    untrusted.insert(Untrusted {
                        node: reply.node.clone(),
                        reason:
                            "conflicting answers: the node signed two different answers to one request (is its node key on two machines?)"
                                .into(),
                    });
                }
            },
            Err(u) => {
                untrusted.insert(u);
            }
        }
        !expected.is_empty() && expected.iter().all(|n| proven.contains_key(n))
    };
    fleet.gather(request.operation.kind(), &reply_to, body, deadline, &mut collect).await?;
    Ok((proven.into_values().map(|(_, r)| r).collect(), untrusted))
}

fn check_reply(bytes: &[u8], nonce: &str, node_keys: &BTreeMap<String, Option<String>>) -> Result<(String, FleetReply), Untrusted> {
    let malformed = |e: serde_json::Error| Untrusted { node: "?".into(), reason: format!("a malformed answer ({e})") };
    let sealed: Sealed = serde_json::from_slice(bytes).map_err(malformed)?;
    let claims: ReplyClaims = serde_json::from_str(&sealed.claims).map_err(malformed)?;
    let node = claims.reply.node.clone();
    let untrusted = |reason: String| Untrusted { node: node.clone(), reason };
    let announced = match node_keys.get(&node) {
        None => return Err(untrusted(format!("impostor? an answer for {node}, which has not announced itself in HOIST_NODES"))),
        Some(None) => {
            return Err(untrusted(format!(
                "{node} announces no node key (an agent older than signed replies?), so its answer cannot be checked"
            )));
        }
        Some(Some(k)) => k,
    };
    if sealed.signature.is_none() {
        return Err(untrusted(format!("impostor: an unsigned answer for {node}")));
    }
    if claims.key != *announced || !sealed.signed_by(announced) {
        return Err(untrusted(format!("impostor: an answer for {node} not signed by the node key {node} announced ({announced})")));
    }
    if claims.nonce != nonce {
        return Err(untrusted(format!("an answer signed by {node} for another request (replayed)")));
    }
    Ok((sealed.claims, claims.reply))
}

fn new_nonce() -> String {
    rand::random::<[u8; 16]>().iter().map(|b| format!("{b:02x}")).collect()
}

/// An nkey seed from `path`, which must be of `kind` (user for operators, server for nodes).
pub fn read_seed(path: &Path, kind: nkeys::KeyPairType) -> Result<KeyPair, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading the key {}: {e}", path.display()))?;
    let key = KeyPair::from_seed(text.trim()).map_err(|e| format!("{} does not hold an nkey seed: {e}", path.display()))?;
    if key.key_pair_type() != kind {
        return Err(format!("{} holds a {:?} key, not a {kind:?} key", path.display(), key.key_pair_type()));
    }
    Ok(key)
}

/// Writes `key`'s seed to a new file readable by its owner only; never replaces an existing file.
pub fn write_seed(path: &Path, key: &KeyPair) -> Result<(), String> {
    let seed = key.seed().map_err(|e| format!("no seed to write: {e}"))?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("creating {}: {e}", path.display()))?;
    file.write_all(format!("{seed}\n").as_bytes()).and_then(|()| file.sync_all()).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// This node's key, created in `state_dir` on first start.
pub fn node_key(state_dir: &Path) -> Result<KeyPair, String> {
    let path = state_dir.join(NODE_KEY_FILE);
    if path.exists() {
        return read_seed(&path, nkeys::KeyPairType::Server)
            .map_err(|e| format!("{e}; remove it to make a new node key (callers learn it from this node's presence)"));
    }
    let key = KeyPair::new_server();
    write_seed(&path, &key)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsm::Transition;

    fn operator(name: &str, key: &KeyPair, allow: Vec<Permission>, containers: &[&str]) -> OperatorConfig {
        OperatorConfig { name: name.into(), key: key.public_key(), allow, containers: containers.iter().map(|c| c.to_string()).collect() }
    }

    fn authority(operators: Vec<OperatorConfig>) -> Authority {
        Authority::new(&FleetConfig { operators, ..FleetConfig::default() })
    }

    fn signed(key: &KeyPair, operation: Operation, containers: &[&str], issued_at: u64) -> (Sealed, RequestClaims) {
        let claims = RequestClaims {
            request: FleetRequest {
                filter: Filter { containers: containers.iter().map(|c| c.to_string()).collect(), ..Filter::default() },
                operation,
            },
            issued_at,
            nonce: new_nonce(),
            reply_to: "_INBOX.x".into(),
            signer: Some(key.public_key()),
        };
        (Sealed::seal(&claims, Some(key)), claims)
    }

    const NOW: u64 = 1_000_000_000;

    #[test]
    fn admits_a_listed_operator_once_and_within_the_clock_skew() {
        let alice = KeyPair::new_user();
        let auth = authority(vec![operator("alice", &alice, vec![Permission::Status, Permission::Transition], &[])]);
        let restart = Operation::Transition { transition: Transition::Restart };
        let (sealed, claims) = signed(&alice, restart.clone(), &["web"], NOW - 5_000);
        let admitted = auth.admit(&sealed, &claims, "transition", "_INBOX.x", NOW).unwrap();
        assert_eq!(admitted.caller, Caller { name: "alice".into(), key: Some(alice.public_key()) });
        assert!(auth.admit(&sealed, &claims, "transition", "_INBOX.x", NOW).unwrap_err().contains("replayed"));
        let (sealed, claims) = signed(&alice, restart.clone(), &["web"], NOW - 31_000);
        assert!(auth.admit(&sealed, &claims, "transition", "_INBOX.x", NOW).unwrap_err().contains("stale request: issued 31.0s ago"));
        let (sealed, claims) = signed(&alice, restart, &["web"], NOW + 40_000);
        assert!(auth.admit(&sealed, &claims, "transition", "_INBOX.x", NOW).unwrap_err().contains("ahead of this node's clock"));
    }

    #[test]
    fn refuses_what_is_not_proven_or_not_allowed() {
        let (alice, mallory) = (KeyPair::new_user(), KeyPair::new_user());
        let auth = authority(vec![operator("alice", &alice, vec![Permission::Status, Permission::Only(Transition::Restart)], &["web"])]);
        let stop = Operation::Transition { transition: Transition::Stop };
        let (sealed, claims) = signed(&alice, stop, &["web"], NOW);
        assert_eq!(
            auth.admit(&sealed, &claims, "transition", "_INBOX.x", NOW).unwrap_err(),
            "operator alice may not stop: allowed status, restart"
        );
        let restart = Operation::Transition { transition: Transition::Restart };
        let (sealed, claims) = signed(&alice, restart.clone(), &["db"], NOW);
        assert_eq!(auth.admit(&sealed, &claims, "transition", "_INBOX.x", NOW).unwrap_err(), "operator alice may act on web only, not db");
        // A status for every container shows alice's containers only.
        let (sealed, claims) = signed(&alice, Operation::Status, &[], NOW);
        assert_eq!(auth.admit(&sealed, &claims, "status", "_INBOX.x", NOW).unwrap().filter.containers, ["web"]);
        // A transition on the status subject (which NATS permissions may let a reader publish to).
        let (sealed, claims) = signed(&alice, restart.clone(), &["web"], NOW);
        assert!(auth.admit(&sealed, &claims, "status", "_INBOX.x", NOW).unwrap_err().contains("arrived on the status subject"));
        // Aimed at another reply subject than signed for.
        assert!(auth.admit(&sealed, &claims, "transition", "_INBOX.other", NOW).unwrap_err().contains("another reply subject"));
        // An unknown key, and a known key's name on claims someone else signed.
        let (sealed, claims) = signed(&mallory, restart.clone(), &["web"], NOW);
        assert!(auth.admit(&sealed, &claims, "transition", "_INBOX.x", NOW).unwrap_err().contains("is not listed under fleet.operators"));
        let forged = RequestClaims { signer: Some(alice.public_key()), ..claims };
        let sealed = Sealed::seal(&forged, Some(&mallory));
        assert!(auth.admit(&sealed, &forged, "transition", "_INBOX.x", NOW).unwrap_err().contains("signature does not match"));
        // Unsigned, with and without keys configured.
        let unsigned = RequestClaims { signer: None, ..forged };
        let sealed = Sealed::seal(&unsigned, None);
        assert!(auth.admit(&sealed, &unsigned, "transition", "_INBOX.x", NOW).unwrap_err().contains("unsigned fleet requests are refused"));
        assert!(authority(vec![]).admit(&sealed, &unsigned, "transition", "_INBOX.x", NOW).unwrap_err().contains("hoist key new FILE"));
        let lab = Authority::new(&FleetConfig { allow_unsigned: true, ..FleetConfig::default() });
        assert_eq!(lab.admit(&sealed, &unsigned, "transition", "_INBOX.x", NOW).unwrap().caller.name, "unsigned");
        let (sealed, claims) = signed(&mallory, restart, &["web"], NOW);
        assert_eq!(lab.admit(&sealed, &claims, "transition", "_INBOX.x", NOW).unwrap().caller.name, "unlisted");
    }

    #[test]
    fn replies_are_believed_only_from_the_announced_key_for_this_request() {
        let (node, other) = (KeyPair::new_server(), KeyPair::new_server());
        let keys = BTreeMap::from([("n1".to_string(), Some(node.public_key())), ("old".to_string(), None)]);
        let reply = |name: &str| FleetReply {
            node: name.into(),
            status: crate::status::NodeStatus { node: name.into(), machines: vec![], config_error: None, warnings: vec![] },
            transitions: vec![],
            refused: None,
        };
        let sealed = |name: &str, nonce: &str, by: Option<&KeyPair>, claimed: &KeyPair| {
            let claims = ReplyClaims { reply: reply(name), nonce: nonce.into(), key: claimed.public_key() };
            serde_json::to_vec(&Sealed::seal(&claims, by)).unwrap()
        };
        assert_eq!(check_reply(&sealed("n1", "a", Some(&node), &node), "a", &keys).unwrap().1, reply("n1"));
        let reason = |bytes: Vec<u8>| check_reply(&bytes, "a", &keys).unwrap_err().reason;
        assert!(reason(sealed("n1", "a", None, &node)).starts_with("impostor: an unsigned answer"));
        assert!(reason(sealed("n1", "a", Some(&other), &other)).starts_with("impostor: an answer for n1 not signed"));
        assert!(reason(sealed("n1", "a", Some(&other), &node)).starts_with("impostor: an answer for n1 not signed"));
        assert!(reason(sealed("n1", "b", Some(&node), &node)).contains("for another request"));
        assert!(reason(sealed("n9", "a", Some(&node), &node)).contains("has not announced itself"));
        assert!(reason(sealed("old", "a", Some(&node), &node)).contains("announces no node key"));
        assert!(reason(b"{".to_vec()).starts_with("a malformed answer"));
    }

    #[test]
    fn seeds_are_written_for_their_owner_only_and_never_over_a_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = node_key(dir.path()).unwrap();
        let path = dir.path().join(NODE_KEY_FILE);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(node_key(dir.path()).unwrap().public_key(), key.public_key(), "the same key on the next start");
        assert!(write_seed(&path, &KeyPair::new_server()).unwrap_err().contains("exists"));
        let user = dir.path().join("op.nk");
        write_seed(&user, &KeyPair::new_user()).unwrap();
        assert!(read_seed(&user, nkeys::KeyPairType::Server).unwrap_err().contains("not a Server key"));
    }
}
