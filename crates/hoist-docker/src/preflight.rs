//! `Runtime::preflight` on the engine: create the preflight container, start it, wait for its exit
//! (killed at the timeout), read the tail of its logs, and remove it whatever happened.

use crate::{DockerRuntime, create_body, runtime_error, status};
use bollard::query_parameters::{CreateContainerOptionsBuilder, LogsOptionsBuilder, WaitContainerOptionsBuilder};
use futures_util::StreamExt;
use hoist_core::preflight::{OUTPUT_TAIL_LINES, Run};
use hoist_core::runtime::{Runtime, RuntimeError, RuntimeResult};
use hoist_core::spec::ContainerSpec;
use std::time::Duration;

impl DockerRuntime {
    pub(crate) async fn run_preflight(&self, spec: &ContainerSpec, timeout: Duration) -> RuntimeResult<Run> {
        let docker = self.client().await?;
        let create = || {
            let options = CreateContainerOptionsBuilder::default().name(&spec.container_name).build();
            docker.create_container(Some(options), create_body(spec))
        };
        let id = match create().await {
            // A leftover of an earlier run (the agent died mid-run, before the purge got to it).
            Err(e) if status(&e) == Some(409) => {
                self.reclaim_name(spec).await?;
                create().await
            }
            other => other,
        }
        .map_err(|e| match status(&e) {
            Some(404) => RuntimeError::ImageNotFound(spec.image_ref()),
            _ => runtime_error(e),
        })?
        .id;
        let outcome = self.wait_out(&id, timeout).await;
        // Removed on every path, a failed start and a timeout included (a kill, as the removal forces).
        let removed = self.remove(&id).await;
        let run = outcome?;
        removed?;
        Ok(run)
    }

    async fn wait_out(&self, id: &str, timeout: Duration) -> RuntimeResult<Run> {
        let docker = self.client().await?;
        docker.start_container(id, None).await.map_err(runtime_error)?;
        let options = WaitContainerOptionsBuilder::default().condition("not-running").build();
        let mut wait = docker.wait_container(id, Some(options));
        // The wait answers with an error for a non-zero exit; the exit code is read from the state.
        let finished = tokio::time::timeout(timeout, wait.next()).await.is_ok();
        let exit_code = match finished {
            true => docker.inspect_container(id, None).await.map_err(runtime_error)?.state.and_then(|s| s.exit_code),
            false => None,
        };
        let logs = LogsOptionsBuilder::default().stdout(true).stderr(true).tail(&OUTPUT_TAIL_LINES.to_string()).build();
        let mut output = String::new();
        let mut lines = docker.logs(id, Some(logs));
        while let Ok(Some(Ok(chunk))) = tokio::time::timeout(Duration::from_secs(5), lines.next()).await {
            output.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
        }
        Ok(Run { exit_code, output })
    }
}
