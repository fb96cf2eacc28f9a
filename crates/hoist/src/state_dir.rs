//! The agent's own place on the node: `state_dir`, created with tight modes and locked so one agent
//! uses it, and the control socket's path, cleared only of a socket left by an agent that died.

use anyhow::Context;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// The agent's own directory: created if missing, readable only by its owner and group.
pub(crate) fn create_state_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750)))
        .with_context(|| format!("creating state_dir {}", dir.display()))
}

/// One agent per state_dir: two would fight over the same containers, machine state and store.
/// The lock is the kernel's, so it goes with the process however that ends; the file says who holds it.
pub(crate) fn lock_state_dir(dir: &Path) -> anyhow::Result<std::fs::File> {
    let path = dir.join("agent.lock");
    // The file is truncated below, so it must not be a link to someone else's.
    if let Ok(meta) = std::fs::symlink_metadata(&path)
        && !meta.file_type().is_file()
    {
        anyhow::bail!("{} is not a regular file; refusing to use it as the agent's lock: move it away", path.display());
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o640)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {
            file.set_len(0)
                .and_then(|()| writeln!(file, "{}", std::process::id()))
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(file)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => "whose pid is not written yet".to_string(),
                pid => format!("pid {pid}"),
            };
            anyhow::bail!(
                "another hoist agent ({holder}) is already running on state_dir {} (it holds {}); stop it first, or give this agent its own state_dir",
                dir.display(),
                path.display()
            )
        }
        Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("locking {}", path.display())),
    }
}

pub(crate) fn bind_control(socket: &Path, state_dir: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    clear_socket_path(socket, state_dir)?;
    let listener = tokio::net::UnixListener::bind(socket).with_context(|| format!("binding control socket {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("setting the mode of control socket {}", socket.display()))?;
    Ok(listener)
}

/// Makes way for the control socket, removing only what is certainly a socket left by an agent that
/// died: whatever else is at the path (a file, a directory, a link, a live socket) may be someone's,
/// and a directory other than state_dir is the operator's to create.
fn clear_socket_path(socket: &Path, state_dir: &Path) -> anyhow::Result<()> {
    let dir = socket.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.is_dir() {
        anyhow::bail!(
            "the directory {} of control.socket {} does not exist: create it, or put the socket in state_dir {} (the only directory hoist creates)",
            dir.display(),
            socket.display(),
            state_dir.display()
        );
    }
    let kind = match std::fs::symlink_metadata(socket) {
        Ok(meta) => meta.file_type(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("looking at control.socket {}", socket.display())),
    };
    if !kind.is_socket() {
        let what = if kind.is_symlink() {
            "a symbolic link"
        } else if kind.is_dir() {
            "a directory"
        } else if kind.is_file() {
            "a regular file"
        } else {
            "not a socket"
        };
        anyhow::bail!(
            "control.socket {} is {what}, not a socket left by a hoist agent; refusing to remove it: move it away, or set control.socket to a free path",
            socket.display()
        );
    }
    match std::os::unix::net::UnixStream::connect(socket) {
        Ok(_) => anyhow::bail!(
            "something is already answering on control.socket {} (another hoist agent?); stop it, or set control.socket to a free path",
            socket.display()
        ),
        // Nobody listens: the socket of an agent that died.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(socket).with_context(|| format!("removing the stale control socket {}", socket.display()))?;
            tracing::info!(socket = %socket.display(), "removed the control socket of an agent that is gone");
            Ok(())
        }
        Err(e) => Err(e).with_context(|| {
            format!("cannot tell whether control.socket {} is still in use; remove it yourself if no agent serves it", socket.display())
        }),
    }
}
