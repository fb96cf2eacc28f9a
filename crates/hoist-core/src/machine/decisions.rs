//! The machine's decisions, tested as the pure functions they are: a machine in a given state is fed
//! one input at a given moment, and the test reads the state it is left in and the effects it asks
//! for. No Docker, no store, no tasks; the clock is whatever the test says.

use super::*;
use crate::config::{AgentConfig, ContainerSet, load_containers};
use std::collections::BTreeMap;

/// A machine for `web` (image `registry.test/web`, tag v1, following the KV, restart governor RG)
/// with `extra` lines of container data.
fn machine(extra: &str, remembered: Option<Remembered>, container: Option<ContainerInfo>) -> (Machine, State) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.yaml");
    let data = format!(
        "containers:\n  web:\n    image: registry.test/web\n    image_tag: v1\n    kv_update: true\n    restart_governor: RG\n{extra}"
    );
    std::fs::write(&file, data).unwrap();
    let set: ContainerSet = load_containers(&[file], &serde_json::json!({})).unwrap();
    let agent = AgentConfig::defaults();
    let settings = Settings { node: "n1".into(), docker: agent.docker, rollout: agent.rollout };
    Machine::new(set.containers["web"].clone(), settings, remembered, container, supervise::Incarnation::first())
}

fn remembered(state: State, desired: &str, last_good: &str) -> Option<Remembered> {
    Some(Remembered {
        state,
        desired_version: Some(desired.into()),
        last_good_image: Some(format!("registry.test/web:{last_good}")),
        restarts: 0,
        bad_version: None,
        bad_version_node: None,
        bad_in_preflight: false,
        container_id: Some("c1".into()),
    })
}

/// A running container of `web` at `version`, as the machine's own definition makes it.
fn running(machine: &Machine, version: &str) -> ContainerInfo {
    let spec = machine.cfg.spec("n1", &machine.settings.docker, &ImageVersion::parse(version).unwrap());
    ContainerInfo {
        id: format!("c-{version}"),
        container_name: spec.container_name.clone(),
        labels: BTreeMap::from([(LABEL_SPEC.to_string(), spec.hash())]),
        image: spec.image_ref(),
        image_id: format!("sha256:{version}"),
        image_digest: None,
        state: RunState::Running,
        health: RuntimeHealth::None,
        exit_code: None,
        created: 0,
        started_at: 0,
        ip: None,
    }
}

/// A clock the test moves.
struct Clock(Now);

impl Clock {
    fn new() -> Clock {
        Clock(Now { at: Instant::now(), unix_ms: 1_000_000_000 })
    }

    fn after(&mut self, d: Duration) -> Now {
        self.0 = Now { at: self.0.at + d, unix_ms: self.0.unix_ms + d.as_millis() as u64 };
        self.0
    }
}

/// Each effect in a few words, so a table can say what is expected in order.
fn said(effects: &[Effect]) -> Vec<String> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Publish { kind, from, to, .. } if from == to => Some(format!("event {kind}")),
            Effect::Publish { kind, from, to, .. } => Some(format!("{kind} {from}→{to}")),
            Effect::Job { work, .. } => Some(match &**work {
                Work::Provision { spec, replace, delay, .. } => {
                    format!("provision {} replace={replace} delay={}ms", spec.version, delay.as_millis())
                }
                Work::Pull(plan) => format!("pull {}", plan.spec.version),
                Work::Stop { .. } => "stop".into(),
            }),
            Effect::Timer { timer, .. } => Some(format!("timer {timer:?}")),
            Effect::Inspect { then, .. } => Some(format!(
                "inspect {}",
                match **then {
                    AfterInspect::Died { .. } => "died",
                    AfterInspect::Started { .. } => "started",
                    AfterInspect::Resync => "resync",
                }
            )),
            Effect::RecordRollback { version, .. } => Some(format!("record rollback {version}")),
            Effect::RecordVerified { version } => Some(format!("record verified {version}")),
            Effect::ForgetMark { version } => Some(format!("forget mark {version}")),
            Effect::Release(_) => Some("release slot".into()),
            Effect::Reply(_, result) => Some(format!("reply {result:?}")),
            // Bookkeeping every decision does: not what these tables are about.
            Effect::Persist(_) | Effect::CancelJob | Effect::StopProbe | Effect::StartProbe { .. } | Effect::Watch { .. } => None,
            other => Some(format!("{other:?}")),
        })
        .collect()
}

/// What an inspect answers.
type Looked = Result<Option<ContainerInfo>, RuntimeError>;

/// The answer to the inspect a decision asked for.
fn looked(then: AfterInspect, result: Looked) -> Input {
    Input::Inspected(Box::new(Inspection { then, result }))
}

fn job_done(epoch: u64, result: Result<JobDone, JobError>) -> Input {
    Input::JobDone { epoch, outcome: Box::new(JobOutcome { lease: None, result }) }
}

/// A machine serving v1 in RUN (adopted, gate passed), with the KV asking for v1.
fn serving_v1(clock: &mut Clock) -> Machine {
    let (mut m, initial) = machine("", remembered(State::Run, "v1", "v1"), None);
    let c = running(&m, "v1");
    m.container = Some(c.clone());
    m.begin(initial, clock.after(Duration::ZERO));
    m.step(job_done(m.epoch, Ok(JobDone::Running { info: c.clone(), adopted: true })), clock.after(Duration::ZERO));
    m.step(looked(AfterInspect::Started { info: c.clone(), adopted: true }, Ok(Some(c))), clock.0);
    m.step(Input::Timer { epoch: m.epoch, timer: TimerKind::Unverified }, clock.after(Duration::from_secs(60)));
    assert_eq!(m.state, State::Run, "{:?}", m.status());
    m
}

/// A machine in RESTART bringing up v2 for the KV, its container started and in its gate.
fn trying_v2(clock: &mut Clock, extra: &str) -> Machine {
    let (mut m, _) = machine(extra, remembered(State::Run, "v1", "v1"), None);
    m.begin(State::Run, clock.0);
    m.container = Some(running(&m, "v1"));
    m.step(Input::DesiredVersion(Some("v2".into())), clock.after(Duration::from_secs(1)));
    m.step(job_done(m.epoch, Ok(JobDone::Pulled("sha256:v2".into()))), clock.after(Duration::from_secs(1)));
    assert_eq!(m.state, State::Restart);
    let new = running(&m, "v2");
    m.step(job_done(m.epoch, Ok(JobDone::Running { info: new.clone(), adopted: false })), clock.0);
    m.step(looked(AfterInspect::Started { info: new.clone(), adopted: false }, Ok(Some(new))), clock.0);
    m
}

#[test]
fn a_gap_in_run_becomes_the_transition_that_closes_it() {
    let mut clock = Clock::new();
    // (input, what follows)
    let cases: Vec<(Input, Vec<&str>)> = vec![
        (Input::DesiredVersion(Some("v2".into())), vec!["update RUN→UPDATE", "pull v2"]),
        (Input::DesiredVersion(Some("not a tag!".into())), vec!["event error"]),
        (Input::FileTouched("/etc/web.conf".into()), vec!["restart RUN→RESTART", "provision v1 replace=true delay=0ms"]),
        (Input::DesiredVersion(Some("v1".into())), vec![]),
    ];
    for (input, expected) in cases {
        let mut m = serving_v1(&mut clock);
        let what = format!("{input:?}");
        let effects = m.step(input, clock.after(Duration::from_secs(1)));
        assert_eq!(said(&effects), expected, "{what}");
    }
}

#[test]
fn a_death_in_run_is_looked_at_first_and_an_engine_going_away_is_no_crash() {
    let mut clock = Clock::new();
    let died = |m: &Machine| {
        let id = m.container.as_ref().unwrap().id.clone();
        Input::Runtime(RuntimeEvent { container_id: id, name: "web".into(), kind: RuntimeEventKind::Died { exit_code: Some(137) } })
    };
    let gone = Err(RuntimeError::Unavailable("engine stopped".into()));
    // (the inspect's answer, what follows, crashes counted)
    let cases: [(Looked, Vec<&str>, u32); 2] = [
        (Ok(None), vec!["restart RUN→RESTART", "provision v1 replace=true delay=0ms"], 1),
        (gone, vec!["restart RUN→RESTART", "provision v1 replace=true delay=0ms"], 0),
    ];
    for (answer, expected, crashes) in cases {
        let mut m = serving_v1(&mut clock);
        let effects = m.step(died(&m), clock.after(Duration::from_secs(1)));
        assert_eq!(said(&effects), ["inspect died"], "the decision waits for the look");
        assert_eq!(m.state, State::Run);
        let effects = m.step(looked(AfterInspect::Died { why: "container died (exit 137)".into() }, answer), clock.0);
        assert_eq!(said(&effects), expected);
        assert_eq!(m.crash.consecutive(), crashes, "{:?}", m.last_error);
    }
}

#[test]
fn a_new_version_failing_its_gate_is_rolled_back_and_the_last_good_one_brought_back() {
    let mut clock = Clock::new();
    let probe_fails = "    health_check:\n      type: exec\n      command: [\"true\"]\n      retries: 1\n";
    type Fail = fn(&Machine) -> Input;
    let fails: [(&str, Fail); 2] = [
        ("the gate's deadline", |m| Input::Timer { epoch: m.epoch, timer: TimerKind::GateDeadline }),
        ("a failed probe", |m| Input::Probe { epoch: m.epoch, result: Err(ProbeError::Failed("exit 1".into())) }),
    ];
    for (how, fail) in fails {
        let mut m = trying_v2(&mut clock, probe_fails);
        let effects = m.step(fail(&m), clock.after(Duration::from_secs(5)));
        assert_eq!(said(&effects), ["record rollback v2", "event rollback", "provision v1 replace=true delay=0ms"], "{how}");
        assert_eq!(m.rejected, Some(Rejected { version: ImageVersion::parse("v2").unwrap(), at: FailedAt::Gate }), "{how}");
        assert_eq!(m.crash.consecutive(), 0, "a rollback is no crash: {how}");
        // The version is not tried again while the KV asks for it.
        let effects = m.step(Input::DesiredVersion(Some("v2".into())), clock.after(Duration::from_secs(1)));
        assert!(said(&effects).is_empty(), "{how}: {:?}", said(&effects));
    }
}

#[test]
fn a_rolled_back_version_does_not_make_the_node_unhealthy_for_the_fleet() {
    // Several nodes rolling a broken release back are no shared outage (simulator seed 6807: counted,
    // they put the fleet in degraded mode once the release was aborted).
    let mut clock = Clock::new();
    let mut m = trying_v2(&mut clock, "");
    m.step(Input::Timer { epoch: m.epoch, timer: TimerKind::GateDeadline }, clock.after(Duration::from_secs(5)));
    assert!(m.rejected.is_some());
    assert_eq!(m.status().report.unhealthy_since_ms, None, "{:?}", m.status().report);
    // The version it falls back to failing is the node's own trouble, and is reported.
    let v1 = running(&m, "v1");
    m.step(job_done(m.epoch, Ok(JobDone::Running { info: v1.clone(), adopted: false })), clock.0);
    m.step(looked(AfterInspect::Started { info: v1.clone(), adopted: false }, Ok(Some(v1))), clock.0);
    m.step(Input::Timer { epoch: m.epoch, timer: TimerKind::GateDeadline }, clock.after(Duration::from_secs(5)));
    assert!(m.status().report.unhealthy.is_some_and(|u| u.starts_with("not healthy within")), "{:?}", m.status().report);
}

#[test]
fn a_degraded_fleet_turns_a_rollback_into_a_patient_restart() {
    let mut clock = Clock::new();
    let mut m = trying_v2(&mut clock, "");
    let verdict = crate::degraded::FleetDegraded {
        container: "web".into(),
        active: true,
        version: "v1".into(),
        unhealthy: 3,
        of: 4,
        window_secs: 120,
        since_ms: 0,
        below_since_ms: None,
        cleared_ms: None,
        by: "hoist@n2".into(),
    };
    m.step(Input::Degraded(Some(verdict)), clock.0);
    let effects = m.step(Input::Timer { epoch: m.epoch, timer: TimerKind::GateDeadline }, clock.after(Duration::from_secs(5)));
    let said = said(&effects);
    assert!(!said.iter().any(|e| e.contains("rollback")), "{said:?}");
    assert_eq!(m.rejected, None);
    // What ran is brought back (a new version waits while degraded), after the crash backoff.
    assert!(
        said.iter().any(|e| e.starts_with("provision v1 replace=true delay=") && !e.ends_with("delay=0ms")),
        "waits its backoff: {said:?}"
    );
}

#[test]
fn what_a_failed_job_leads_to_depends_on_whose_fault_it_is() {
    let mut clock = Clock::new();
    // (error of the UPDATE's pull job, what follows, state after, crashes)
    let cases: Vec<(JobError, Vec<&str>, State, u32)> = vec![
        (JobError::Backend("nats: timed out".into()), vec!["timer BackendRetry"], State::Update, 0),
        (
            JobError::RuntimeUnavailable(RuntimeError::Unavailable("docker".into())),
            vec!["event error", "timer RuntimeRetry"],
            State::Update,
            0,
        ),
        (JobError::Panicked("oops".into()), vec!["timer BackendRetry"], State::Update, 0),
        (
            JobError::Pull(RuntimeError::Pull { image: "registry.test/web:v2".into(), message: "manifest unknown".into() }),
            vec!["event error", "timer RetryPull"],
            State::Update,
            0,
        ),
    ];
    for (error, expected, state, crashes) in cases {
        let mut m = serving_v1(&mut clock);
        m.step(Input::DesiredVersion(Some("v2".into())), clock.after(Duration::from_secs(1)));
        assert_eq!(m.state, State::Update);
        let what = format!("{error:?}");
        let effects = m.step(job_done(m.epoch, Err(error)), clock.after(Duration::from_secs(1)));
        assert_eq!(said(&effects), expected, "{what}");
        assert_eq!(m.state, state, "{what}");
        assert_eq!(m.crash.consecutive(), crashes, "{what}");
        assert!(m.rejected.is_none(), "nothing is marked bad: {what}");
        assert!(m.container.as_ref().is_some_and(|c| c.image.ends_with(":v1")), "v1 keeps serving: {what}");
    }
}

#[test]
fn crashes_back_off_and_a_late_outcome_is_ignored() {
    let mut clock = Clock::new();
    let (mut m, initial) = machine("", remembered(State::Run, "v1", "v1"), None);
    m.begin(initial, clock.0);
    let epoch = m.epoch;
    let mut delays = Vec::new();
    for _ in 0..6 {
        let c = running(&m, "v1");
        m.step(job_done(m.epoch, Ok(JobDone::Running { info: c.clone(), adopted: false })), clock.after(Duration::from_secs(1)));
        let dead = ContainerInfo { state: RunState::Exited, exit_code: Some(1), ..c.clone() };
        let effects = m.step(looked(AfterInspect::Started { info: c, adopted: false }, Ok(Some(dead))), clock.0);
        let provision = said(&effects).into_iter().find(|e| e.starts_with("provision")).expect("replaced");
        let ms = provision.rsplit('=').next().unwrap().trim_end_matches("ms");
        delays.push(ms.parse::<u64>().unwrap());
    }
    assert_eq!(m.state, State::Start);
    assert!(delays.windows(2).all(|w| w[0] <= w[1]), "growing: {delays:?}");
    assert!(*delays.last().unwrap() > 0, "{delays:?}");
    assert!(m.status().condition.is_some_and(|c| c.contains("crash")), "{:?}", m.status().condition);
    // An outcome of a superseded job changes nothing.
    let effects = m.step(job_done(epoch, Ok(JobDone::Stopped)), clock.0);
    assert!(said(&effects).is_empty());
}

#[test]
fn operator_requests_are_checked_against_the_table_and_update_forgets_the_mark_first() {
    let mut clock = Clock::new();
    let reply = || oneshot::channel().0;
    let mut m = serving_v1(&mut clock);
    let effects = m.step(Input::Request(Transition::HealthCheck, reply()), clock.0);
    assert_eq!(said(&effects), ["reply Err(NotRequestable(HealthCheck))"]);
    let effects = m.step(Input::Request(Transition::Maintenance, reply()), clock.0);
    assert_eq!(said(&effects), ["maintenance RUN→MAINTENANCE", "reply Ok(Maintenance)"]);
    let effects = m.step(Input::Request(Transition::Update, reply()), clock.0);
    assert_eq!(said(&effects).len(), 1);
    assert!(said(&effects)[0].starts_with("reply Err(NotAllowed"), "{:?}", said(&effects));
    let effects = m.step(Input::Request(Transition::Resume, reply()), clock.0);
    assert_eq!(said(&effects), ["resume MAINTENANCE→RUN", "reply Ok(Run)"]);
    // `update` deletes the fleet's mark before the retry starts and before it answers.
    let effects = m.step(Input::Request(Transition::Update, reply()), clock.0);
    assert_eq!(said(&effects), ["forget mark v1", "update RUN→UPDATE", "pull v1", "reply Ok(Update)"]);
}

#[test]
fn a_version_the_fleet_refused_at_start_does_not_stop_a_later_restart_from_replacing() {
    // Found while reshaping the machine: the refusal's "keep the running container" outlived START
    // (which adopts anyway) and turned the next restart — a touched file, say — into no restart.
    let mut clock = Clock::new();
    let (mut m, initial) = machine("", remembered(State::Run, "v2", "v1"), None);
    let v1 = running(&m, "v1");
    m.container = Some(v1.clone());
    m.begin(initial, clock.0);
    let mark = RollbackMark { version: "v2".into(), node: "n2".into(), reason: "unhealthy".into(), tag_revision: 7 };
    let effects = m.step(job_done(m.epoch, Ok(JobDone::RolledBackElsewhere(mark))), clock.after(Duration::from_secs(1)));
    assert_eq!(said(&effects), ["event error", "provision v1 replace=false delay=0ms"]);
    m.step(job_done(m.epoch, Ok(JobDone::Running { info: v1.clone(), adopted: true })), clock.0);
    m.step(looked(AfterInspect::Started { info: v1.clone(), adopted: true }, Ok(Some(v1))), clock.0);
    m.step(Input::Timer { epoch: m.epoch, timer: TimerKind::Unverified }, clock.after(Duration::from_secs(60)));
    assert_eq!(m.state, State::Run);
    let effects = m.step(Input::FileTouched("/etc/web.conf".into()), clock.after(Duration::from_secs(1)));
    assert_eq!(said(&effects), ["restart RUN→RESTART", "provision v1 replace=true delay=0ms"]);
}

/// What a machine does with the governor slot it holds: the slot is a value in its state, and
/// letting go of it is an effect (`Effect::Release`), or, for one nobody should hold, a drop that
/// the agent's `SlotKeeper` turns into a release.
mod slots {
    use super::*;
    use crate::backend::{BackendResult, Events};
    use crate::backend::{GovernorEvent, GovernorInfo, Lease, LeaseInfo};
    use std::sync::Mutex;

    /// A governor that only notes the leases released to it.
    #[derive(Default)]
    struct Ledger(Mutex<Vec<u64>>);

    fn refused<T>() -> BackendResult<T> {
        Err(BackendError::Unavailable("not part of this test".into()))
    }

    #[async_trait::async_trait]
    impl Governor for Ledger {
        async fn add(&self, _: &str, _: u64, _: Duration, _: u8) -> BackendResult<()> {
            refused()
        }
        async fn acquire(&self, _: &str, _: &str, _: Duration) -> BackendResult<Lease> {
            refused()
        }
        async fn release(&self, lease: &Lease) -> BackendResult<()> {
            self.0.lock().unwrap().push(lease.seq);
            Ok(())
        }
        async fn holds(&self, _: &Lease) -> BackendResult<bool> {
            refused()
        }
        async fn view(&self, _: &str) -> BackendResult<GovernorInfo> {
            refused()
        }
        async fn evict(&self, _: &str, _: u64) -> BackendResult<LeaseInfo> {
            refused()
        }
        async fn reset(&self, _: &str) -> BackendResult<()> {
            refused()
        }
        async fn remove(&self, _: &str) -> BackendResult<()> {
            refused()
        }
        async fn list(&self) -> BackendResult<Vec<String>> {
            refused()
        }
    }

    #[async_trait::async_trait]
    impl Events for Ledger {
        async fn publish(&self, _: &TransitionEvent) -> BackendResult<()> {
            Ok(())
        }
        async fn publish_governor(&self, _: &GovernorEvent) -> BackendResult<()> {
            Ok(())
        }
        async fn publish_registration(&self, _: &str, _: &[u8]) -> BackendResult<()> {
            Ok(())
        }
        async fn subscribe(&self) -> BackendResult<futures_util::stream::BoxStream<'static, TransitionEvent>> {
            refused()
        }
    }

    #[tokio::test]
    async fn a_slot_is_kept_while_the_node_is_down_and_let_go_once_it_is_back_or_gives_up() {
        let ledger = Arc::new(Ledger::default());
        let keeper = SlotKeeper::start(ledger.clone(), ledger.clone(), "n1".into());
        let slot = |seq| {
            let keeper = keeper.clone();
            let ledger = ledger.clone();
            async move { keeper.hold(Lease { governor: "RG".into(), seq }, "hoist_web", "n1", &*ledger).await }
        };
        let mut clock = Clock::new();
        // (what happens to a RESTART of v2 that holds its slot, whether the slot is let go, state after)
        type Inputs = fn(&Machine) -> Vec<Input>;
        let cases: [(&str, Inputs, bool, State); 4] = [
            (
                "it passes its gate",
                |m| vec![Input::Probe { epoch: m.epoch, result: Ok(()) }, Input::Timer { epoch: m.epoch, timer: TimerKind::MinHealthy }],
                true,
                State::Run,
            ),
            (
                "it fails its gate: rolled back within the same slot",
                |m| vec![Input::Timer { epoch: m.epoch, timer: TimerKind::GateDeadline }],
                false,
                State::Restart,
            ),
            (
                "the coordination backend does not answer",
                |m| vec![job_done(m.epoch, Err(JobError::Backend("timed out".into())))],
                false,
                State::Restart,
            ),
            ("an operator takes it out", |_| vec![Input::Request(Transition::Maintenance, oneshot::channel().0)], true, State::Maintenance),
        ];
        let check = "    health_check:\n      type: exec\n      command: [\"true\"]\n";
        for (seq, (what, events, released, state)) in cases.into_iter().enumerate() {
            let mut m = trying_v2(&mut clock, check);
            m.lease = Some(slot(seq as u64).await);
            let mut effects = Vec::new();
            for input in events(&m) {
                effects.extend(m.step(input, clock.after(Duration::from_secs(30))));
            }
            assert_eq!(said(&effects).contains(&"release slot".to_string()), released, "{what}: {:?}", said(&effects));
            assert_eq!(m.lease.is_none(), released, "{what}");
            assert_eq!(m.state, state, "{what}");
        }
        // A slot a superseded job hands over once the machine is in MAINTENANCE is nobody's: dropped,
        // and the keeper releases it.
        let mut m = serving_v1(&mut clock);
        m.step(Input::Request(Transition::Maintenance, oneshot::channel().0), clock.0);
        let effects = m.step(Input::TakingDown { epoch: m.epoch - 1, slot: Some(slot(99).await) }, clock.0);
        assert!(said(&effects).is_empty() && m.lease.is_none());
        keeper.settle(Duration::from_secs(5)).await;
        assert!(ledger.0.lock().unwrap().contains(&99), "{:?}", ledger.0.lock().unwrap());
    }
}
