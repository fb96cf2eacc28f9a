//! Problems of the node's own dependencies (the coordination store, the NATS connection) that stop
//! nothing but that an operator must see: each adapter reports its trouble under its own source name,
//! and `hoist status` and `/metrics` show what is currently reported.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Shared by the adapters that report and the agent that shows; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Conditions {
    current: Arc<Mutex<BTreeMap<&'static str, String>>>,
}

impl Conditions {
    /// Reports `problem` for `source`, or clears it with None. Logs each change once.
    pub fn set(&self, source: &'static str, problem: Option<String>) {
        let mut current = self.current.lock().expect("not poisoned");
        match problem {
            Some(p) => {
                if current.get(source) != Some(&p) {
                    tracing::warn!(source, problem = %p, "node condition");
                }
                current.insert(source, p);
            }
            None => {
                if current.remove(source).is_some() {
                    tracing::info!(source, "node condition cleared");
                }
            }
        }
    }

    /// Clears `source`'s problem if it is one `is_ours` recognises (a source shared by several
    /// reporters, such as the probes of several containers).
    pub fn clear_if(&self, source: &'static str, is_ours: impl Fn(&str) -> bool) {
        let ours = self.current.lock().expect("not poisoned").get(source).is_some_and(|p| is_ours(p));
        if ours {
            self.set(source, None);
        }
    }

    /// The sources reporting a problem now, sorted.
    pub fn sources(&self) -> Vec<&'static str> {
        self.current.lock().expect("not poisoned").keys().copied().collect()
    }

    /// `source: problem` for every current problem, sorted by source.
    pub fn list(&self) -> Vec<String> {
        self.current.lock().expect("not poisoned").iter().map(|(s, p)| format!("{s}: {p}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_set_and_clear_their_own_problem() {
        let c = Conditions::default();
        c.set("store", Some("disk full".into()));
        c.set("nats", Some("not reachable".into()));
        assert_eq!(c.list(), ["nats: not reachable", "store: disk full"]);
        assert_eq!(c.sources(), ["nats", "store"]);
        c.set("store", None);
        assert_eq!(c.list(), ["nats: not reachable"]);
    }
}
