//! Fleet security on a real nats-server with real agents: who may command a node (signed requests,
//! `fleet.operators`), whose answers count (node keys), where agents answer (inboxes only), and the
//! NATS permission profiles of the README's "Securing a fleet".

#[allow(dead_code)] // the harness also serves hoist-nats's own tests
#[path = "../../hoist-nats/tests/harness/mod.rs"]
mod nats;
mod support;

use hoist_core::fleet::{Filter, FleetAnswer, FleetReply, FleetRequest, Operation};
use hoist_core::fleet_auth::{AuditEvent, KeyPair, ReplyClaims, RequestClaims, Sealed, now_ms, read_seed};
use hoist_core::fsm::{State, Transition};
use hoist_core::status::NodeStatus;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;

/// A NATS client with no credentials and no hoist code: what anyone who reaches the server can run.
struct Plain {
    runtime: tokio::runtime::Runtime,
    client: async_nats::Client,
}

type Captured = Arc<Mutex<Vec<(String, Option<String>, Vec<u8>)>>>;

impl Plain {
    fn connect(url: &str) -> Plain {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let client = runtime.block_on(async_nats::connect(url)).expect("connect without credentials");
        Plain { runtime, client }
    }

    /// Publishes `body` on `subject` with replies to `reply`; what agents sent back to `reply` within `wait`.
    fn send(&self, subject: &str, reply: &str, body: Vec<u8>, wait: Duration) -> Vec<Vec<u8>> {
        self.runtime.block_on(async {
            use futures_util::StreamExt;
            let mut answers = self.client.subscribe(reply.to_string()).await.unwrap();
            self.client.publish_with_reply(subject.to_string(), reply.to_string(), body.into()).await.unwrap();
            self.client.flush().await.unwrap();
            let until = tokio::time::Instant::now() + wait;
            let mut got = Vec::new();
            while let Ok(Some(m)) = tokio::time::timeout_at(until, answers.next()).await {
                // The server's "no responders" notice is not an answer.
                if m.status.is_none() {
                    got.push(m.payload.to_vec());
                }
            }
            got
        })
    }

    /// Every message on `subject` from now on: (subject, reply, payload).
    fn capture(&self, subject: &str) -> Captured {
        let seen: Captured = Arc::default();
        let mut messages = self.runtime.block_on(async {
            let sub = self.client.subscribe(subject.to_string()).await.unwrap();
            self.client.flush().await.unwrap();
            sub
        });
        let sink = seen.clone();
        self.runtime.spawn(async move {
            use futures_util::StreamExt;
            while let Some(m) = messages.next().await {
                sink.lock().unwrap().push((m.subject.to_string(), m.reply.map(|r| r.to_string()), m.payload.to_vec()));
            }
        });
        seen
    }

    /// Answers every fleet status request with what `answer` makes of its claims.
    fn impersonate(&self, answer: impl Fn(&RequestClaims) -> Vec<Vec<u8>> + Send + 'static) {
        let client = self.client.clone();
        let mut requests = self.runtime.block_on(async {
            let sub = client.subscribe("hoist.fleet.status").await.unwrap();
            client.flush().await.unwrap();
            sub
        });
        self.runtime.spawn(async move {
            use futures_util::StreamExt;
            while let Some(m) = requests.next().await {
                let (Some(reply), Ok(sealed)) = (m.reply, serde_json::from_slice::<Sealed>(&m.payload)) else { continue };
                let Ok(claims) = serde_json::from_str::<RequestClaims>(&sealed.claims) else { continue };
                for body in answer(&claims) {
                    client.publish(reply.clone(), body.into()).await.unwrap();
                }
            }
        });
    }
}

/// A request as anyone can write it: unsigned, sealed the way hoist sends it.
fn unsigned(operation: Operation, reply_to: &str) -> Vec<u8> {
    let claims = RequestClaims {
        request: FleetRequest { filter: Filter::default(), operation },
        issued_at: now_ms(),
        nonce: format!("{:x}", now_ms()),
        reply_to: reply_to.into(),
        signer: None,
    };
    serde_json::to_vec(&Sealed::seal(&claims, None)).unwrap()
}

/// The request today's agents took: plain JSON on `hoist.fleet.request`.
fn legacy(operation: Operation) -> Vec<u8> {
    serde_json::to_vec(&FleetRequest { filter: Filter::default(), operation }).unwrap()
}

fn stop() -> Operation {
    Operation::Transition { transition: Transition::Stop }
}

/// The reason in a node's signed refusal.
fn refusal(bytes: &[u8]) -> Option<String> {
    let sealed: Sealed = serde_json::from_slice(bytes).ok()?;
    serde_json::from_str::<ReplyClaims>(&sealed.claims).ok()?.reply.refused
}

/// The CLI against `agent`'s file with extra environment; (succeeded, stdout, stderr).
fn cli(agent: &TestAgent, env: &[(&str, &Path)], args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hoist"))
        .arg("--config")
        .arg(agent.path("hoist.yaml"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.to_string(), v.as_os_str().to_owned())))
        .output()
        .expect("run hoist");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn nats_yaml(server: &nats::Server) -> String {
    format!("backend: nats\nnats:\n  servers: ['{}']\n", server.url())
}

fn two_containers() -> String {
    format!("containers:\n  web:\n    image: {img}\n    image_tag: v1\n  db:\n    image: {img}\n    image_tag: v1\n", img = image())
}

/// Waits until the node has announced itself (so the CLI expects its answer).
fn wait_announced(agent: &TestAgent, key: &Path) {
    wait_until("the node to answer a signed fleet status", Duration::from_secs(30), || {
        let (ok, out, _) = cli(agent, &[], &["status", "--fleet", "--json", "--key", key.to_str().unwrap()]);
        let answer: FleetAnswer = serde_json::from_str(&out).ok()?;
        (ok && answer.replies.len() == 1).then_some(())
    });
}

#[test]
fn fleet_requests_need_a_listed_operators_signature_and_accepted_transitions_are_audited() {
    let server = nats::Server::start();
    let (alice, bob, carol) = (OperatorKey::new(), OperatorKey::new(), OperatorKey::new());
    let agent_yaml = format!(
        "{}fleet:\n  operators:\n    - {{ name: alice, key: {}, allow: [status, transition] }}\n    - {{ name: bob, key: {}, allow: [status] }}\n    - {{ name: carol, key: {}, allow: [restart], containers: [web] }}\n",
        nats_yaml(&server),
        alice.public,
        bob.public,
        carol.public
    );
    let agent = TestAgent::start_with("sec-ops", &two_containers(), &agent_yaml);
    agent.wait_running("web");
    agent.wait_running("db");
    wait_announced(&agent, &alice.seed);

    // The finding: one message from a client with no credentials stopped everything. Neither
    // today's form on the old subject nor an unsigned request on the new one stops anything, and
    // the node says why.
    let plain = Plain::connect(&server.url());
    assert!(plain.send("hoist.fleet.request", "_INBOX.legacy", legacy(stop()), Duration::from_secs(1)).is_empty());
    let answers = plain.send("hoist.fleet.transition", "_INBOX.plain", unsigned(stop(), "_INBOX.plain"), Duration::from_secs(2));
    assert_eq!(answers.len(), 1, "the node refuses, once");
    let reason = refusal(&answers[0]).expect("a refusal");
    assert!(reason.contains("unsigned fleet requests are refused: sign with `--key FILE`"), "{reason}");
    for c in ["web", "db"] {
        assert_eq!(agent.machine(c).unwrap().state, State::Run, "{c} still runs");
    }

    // The CLI without a key: the operator sees who refused and why, and the command fails.
    let (ok, out, _) = cli(&agent, &[], &["transition", "--fleet", "web", "stop"]);
    assert!(!ok && out.contains(&format!("{} refused: unsigned fleet requests are refused", agent.node)), "{out}");

    // bob may read, not act.
    let bob_key = bob.seed.to_str().unwrap();
    let (ok, out, _) = cli(&agent, &[], &["status", "--fleet", "--key", bob_key]);
    assert!(ok && out.contains("Summary of State:\n   RUN: 2"), "{out}");
    let (ok, out, _) = cli(&agent, &[], &["transition", "--fleet", "web", "stop", "--key", bob_key]);
    assert!(!ok && out.contains("refused: operator bob may not stop: allowed status"), "{out}");

    // carol (key from HOIST_KEY) may restart web only.
    let carol_env = [("HOIST_KEY", carol.seed.as_path())];
    let (ok, out, _) = cli(&agent, &carol_env, &["transition", "--fleet", "db", "restart"]);
    assert!(!ok && out.contains("refused: operator carol may act on web only, not db"), "{out}");
    let (ok, out, _) = cli(&agent, &carol_env, &["status", "--fleet"]);
    assert!(!ok && out.contains("refused: operator carol may not ask for status: allowed restart"), "{out}");
    assert_eq!(agent.machine("db").unwrap().state, State::Run);

    // alice restarts web; the node publishes and logs who did what.
    let audit = plain.capture("hoist.audit.>");
    let requests = plain.capture("hoist.fleet.transition");
    let (ok, out, err) = cli(&agent, &[], &["transition", "--fleet", "web", "restart", "--key", alice.seed.to_str().unwrap()]);
    assert!(ok && out.contains(&format!("{} web: → RESTART", agent.node)), "{out}{err}");
    let events = wait_until("the audit event", Duration::from_secs(5), || {
        let seen = audit.lock().unwrap().clone();
        (!seen.is_empty()).then_some(seen)
    });
    assert_eq!(events.len(), 1, "one accepted transition, one event");
    assert_eq!(events[0].0, format!("hoist.audit.{}", agent.node));
    let event: AuditEvent = serde_json::from_slice(&events[0].2).unwrap();
    assert_eq!((event.caller.name.as_str(), event.caller.key.as_deref()), ("alice", Some(alice.public.as_str())));
    assert_eq!(event.operation, Operation::Transition { transition: Transition::Restart });
    assert_eq!((event.filter.containers.as_slice(), event.node.as_str()), (&["web".to_string()][..], agent.node.as_str()));
    assert_eq!((event.result[0].container.as_str(), event.result[0].state), ("web", Some(State::Restart)));
    let log = agent.log();
    assert!(log.contains("audit: fleet transition accepted") && log.contains(&alice.public), "the agent log records it too");

    // alice's request, seen on the wire and sent again: refused as a replay (to the inbox it was
    // signed for), and refused when aimed at another inbox.
    let (_, reply, body) = requests.lock().unwrap()[0].clone();
    let reply = reply.expect("the CLI's inbox");
    let again = plain.send("hoist.fleet.transition", &reply, body.clone(), Duration::from_secs(2));
    assert!(refusal(&again[0]).unwrap().starts_with("replayed request"), "{:?}", refusal(&again[0]));
    let elsewhere = plain.send("hoist.fleet.transition", "_INBOX.mine", body, Duration::from_secs(2));
    assert!(refusal(&elsewhere[0]).unwrap().contains("another reply subject"), "{:?}", refusal(&elsewhere[0]));

    // A request alice signed two minutes ago is stale.
    let key = read_seed(&alice.seed, nkeys::KeyPairType::User).unwrap();
    let claims = RequestClaims {
        request: FleetRequest { filter: Filter::default(), operation: Operation::Status },
        issued_at: now_ms() - 120_000,
        nonce: "old".into(),
        reply_to: "_INBOX.old".into(),
        signer: Some(key.public_key()),
    };
    let stale = plain.send(
        "hoist.fleet.status",
        "_INBOX.old",
        serde_json::to_vec(&Sealed::seal(&claims, Some(&key))).unwrap(),
        Duration::from_secs(2),
    );
    let reason = refusal(&stale[0]).unwrap();
    assert!(reason.starts_with("stale request: issued 120.") && reason.contains("fleet.max_clock_skew (30s)"), "{reason}");
    assert_eq!(audit.lock().unwrap().len(), 1, "nothing refused was audited as accepted");
}

#[test]
fn unsigned_requests_are_taken_only_with_allow_unsigned_which_status_warns_about() {
    let server = nats::Server::start();
    let web = format!("containers:\n  web:\n    image: {}\n    image_tag: v1\n", image());
    let locked = TestAgent::start_with("sec-nokeys", &web, &nats_yaml(&server));
    let lab = TestAgent::start_with("sec-lab", &web, &format!("{}fleet:\n  allow_unsigned: true\n", nats_yaml(&server)));
    locked.wait_running("web");
    lab.wait_running("web");
    let warning = "fleet: unsigned fleet requests are accepted (fleet.allow_unsigned)";
    assert!(lab.status().warnings.iter().any(|w| w == warning), "{:?}", lab.status().warnings);
    assert!(lab.hoist_ok(&["status"]).contains(&format!("warning: {warning}")));
    assert!(locked.status().warnings.is_empty());

    // Unsigned, from the CLI: the lab node answers (and its warning shows in the fleet table);
    // the node with no operator keys refuses, saying how to set one up.
    let answer = wait_until("both nodes to answer", Duration::from_secs(30), || {
        let (_, out, _) = cli(&lab, &[], &["status", "--fleet", "--json"]);
        serde_json::from_str::<FleetAnswer>(&out).ok().filter(|a| a.replies.len() == 2)
    });
    let by = |node: &str| answer.replies.iter().find(|r| r.node == node).unwrap().clone();
    assert_eq!(by(&lab.node).status.machines.len(), 1);
    let reason = by(&locked.node).refused.expect("refused");
    assert!(
        reason.starts_with("this node takes no fleet requests: no operator key is configured")
            && reason.contains("hoist key new FILE")
            && reason.contains("fleet.operators"),
        "{reason}"
    );
    let (ok, out, _) = cli(&lab, &[], &["transition", "--fleet", "web", "maintenance"]);
    assert!(!ok, "a refusal fails the command: {out}");
    assert!(
        out.contains(&format!("{} web: → MAINTENANCE", lab.node)) && out.contains(&format!("{} refused: this node takes no", locked.node)),
        "{out}"
    );
    assert!(out.contains(&format!("{}: warning: {warning}", lab.node)), "{out}");
    assert_eq!(lab.machine("web").unwrap().state, State::Maintenance);
    assert_eq!(locked.machine("web").unwrap().state, State::Run);
}

#[test]
fn replies_are_signed_by_the_node_key_and_impostors_are_not_counted() {
    let server = nats::Server::start();
    let operator = OperatorKey::new();
    let web = format!("containers:\n  web:\n    image: {}\n    image_tag: v1\n", image());
    let agent = TestAgent::start_with("sec-replies", &web, &format!("{}{}", nats_yaml(&server), operator.fleet_yaml("alice", "[status]")));
    agent.wait_running("web");
    wait_announced(&agent, &operator.seed);

    // The node key: made on first start, the owner's only, in the log and in the node's presence.
    let seed = agent.path("state/node.nk");
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&seed).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let node_key = read_seed(&seed, nkeys::KeyPairType::Server).unwrap();
    assert!(agent.log().contains(&node_key.public_key()), "the log shows the node key");
    let presence: serde_json::Value = serde_json::from_str(&agent.hoist_ok(&["kv", "get", "HOIST_NODES", &agent.node])).unwrap();
    assert_eq!(presence["key"].as_str(), Some(node_key.public_key().as_str()));

    // Someone answers every status request as this node: unsigned, signed with their own key, and
    // (with the seed copied off the node) a second, different answer; and as a node that does not exist.
    let node = agent.node.clone();
    let copied = KeyPair::from_seed(&node_key.seed().unwrap()).unwrap();
    let impostor = Plain::connect(&server.url());
    let as_node = node.clone();
    impostor.impersonate(move |request| {
        let fake = |name: &str| FleetReply {
            node: name.into(),
            status: NodeStatus { node: name.into(), machines: vec![], config_error: None, warnings: vec![] },
            transitions: vec![],
            refused: None,
        };
        let own = KeyPair::new_server();
        let sealed = |name: &str, by: Option<&KeyPair>, claimed: &KeyPair| {
            let claims = ReplyClaims { reply: fake(name), nonce: request.nonce.clone(), key: claimed.public_key() };
            serde_json::to_vec(&Sealed::seal(&claims, by)).unwrap()
        };
        vec![
            sealed(&as_node, None, &copied),
            sealed(&as_node, Some(&own), &own),
            sealed(&as_node, Some(&copied), &copied),
            sealed("ghost", Some(&own), &own),
        ]
    });
    // A node that announced itself and does not answer keeps the CLI listening until its deadline,
    // so every answer above is seen whatever the order of arrival.
    let silent = serde_json::json!({"node": "silent", "facts": {}, "key": KeyPair::new_server().public_key()}).to_string();
    agent.hoist_ok(&["kv", "put", "HOIST_NODES", "silent", &silent]);

    let (ok, out, _) = cli(&agent, &[], &["status", "--fleet", "--json", "--timeout", "2s"]);
    assert!(!ok, "impostors fail the command");
    let answer: FleetAnswer = serde_json::from_str(&out).unwrap();
    assert_eq!(answer.replies.len(), 1, "the node is counted once: {answer:#?}");
    assert_eq!((answer.replies[0].node.as_str(), answer.replies[0].status.machines.len()), (node.as_str(), 1), "{answer:#?}");
    assert_eq!(answer.missing.iter().map(|m| m.node.as_str()).collect::<Vec<_>>(), ["silent"]);
    let reasons: Vec<String> = answer.untrusted.iter().map(|u| format!("{}: {}", u.node, u.reason)).collect();
    let has = |text: &str| reasons.iter().any(|r| r.contains(text));
    assert!(has(&format!("{node}: impostor: an unsigned answer for {node}")), "{reasons:#?}");
    assert!(has(&format!("{node}: impostor: an answer for {node} not signed by the node key {node} announced")), "{reasons:#?}");
    assert!(has(&format!("{node}: conflicting answers")), "{reasons:#?}");
    assert!(has("ghost: impostor? an answer for ghost, which has not announced itself"), "{reasons:#?}");

    let (ok, out, _) = cli(&agent, &[], &["status", "--fleet", "--timeout", "2s"]);
    assert!(!ok && out.contains(&format!("not counted, from {node}: impostor: an unsigned answer")), "{out}");
}

#[test]
fn agents_answer_only_plain_inbox_subjects_under_their_prefix() {
    let server = nats::Server::start();
    let web = format!("containers:\n  web:\n    image: {}\n    image_tag: v1\n    kv_update: true\n    restart_governor: RG\n", image());
    // A lab (unsigned taken), so nothing but the reply subject stands between a requester and the
    // agent's own credentials; and its own inbox prefix, which the CLI takes from the same file.
    let yaml =
        format!("backend: nats\nnats:\n  servers: ['{}']\n  inbox_prefix: _INBOX_hoist\nfleet:\n  allow_unsigned: true\n", server.url());
    let agent = TestAgent::start_with("sec-inbox", &web, &yaml);
    agent.hoist_ok(&["governor", "add", "RG", "1", "1m"]);
    agent.hoist_ok(&["kv", "put", "HOIST", "container/web/tag", "v1"]);
    agent.wait_running("web");
    wait_until("the node to answer the CLI on its inbox prefix", Duration::from_secs(30), || {
        let (ok, out, _) = cli(&agent, &[], &["status", "--fleet", "--json"]);
        (ok && serde_json::from_str::<FleetAnswer>(&out).is_ok_and(|a| a.replies.len() == 1)).then_some(())
    });

    // Crafted reply subjects: the tag key and the governor's subject. Today's form on the old
    // subject, and the sealed form on the new one.
    let plain = Plain::connect(&server.url());
    for crafted in ["$KV.HOIST.container/web/tag", "mcollective.governor.RG", "_INBOX.x"] {
        plain.send("hoist.fleet.request", crafted, legacy(Operation::Status), Duration::from_millis(300));
        let answers = plain.send("hoist.fleet.status", crafted, unsigned(Operation::Status, crafted), Duration::from_secs(1));
        assert!(answers.is_empty(), "no answer to {crafted}");
    }
    assert_eq!(agent.hoist_ok(&["kv", "get", "HOIST", "container/web/tag"]).trim(), "v1", "the tag was not overwritten");
    let view: hoist_core::backend::GovernorInfo = serde_json::from_str(&agent.hoist_ok(&["governor", "view", "RG", "--json"])).unwrap();
    assert!(view.leases.is_empty(), "no slot was taken: {view:?}");
    assert_eq!(agent.machine("web").unwrap().state, State::Run);
    let log = agent.log();
    assert!(log.contains("dropping a fleet request whose reply subject is not a _INBOX_hoist. inbox"), "debug log says why");
    assert!(log.contains("$KV.HOIST.container/web/tag") && log.contains("mcollective.governor.RG"));
}

/// The CLI with its own file (an operator's or a reader's machine, no agent); (succeeded, stdout, stderr).
fn cli_with(config: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hoist")).arg("--config").arg(config).args(args).output().expect("run hoist");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A NATS user's nkey seed in `dir`; its public key.
fn nats_user(dir: &Path, name: &str) -> String {
    let key = KeyPair::new_user();
    std::fs::write(dir.join(format!("{name}.nk")), key.seed().unwrap()).unwrap();
    key.public_key()
}

/// The permissions of the three NATS users in the README's "Securing a fleet" (keep the two the
/// same); governor `RG` is the test's only governor, and each governor has its own lines.
const AGENT_PERMISSIONS: &str = r#"{
      publish: { allow: [
        # buckets: look up, create when missing, watch and read the tag, write marks, presence, services
        "$JS.API.STREAM.INFO.KV_HOIST", "$JS.API.STREAM.CREATE.KV_HOIST", "$JS.API.STREAM.UPDATE.KV_HOIST",
        "$JS.API.STREAM.INFO.KV_HOIST_NODES", "$JS.API.STREAM.CREATE.KV_HOIST_NODES", "$JS.API.STREAM.UPDATE.KV_HOIST_NODES",
        "$JS.API.STREAM.INFO.KV_CHORIA_SERVICES", "$JS.API.STREAM.CREATE.KV_CHORIA_SERVICES", "$JS.API.STREAM.UPDATE.KV_CHORIA_SERVICES",
        "$JS.API.STREAM.INFO.KV_HOIST_STATUS", "$JS.API.STREAM.CREATE.KV_HOIST_STATUS", "$JS.API.STREAM.UPDATE.KV_HOIST_STATUS",
        "$JS.API.STREAM.INFO.KV_HOIST_OUTCOMES", "$JS.API.STREAM.CREATE.KV_HOIST_OUTCOMES", "$JS.API.STREAM.UPDATE.KV_HOIST_OUTCOMES",
        "$JS.API.CONSUMER.CREATE.KV_HOIST_STATUS", "$JS.API.CONSUMER.CREATE.KV_HOIST_STATUS.>", "$JS.API.DIRECT.GET.KV_HOIST_STATUS.>",
        "$JS.API.CONSUMER.CREATE.KV_HOIST_OUTCOMES", "$JS.API.CONSUMER.CREATE.KV_HOIST_OUTCOMES.>", "$JS.API.DIRECT.GET.KV_HOIST_OUTCOMES.>",
        "$JS.API.CONSUMER.CREATE.KV_HOIST", "$JS.API.CONSUMER.CREATE.KV_HOIST.>", "$JS.API.DIRECT.GET.KV_HOIST.>",
        "$JS.API.DIRECT.GET.KV_HOIST_NODES.>",
        "$KV.HOIST.>", "$KV.HOIST_NODES.*", "$KV.CHORIA_SERVICES.>", "$KV.HOIST_STATUS.>", "$KV.HOIST_OUTCOMES.>",
        # governors: campaign, release, view, and `hoist governor …` through this node's agent
        "mcollective.governor.*", "hoist.governor.*.freed", "$JS.API.STREAM.NAMES",
        "$JS.API.STREAM.INFO.GOVERNOR_RG", "$JS.API.STREAM.CREATE.GOVERNOR_RG", "$JS.API.STREAM.UPDATE.GOVERNOR_RG",
        "$JS.API.STREAM.MSG.GET.GOVERNOR_RG", "$JS.API.STREAM.MSG.DELETE.GOVERNOR_RG",
        "$JS.API.STREAM.PURGE.GOVERNOR_RG", "$JS.API.STREAM.DELETE.GOVERNOR_RG",
        # events and audit
        "choria.machine.transition", "choria.lifecycle.event.>", "hoist.audit.*"
      ] }
      subscribe: { allow: [
        "_INBOX.>", "hoist.fleet.status", "hoist.fleet.transition", "hoist.governor.*.freed",
        "choria.machine.transition", "$JS.EVENT.ADVISORY.STREAM.DELETED.KV_HOIST"
      ] }
      # answers go only to reply subjects of requests received: no standing right to publish on _INBOX.>
      allow_responses: true
    }"#;

const OPERATOR_PERMISSIONS: &str = r#"{
      publish: { allow: [
        "hoist.fleet.status", "hoist.fleet.transition", "$KV.HOIST.>",
        "$JS.API.STREAM.NAMES", "$JS.API.STREAM.INFO.KV_HOIST", "$JS.API.STREAM.INFO.KV_HOIST_NODES", "$JS.API.STREAM.INFO.KV_CHORIA_SERVICES",
        "$JS.API.CONSUMER.CREATE.KV_HOIST", "$JS.API.CONSUMER.CREATE.KV_HOIST.>",
        "$JS.API.CONSUMER.CREATE.KV_HOIST_NODES", "$JS.API.CONSUMER.CREATE.KV_HOIST_NODES.>",
        "$JS.API.CONSUMER.CREATE.KV_CHORIA_SERVICES", "$JS.API.CONSUMER.CREATE.KV_CHORIA_SERVICES.>",
        "$JS.API.DIRECT.GET.KV_HOIST.>", "$JS.API.DIRECT.GET.KV_HOIST_NODES.>", "$JS.API.DIRECT.GET.KV_CHORIA_SERVICES.>",
        "$JS.API.STREAM.INFO.KV_HOIST_STATUS", "$JS.API.CONSUMER.CREATE.KV_HOIST_STATUS", "$JS.API.CONSUMER.CREATE.KV_HOIST_STATUS.>",
        "$JS.API.DIRECT.GET.KV_HOIST_STATUS.>",
        "$JS.API.STREAM.INFO.KV_HOIST_OUTCOMES", "$JS.API.CONSUMER.CREATE.KV_HOIST_OUTCOMES", "$JS.API.CONSUMER.CREATE.KV_HOIST_OUTCOMES.>",
        "$JS.API.DIRECT.GET.KV_HOIST_OUTCOMES.>"
      ] }
      subscribe: { allow: [
        "_INBOX.>", "choria.machine.transition", "choria.lifecycle.event.>", "hoist.audit.>",
        "$JS.EVENT.ADVISORY.STREAM.DELETED.KV_HOIST"
      ] }
    }"#;

const READER_PERMISSIONS: &str = r#"{
      publish: {
        allow: [
          "hoist.fleet.status",
          "$JS.API.STREAM.NAMES", "$JS.API.STREAM.INFO.KV_HOIST", "$JS.API.STREAM.INFO.KV_HOIST_NODES", "$JS.API.STREAM.INFO.KV_CHORIA_SERVICES",
          "$JS.API.CONSUMER.CREATE.KV_HOIST", "$JS.API.CONSUMER.CREATE.KV_HOIST.>",
          "$JS.API.CONSUMER.CREATE.KV_HOIST_NODES", "$JS.API.CONSUMER.CREATE.KV_HOIST_NODES.>",
          "$JS.API.CONSUMER.CREATE.KV_CHORIA_SERVICES", "$JS.API.CONSUMER.CREATE.KV_CHORIA_SERVICES.>",
          "$JS.API.DIRECT.GET.KV_HOIST.>", "$JS.API.DIRECT.GET.KV_HOIST_NODES.>", "$JS.API.DIRECT.GET.KV_CHORIA_SERVICES.>",
          "$JS.API.STREAM.INFO.KV_HOIST_STATUS", "$JS.API.CONSUMER.CREATE.KV_HOIST_STATUS", "$JS.API.CONSUMER.CREATE.KV_HOIST_STATUS.>",
          "$JS.API.DIRECT.GET.KV_HOIST_STATUS.>",
          "$JS.API.STREAM.INFO.KV_HOIST_OUTCOMES", "$JS.API.CONSUMER.CREATE.KV_HOIST_OUTCOMES", "$JS.API.CONSUMER.CREATE.KV_HOIST_OUTCOMES.>",
          "$JS.API.DIRECT.GET.KV_HOIST_OUTCOMES.>"
        ]
        deny: [ "$KV.>", "hoist.fleet.transition" ]
      }
      subscribe: { allow: [
        "_INBOX.>", "choria.machine.transition", "choria.lifecycle.event.>", "hoist.audit.>",
        "$JS.EVENT.ADVISORY.STREAM.DELETED.KV_HOIST"
      ] }
    }"#;

#[test]
fn nats_permission_profiles_let_agents_roll_and_readers_only_read() {
    let dir = tempfile::tempdir().unwrap();
    let users = [("agent", AGENT_PERMISSIONS), ("operator", OPERATOR_PERMISSIONS), ("reader", READER_PERMISSIONS)];
    let entries: Vec<String> = users
        .iter()
        .map(|(name, permissions)| format!("    {{ nkey: {}, permissions: {permissions} }}", nats_user(dir.path(), name)))
        .collect();
    let conf = format!("authorization {{\n  users = [\n{}\n  ]\n}}\n", entries.join("\n"));
    std::fs::write(dir.path().join("nats.conf"), &conf).unwrap();
    let server = nats::Server::start_with(&["-c", dir.path().join("nats.conf").to_str().unwrap()]);

    let (alice, rita) = (OperatorKey::new(), OperatorKey::new());
    let nats = |user: &str| {
        format!("backend: nats\nnats:\n  servers: ['{}']\n  nkey: {}\n", server.url(), dir.path().join(format!("{user}.nk")).display())
    };
    let agent_yaml = format!(
        "{}registration:\n  interval: 1s\nfleet:\n  operators:\n    - {{ name: alice, key: {}, allow: [status, transition] }}\n    - {{ name: rita, key: {}, allow: [status] }}\n",
        nats("agent"),
        alice.public,
        rita.public
    );
    let container = |port: u16| {
        format!(
            "containers:\n  web:\n    image: {}\n    image_tag: v1\n    kv_update: true\n    restart_governor: RG\n    ports: ['127.0.0.1:{port}:80']\n    register_ports:\n      - {{ cluster: t, service: web, protocol: http, ip: 127.0.0.1, port: {port} }}\n",
            image()
        )
    };
    let operator = dir.path().join("operator.yaml");
    std::fs::write(&operator, format!("{}fleet:\n  key: {}\n", nats("operator"), alice.seed.display())).unwrap();
    let reader = dir.path().join("reader.yaml");
    std::fs::write(&reader, format!("{}fleet:\n  key: {}\n", nats("reader"), rita.seed.display())).unwrap();

    // Before any agent runs, nothing answers (the server's "no responders" notice is not an answer).
    let (ok, out, err) = cli_with(&reader, &["status", "--fleet", "--json", "--timeout", "500ms"]);
    let answer: FleetAnswer = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    assert!(ok && answer.replies.is_empty() && answer.untrusted.is_empty(), "{answer:?}");

    // Agents with the agent user run, announce themselves, register, and serve the governor commands.
    let agents: Vec<TestAgent> =
        ["a", "b"].iter().map(|n| TestAgent::start_with(&format!("perm-{n}"), &container(free_port()), &agent_yaml)).collect();
    agents[0].hoist_ok(&["governor", "add", "RG", "1", "1m"]);
    for a in &agents {
        a.wait_running("web");
    }

    // The reader reads the fleet's status and the KV.
    let fleet_on = |version: &str| {
        let (_, out, _) = cli_with(&reader, &["status", "--fleet", "--json"]);
        let a: FleetAnswer = serde_json::from_str(&out).ok()?;
        (a.replies.len() == 2
            && a.untrusted.is_empty()
            && a.replies.iter().all(|r| r.status.machines.iter().all(|m| m.state == State::Run && m.version == version)))
        .then_some(())
    };
    wait_until("both nodes to answer the reader", Duration::from_secs(30), || fleet_on("v1"));
    let (ok, out, err) = cli_with(&reader, &["kv", "ls", "HOIST_NODES"]);
    assert!(ok && out.lines().count() == 2, "{out}{err}");

    // The operator rolls the fleet with a tag; the agents take their slots and roll.
    let (ok, out, err) = cli_with(&operator, &["kv", "put", "HOIST", "container/web/tag", "v2"]);
    assert!(ok, "{out}{err}");
    wait_until("both nodes on v2", Duration::from_secs(120), || fleet_on("v2"));
    let (ok, out, err) = cli_with(&reader, &["kv", "get", "HOIST", "container/web/tag"]);
    assert!(ok && out.trim() == "v2", "{out}{err}");
    let view: hoist_core::backend::GovernorInfo = serde_json::from_str(&agents[1].hoist_ok(&["governor", "view", "RG", "--json"])).unwrap();
    assert!(view.leases.is_empty(), "every slot was given back: {view:?}");
    // The agents keep their rollout status records, which the reader may read.
    wait_until("the reader to see both nodes serving v2", Duration::from_secs(30), || {
        let (ok, out, _) = cli_with(&reader, &["rollout", "status", "web", "--json"]);
        let s: serde_json::Value = serde_json::from_str(&out).ok()?;
        (ok && s["phases"]["serving"] == 2).then_some(())
    });
    let (ok, out, err) = cli_with(&operator, &["transition", "--fleet", "web", "maintenance"]);
    assert!(ok && out.matches("web: → MAINTENANCE").count() == 2, "{out}{err}");
    let (ok, out, err) = cli_with(&operator, &["transition", "--fleet", "web", "resume"]);
    assert!(ok, "{out}{err}");

    // The reader may not put a tag, nor send a transition (not even signed with alice's key).
    let (ok, out, err) = cli_with(&reader, &["kv", "put", "HOIST", "container/web/tag", "v1"]);
    assert!(!ok && err.contains("NATS refused it: Permissions Violation for Publish to \"$KV.HOIST.container/web/tag\""), "{out}{err}");
    assert!(err.contains("reader.yaml does not have that permission"), "{err}");
    let alice_key = alice.seed.to_str().unwrap();
    let (ok, out, err) = cli_with(&reader, &["transition", "--fleet", "web", "stop", "--key", alice_key]);
    assert!(!ok && err.contains("Permissions Violation for Publish to \"hoist.fleet.transition\""), "{out}{err}");
    // Nor make a release: its record is a KV write too.
    let (ok, out, err) = cli_with(&reader, &["release", "web", "v2", "--image", &image()]);
    assert!(!ok && err.contains("Permissions Violation for Publish to \"$KV.HOIST.container/web/release\""), "{out}{err}");
    wait_until("both nodes running v2", Duration::from_secs(30), || fleet_on("v2"));
    let (_, out, _) = cli_with(&reader, &["kv", "get", "HOIST", "container/web/tag"]);
    assert_eq!(out.trim(), "v2");
}
