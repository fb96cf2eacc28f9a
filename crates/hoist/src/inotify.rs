//! `FileWatch` on inotify (the notify crate). Each file's parent directory is watched rather than the
//! file itself: editors and config management replace files by rename, which a watch on the old inode
//! would never see. A directory given as a path reports changes to anything inside it as itself.

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use hoist_core::files::FileWatch;
use notify::{EventKind, RecursiveMode, Watcher};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub struct Inotify;

/// One touch produces several inotify events (open, attrib, close); report it once.
const SETTLE: Duration = Duration::from_millis(300);

impl FileWatch for Inotify {
    fn watch(&self, paths: &[PathBuf]) -> BoxStream<'static, PathBuf> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<PathBuf>();
        let wanted: Vec<PathBuf> = paths.to_vec();
        let matcher = wanted.clone();
        let mut last_sent: HashMap<PathBuf, Instant> = HashMap::new();
        let handler = move |res: notify::Result<notify::Event>| {
            let Ok(event) = res else { return };
            if !matches!(event.kind, EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)) {
                return;
            }
            for changed in &event.paths {
                let Some(hit) = matcher.iter().find(|w| changed == *w || changed.parent() == Some(w.as_path())) else { continue };
                let now = Instant::now();
                if last_sent.get(hit).is_some_and(|t| now.duration_since(*t) < SETTLE) {
                    continue;
                }
                last_sent.insert(hit.clone(), now);
                let _ = tx.send(hit.clone());
            }
        };
        let watcher = match notify::recommended_watcher(handler) {
            Ok(mut w) => {
                for dir in directories_to_watch(&wanted) {
                    if let Err(e) = w.watch(&dir, RecursiveMode::NonRecursive) {
                        tracing::warn!(path = %dir.display(), error = %e, "cannot watch");
                    }
                }
                Some(w)
            }
            Err(e) => {
                tracing::warn!(error = %e, "file watching unavailable");
                None
            }
        };
        // The stream owns the watcher: dropping the stream stops the watch.
        tokio_stream_from(rx)
            .map(move |p| {
                let _keep = &watcher;
                p
            })
            .boxed()
    }
}

fn directories_to_watch(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        paths.iter().map(|p| if p.is_dir() { p.clone() } else { p.parent().unwrap_or(Path::new("/")).to_path_buf() }).collect();
    dirs.sort();
    dirs.dedup();
    dirs
}

fn tokio_stream_from(mut rx: tokio::sync::mpsc::UnboundedReceiver<PathBuf>) -> BoxStream<'static, PathBuf> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}
