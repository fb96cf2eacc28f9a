//! The per-container state machine's vocabulary: states, transitions and the table of which transition
//! is allowed from where. The names are kept from the Choria Hoist module so `choria scout watch` users
//! read the same words.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum State {
    Run,
    Start,
    Restart,
    Update,
    Stop,
    Maintenance,
}

impl State {
    pub const ALL: [State; 6] = [State::Run, State::Start, State::Restart, State::Update, State::Stop, State::Maintenance];
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transition {
    Maintenance,
    Resume,
    HealthCheck,
    Restart,
    Update,
    Stop,
}

use State::*;

/// (transition, allowed sources, destination), in the order the original module declared them.
const TABLE: [(Transition, &[State], State); 6] = [
    (Transition::Maintenance, &[Run, Start, Restart, Stop, Update], Maintenance),
    (Transition::Resume, &[Maintenance], Run),
    (Transition::HealthCheck, &[Start, Restart], Run),
    (Transition::Restart, &[Run, Update], Restart),
    (Transition::Update, &[Run, Restart, Start], Update),
    (Transition::Stop, &[Run, Restart, Start], Stop),
];

impl Transition {
    pub const ALL: [Transition; 6] =
        [Transition::Maintenance, Transition::Resume, Transition::HealthCheck, Transition::Restart, Transition::Update, Transition::Stop];

    pub fn as_str(self) -> &'static str {
        match self {
            Transition::Maintenance => "maintenance",
            Transition::Resume => "resume",
            Transition::HealthCheck => "health_check",
            Transition::Restart => "restart",
            Transition::Update => "update",
            Transition::Stop => "stop",
        }
    }

    /// Where this transition leads from `from`, or None if it is not allowed there.
    pub fn target(self, from: State) -> Option<State> {
        TABLE.iter().find(|(t, sources, _)| *t == self && sources.contains(&from)).map(|(_, _, to)| *to)
    }

    /// What the transition does, for help texts.
    pub fn describe(self) -> &'static str {
        match self {
            Transition::Maintenance => "stop checking and remediating; the container is left as it is",
            Transition::Resume => "leave maintenance: checks and remediation again (from MAINTENANCE)",
            Transition::HealthCheck => "the container passed its health gate (decided by the agent, not requested)",
            Transition::Restart => "replace the container with a new one of the same version, through the restart governor",
            Transition::Update => {
                "pull again and run the desired version (the KV's tag if it follows one); retries a version rolled back from"
            }
            Transition::Stop => "stop the container (STOP, then MAINTENANCE until `resume`)",
        }
    }

    /// Whether an operator may ask for this transition. `health_check` is the agent's own verdict.
    pub fn operator_may_request(self) -> bool {
        self != Transition::HealthCheck
    }
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            Run => "RUN",
            Start => "START",
            Restart => "RESTART",
            Update => "UPDATE",
            Stop => "STOP",
            Maintenance => "MAINTENANCE",
        }
    }

    /// The transitions that an operator may request from this state, in table order.
    pub fn available_transitions(self) -> Vec<Transition> {
        Transition::ALL.into_iter().filter(|t| t.operator_may_request() && t.target(self).is_some()).collect()
    }
}

/// A transition refused because the machine is in a state it does not start from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("transition {transition} is not valid while in {state} state; allowed: {}", allowed_list(.state))]
pub struct NotAllowed {
    pub transition: Transition,
    pub state: State,
}

fn allowed_list(state: &State) -> String {
    let names: Vec<&str> = state.available_transitions().iter().map(|t| t.as_str()).collect();
    if names.is_empty() { "none".into() } else { names.join(", ") }
}

/// Why a transition an operator asked for was not made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error(transparent)]
    NotAllowed(#[from] NotAllowed),
    /// `health_check` is the agent's own verdict.
    #[error("{0} is decided by the agent's health checks, not requested")]
    NotRequestable(Transition),
    #[error("no container named {container:?} is managed on {node}")]
    UnknownContainer { container: String, node: String },
    /// The machine or the agent is stopping.
    #[error("{0} is shutting down")]
    ShuttingDown(String),
}

/// Checks a transition against the table.
pub fn check(from: State, transition: Transition) -> Result<State, NotAllowed> {
    transition.target(from).ok_or(NotAllowed { transition, state: from })
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Transition {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Transition::ALL.into_iter().find(|t| t.as_str() == s).ok_or_else(|| {
            let names: Vec<&str> = Transition::ALL.iter().map(|t| t.as_str()).collect();
            format!("unknown transition {s:?}; known: {}", names.join(", "))
        })
    }
}

impl FromStr for State {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Run, Start, Restart, Update, Stop, Maintenance]
            .into_iter()
            .find(|st| st.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown state {s:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_matches_the_original_module() {
        assert_eq!(check(Run, Transition::Restart), Ok(Restart));
        assert_eq!(check(Update, Transition::Restart), Ok(Restart));
        assert_eq!(check(Start, Transition::HealthCheck), Ok(Run));
        assert_eq!(check(Stop, Transition::Maintenance), Ok(Maintenance));
        assert_eq!(check(Maintenance, Transition::Resume), Ok(Run));
        assert!(check(Maintenance, Transition::Restart).is_err());
        assert!(check(Stop, Transition::Stop).is_err());
        assert!(check(Update, Transition::Update).is_err());
    }

    #[test]
    fn refusal_lists_what_is_allowed() {
        let err = check(Maintenance, Transition::Stop).unwrap_err().to_string();
        assert_eq!(err, "transition stop is not valid while in MAINTENANCE state; allowed: resume");
        let err = check(Run, Transition::Resume).unwrap_err().to_string();
        assert_eq!(err, "transition resume is not valid while in RUN state; allowed: maintenance, restart, update, stop");
    }
}
