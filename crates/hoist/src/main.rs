//! `hoist`: the per-node container manager's one binary — the agent and every CLI command.

mod agent;
mod control;
mod fleet;
mod follow;
mod inotify;
mod kv_access;
mod logs;
mod metrics;
mod node_claim;
mod output;
mod release;
mod rollout;
mod state_dir;
mod store_commands;
mod ui;

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand};
use control::client::ControlClient;
use futures_util::StreamExt;
use hoist_core::config::{AgentConfig, DEFAULT_AGENT_FILE, LOCAL_SYSLOG_SOCKETS, load_containers, syslog_warning};
use hoist_core::fleet::Operation;
use hoist_core::fsm::Transition;
use serde::Serialize;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "hoist",
    version,
    about = "Keeps a node's declared Docker containers running, healthy and up to date",
    long_about = "Keeps a node's declared Docker containers running, healthy and up to date.\n\n\
        One `hoist agent` per machine (the hoist.service unit) runs the containers declared in its data \
        files; the other commands talk to that agent through its control socket, or to the fleet's NATS. \
        The agent reads /etc/hoist/hoist.yaml (--config, HOIST_CONFIG), its container data from \
        /etc/hoist/containers.d (the file's `data`), keeps its state in /var/lib/hoist (`state_dir`) and \
        reloads the data on SIGHUP (systemctl reload hoist)."
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Global {
    /// The agent file.
    #[arg(long, short, global = true, env = "HOIST_CONFIG", default_value = DEFAULT_AGENT_FILE)]
    config: PathBuf,
    /// The agent's control socket (default: control.socket from the agent file).
    #[arg(long, global = true, env = "HOIST_SOCKET")]
    socket: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent on this node.
    Agent,
    /// Show each container's state, version and health, with summaries.
    Status {
        /// Only this container (its name in the data files, e.g. `web`).
        container: Option<String>,
        #[command(flatten)]
        fleet: fleet::FleetArgs,
    },
    /// Ask a container's machine for a transition: stop, restart, update, maintenance or resume.
    #[command(after_long_help = transitions_help())]
    Transition {
        /// The container, by its name in the data files (e.g. `web`).
        container: String,
        /// What to do (an operator may not ask for `health_check`: that is the agent's verdict).
        #[arg(value_parser = transition_parser())]
        transition: Transition,
        /// Follow the container until it settles (RUN, or MAINTENANCE after stop), printing progress;
        /// fails if it does not within LIMIT (default 10m) or settles with a condition such as a rollback.
        #[arg(long, value_name = "LIMIT", num_args = 0..=1, default_missing_value = "10m", value_parser = humantime::parse_duration)]
        wait: Option<Duration>,
        #[command(flatten)]
        fleet: fleet::FleetArgs,
    },
    /// Stream state changes as they happen.
    Watch {
        /// Every node's changes (NATS backend), not only this node's.
        #[arg(long)]
        fleet: bool,
    },
    /// Endpoints registered by `register_ports` (the CHORIA_SERVICES bucket).
    Services {
        /// Only this service.
        service: Option<String>,
    },
    /// Print the agent's Prometheus metrics (the same text as `/metrics`).
    Metrics,
    /// Check container data files and print what would run.
    Validate {
        /// Data files or directories (default: `data` from the agent file).
        files: Vec<PathBuf>,
    },
    /// The key-value store.
    #[command(subcommand)]
    Kv(store_commands::KvCommand),
    /// Release a tag to the fleet pinned to its digest (`hoist release web v2`), or show or abort a
    /// container's release.
    Release(release::ReleaseArgs),
    /// Rollouts across the fleet, from the nodes' status records.
    #[command(subcommand)]
    Rollout(rollout::RolloutCommand),
    /// Governors: fleet-wide limits on concurrent pulls and restarts.
    #[command(subcommand)]
    Governor(store_commands::GovernorCommand),
    /// Operator keys that sign fleet requests.
    #[command(subcommand)]
    Key(KeyCommand),
    /// The nodes of the fleet, as they announce themselves in HOIST_NODES (NATS backend).
    #[command(subcommand)]
    Node(NodeCommand),
    /// Serve a read-only live web view of this node (control socket) or the fleet (NATS backend).
    Ui {
        /// The address to listen on; one other than loopback needs a token.
        #[arg(long, value_name = "ADDRESS", default_value = ui::DEFAULT_LISTEN)]
        listen: std::net::SocketAddr,
        /// A file whose first line is the token every request must then carry (`Authorization:
        /// Bearer` or `?token=`); without it, the token is HOIST_UI_TOKEN if set.
        #[arg(long, value_name = "PATH")]
        token_file: Option<PathBuf>,
    },
    /// Print the shell completion script for SHELL (the Debian package installs them).
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the hoist(1) man page (roff); with --dir, write it and one page per subcommand there.
    Man {
        /// Write hoist.1 and hoist-SUBCOMMAND.1 pages into this directory instead.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Every node remembered, when it last announced itself and whether it is alive.
    Ls,
    /// Stop listing a dead node (one removed for good), so fleet commands no longer report it missing.
    Forget {
        /// The node's name, as `node ls` lists it.
        node: String,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Write a new operator key (an nkey seed) to FILE, readable by you only, and print its public key.
    New {
        /// Where to write the seed (never replaced if it exists).
        file: PathBuf,
    },
}

/// The transitions an operator may ask for, each with what it does, for `transition --help`.
fn transition_parser() -> impl clap::builder::TypedValueParser<Value = Transition> {
    use clap::builder::TypedValueParser;
    // `health_check` is parsed but not listed: the agent's refusal says why it is not asked for.
    let values = Transition::ALL
        .into_iter()
        .map(|t| clap::builder::PossibleValue::new(t.as_str()).help(t.describe()).hide(!t.operator_may_request()));
    clap::builder::PossibleValuesParser::new(values).map(|name| name.parse::<Transition>().expect("a listed transition"))
}

/// Where each transition may be asked for, from the machine's table.
fn transitions_help() -> String {
    let mut out = String::from("Allowed from:\n");
    for t in Transition::ALL.into_iter().filter(|t| t.operator_may_request()) {
        let from: Vec<&str> = hoist_core::fsm::State::ALL.into_iter().filter(|s| t.target(*s).is_some()).map(|s| s.as_str()).collect();
        out.push_str(&format!("  {:<12} {}\n", t.as_str(), from.join(", ")));
    }
    out
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            // Errors often carry the agent's or a backend's words.
            eprintln!("hoist: {}", output::clean_lines(&format!("{e:#}")));
            // A refused transition says why in its exit code too.
            e.downcast_ref::<control::client::Refusal>().map_or(ExitCode::FAILURE, |r| ExitCode::from(r.exit_code()))
        }
    }
}

/// The agent file, or the built-in defaults when the default file does not exist.
fn agent_config(global: &Global) -> anyhow::Result<AgentConfig> {
    if global.config.as_path() == std::path::Path::new(DEFAULT_AGENT_FILE) && !global.config.exists() {
        return Ok(AgentConfig::defaults());
    }
    AgentConfig::load(&global.config).map_err(|e| anyhow::anyhow!("{e}"))
}

fn client(global: &Global) -> anyhow::Result<ControlClient> {
    let socket = match &global.socket {
        Some(s) => s.clone(),
        None => agent_config(global)?.control.socket,
    };
    Ok(ControlClient::new(socket))
}

/// Human output is cleaned of control characters once more as a whole, whatever its parts did.
fn print<T: Serialize>(json: bool, value: &T, human: impl FnOnce(&T) -> String) {
    if json {
        println!("{}", serde_json::to_string_pretty(value).expect("serialises"));
    } else {
        print!("{}", output::clean_lines(&human(value)));
    }
}

/// One item of a stream: with `--json`, one compact JSON document per line (NDJSON) so it can be piped.
fn print_line<T: Serialize>(json: bool, value: &T, human: impl FnOnce(&T) -> String) {
    if json {
        println!("{}", serde_json::to_string(value).expect("serialises"));
    } else {
        println!("{}", output::clean_lines(&human(value)));
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let g = &cli.global;
    match cli.command {
        Command::Agent => {
            logs::init();
            agent::run(agent_config(g)?).await?;
        }
        Command::Status { container, fleet } if fleet.wanted() => {
            let answer = fleet::ask(&agent_config(g)?, &fleet, container.as_deref(), Operation::Status).await?;
            let answered: Vec<_> = answer.replies.iter().filter(|r| r.refused.is_none()).map(|r| &r.status).collect();
            print(g.json, &output::WithSummaries::new(&answer, &answered), |a| fleet::render(a.status));
            if fleet::incomplete(&answer) {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Status { container, .. } => {
            let status = client(g)?.status(container.as_deref()).await?;
            if let Some(c) = &container {
                anyhow::ensure!(!status.machines.is_empty(), "no container named {c:?} is managed on {}", status.node);
            }
            print(g.json, &output::WithSummaries::new(&status, &[&status]), |s| output::status(std::slice::from_ref(s.status)));
        }
        Command::Transition { container, transition, wait, fleet } if fleet.wanted() => {
            anyhow::ensure!(wait.is_none(), "--wait follows this node's agent only; follow a fleet with `hoist watch --fleet`");
            let answer = fleet::ask(&agent_config(g)?, &fleet, Some(&container), Operation::Transition { transition }).await?;
            print(g.json, &answer, fleet::render);
            let refused = answer.replies.iter().flat_map(|r| &r.transitions).any(|t| t.error.is_some());
            if refused || fleet::incomplete(&answer) {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Transition { container, transition, wait: Some(limit), .. } => {
            let client = client(g)?;
            client.transition(&container, transition).await?;
            return follow::until_settled(&client, &container, transition, limit, g.json).await;
        }
        Command::Transition { container, transition, .. } => {
            let state = client(g)?.transition(&container, transition).await?;
            print(g.json, &serde_json::json!({"container": container, "transition": transition, "state": state}), |_| {
                format!("{container}: {transition} → {state}\n")
            });
        }
        Command::Watch { fleet } => {
            let mut events = if fleet { fleet::watch(&agent_config(g)?).await? } else { client(g)?.watch().await? };
            while let Some(e) = events.next().await {
                print_line(g.json, &e, output::event);
            }
        }
        Command::Services { service } => store_commands::services(g, &client(g)?, service.as_deref()).await?,
        Command::Metrics => print!("{}", output::clean_lines(&client(g)?.metrics().await?)),
        Command::Validate { files } => return validate(g, files),
        Command::Kv(cmd) => {
            let access = kv_access::KvAccess::open(&agent_config(g)?, g.socket.clone()).await?;
            store_commands::kv(g, access.kv(), cmd).await.map_err(|e| access.explain(e))?
        }
        Command::Rollout(cmd) => {
            let access = kv_access::KvAccess::open(&agent_config(g)?, g.socket.clone()).await?;
            return rollout::run(&access, cmd, g.json).await.map_err(|e| access.explain(e));
        }
        Command::Release(args) => {
            let cfg = agent_config(g)?;
            let access = kv_access::KvAccess::open(&cfg, g.socket.clone()).await?;
            release::run(&cfg, &access, args, g.json).await.map_err(|e| access.explain(e))?
        }
        Command::Governor(cmd) => store_commands::governor(g, &client(g)?, cmd).await?,
        Command::Node(NodeCommand::Ls) => {
            let nodes = fleet::nodes(&agent_config(g)?).await?;
            print(g.json, &nodes, |n| fleet::render_nodes(n));
        }
        Command::Node(NodeCommand::Forget { node }) => {
            let seen = fleet::forget(&agent_config(g)?, &node).await?;
            print(g.json, &seen, |s| format!("forgot node {} (last seen {})\n", s.node, fleet::when(s.last_seen)));
        }
        Command::Ui { listen, token_file } => ui::run(agent_config(g)?, g.socket.clone(), listen, token_file).await?,
        Command::Completions { shell } => {
            // Rendered whole first: the generator panics on a write error such as a closed pipe.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "hoist", &mut script);
            std::io::Write::write_all(&mut std::io::stdout(), &script)?;
        }
        Command::Man { dir: None } => clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?,
        Command::Man { dir: Some(dir) } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(Cli::command(), &dir).with_context(|| format!("writing man pages into {}", dir.display()))?;
        }
        Command::Key(KeyCommand::New { file }) => {
            let key = nkeys::KeyPair::new_user();
            hoist_core::fleet_auth::write_seed(&file, &key).map_err(|e| anyhow::anyhow!("{e} (an existing key is never replaced)"))?;
            let public = key.public_key();
            print(g.json, &serde_json::json!({"file": file, "public_key": public}), |_| {
                format!(
                    "{public}\nThe secret seed is in {}; keep it there. List the public key above in each agent file, e.g.\n  fleet: {{ operators: [ {{ name: YOU, key: {public}, allow: [status, transition] }} ] }}\nand sign with --key {0}, HOIST_KEY or fleet.key.\n",
                    file.display()
                )
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn validate(g: &Global, files: Vec<PathBuf>) -> anyhow::Result<ExitCode> {
    let cfg = agent_config(g)?;
    let files = if files.is_empty() { cfg.data.clone() } else { files };
    match load_containers(&files, &cfg.facts()) {
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("{} error(s); nothing would change", errors.0.len());
            Ok(ExitCode::FAILURE)
        }
        Ok(set) => {
            // On stderr, so the JSON and the `docker run` lines stay clean for scripts.
            let docker_host = std::env::var("DOCKER_HOST").ok();
            if let Some(warning) = syslog_warning(&set, &cfg.docker, docker_host.as_deref(), &LOCAL_SYSLOG_SOCKETS) {
                eprintln!("warning: {warning}");
            }
            if g.json {
                println!("{}", serde_json::to_string_pretty(&set).expect("serialises"));
                return Ok(ExitCode::SUCCESS);
            }
            for (name, c) in &set.containers {
                match c.ensure {
                    hoist_core::config::Ensure::Absent => println!("# {name}: ensure absent, would be removed"),
                    hoist_core::config::Ensure::Present => {
                        let note = if c.kv_update {
                            " (the KV key container/".to_string() + name + "/tag may override the tag)"
                        } else {
                            String::new()
                        };
                        println!("# {name}{note}");
                        let spec = c.spec(&cfg.node, &cfg.docker, &c.image_tag);
                        println!("{}", spec.docker_run());
                        if let Some(check) = &c.preflight {
                            let timeout = humantime::format_duration(check.timeout);
                            println!("# {name}: preflight of every new version before it replaces this one (timeout {timeout}):");
                            println!("{}", hoist_core::preflight::docker_run(&spec, &check.command));
                        }
                    }
                }
            }
            println!("# purge: {}", if set.purge { "on (undeclared hoist containers are removed)" } else { "off" });
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every command and every argument a user can type says what it is for, in `--help` and the man pages.
    #[test]
    fn every_command_and_argument_has_a_help_text() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments().filter(|a| !matches!(a.get_id().as_str(), "help" | "version")) {
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} <{}>", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
                let path = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() && sub.get_long_about().is_none() {
                    missing.push(path.clone());
                }
                walk(sub, &path, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "hoist", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
    }

    #[test]
    fn transition_help_lists_each_transition_and_where_it_applies() {
        let mut cmd = Cli::command();
        let help = cmd.find_subcommand_mut("transition").expect("transition").render_long_help().to_string();
        for t in ["stop", "restart", "update", "maintenance", "resume"] {
            let t: Transition = t.parse().unwrap();
            assert!(help.contains(t.describe()), "{t} is described: {help}");
        }
        assert!(help.contains("resume       MAINTENANCE"), "{help}");
        assert!(!help.contains(Transition::HealthCheck.describe()), "not an operator's transition: {help}");
        assert!(Cli::try_parse_from(["hoist", "transition", "web", "restart"]).is_ok());
        assert!(Cli::try_parse_from(["hoist", "transition", "web", "reboot"]).is_err());
    }
}
