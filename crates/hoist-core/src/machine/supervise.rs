//! A machine that panics is not lost: its supervisor keeps the input channel, loads a new machine
//! from what the old one persisted (adopting its container, as after an agent restart), and reports
//! it, in the container's status and as the node condition `machines`. Restarts back off (1 s
//! doubling to a minute) so that a machine that panics on every input does not spin. Epochs of each
//! incarnation start far above the last one's, so a job of the old machine finishing late is stale.

use super::*;
use futures_util::FutureExt;
use std::panic::AssertUnwindSafe;

/// The longest wait before loading a machine again.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// Which run of a container's machine this is, and why the previous one ended.
pub(super) struct Incarnation {
    number: u64,
    pub(super) incident: Option<String>,
}

impl Incarnation {
    pub(super) fn first() -> Incarnation {
        Incarnation { number: 0, incident: None }
    }

    pub(super) fn first_epoch(&self) -> u64 {
        self.number << 32
    }
}

pub(super) async fn supervise(
    first: (Machine, State),
    cfg: ContainerConfig,
    deps: Arc<MachineDeps>,
    tx: mpsc::Sender<Input>,
    mut rx: mpsc::Receiver<Input>,
) {
    let (mut machine, mut initial) = first;
    let mut panics = 0u64;
    loop {
        match AssertUnwindSafe(runner::Runner::new(machine, deps.clone(), tx.clone()).run(&mut rx, initial)).catch_unwind().await {
            Ok(()) => return,
            Err(panic) => {
                panics += 1;
                let why = panic_message(&*panic);
                let incident =
                    format!("its machine failed ({why}) and was loaded again; {panics} time(s) since the agent started, a bug to report");
                tracing::error!(container = %cfg.name, panic = %why, panics, "the machine panicked; loading it again");
                deps.conditions.set("machines", Some(format!("{}: {incident}", cfg.name)));
                let wait = Duration::from_secs(1).saturating_mul(1 << (panics - 1).min(6)).min(MAX_WAIT);
                tokio::time::sleep(wait).await;
                // Looked up afresh: what the old machine left may have changed meanwhile.
                let candidates = deps.runtime.find(&deps.node, &cfg.name).await.unwrap_or_default();
                let incarnation = Incarnation { number: panics, incident: Some(incident) };
                (machine, initial) = Machine::load(cfg.clone(), deps.clone(), candidates, incarnation).await;
            }
        }
    }
}

/// What a panic said, when it said it as text.
pub(super) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}
