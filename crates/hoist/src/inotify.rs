//! `FileWatch` on inotify (the notify crate). Each file's parent directory is watched rather than the
//! file itself: editors and config management replace files by rename, which a watch on the old inode
//! would never see. A directory given as a path reports changes to anything inside it as itself.

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use hoist_core::files::FileWatch;
use notify::{EventKind, RecursiveMode, Watcher};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub struct Inotify;

/// One touch produces several inotify events (open, modify, close); they are gathered for this long
/// after the first and reported once per path. Nothing is dropped: a change made during the window is
/// part of the report, one made after it starts the next window.
const SETTLE: Duration = Duration::from_millis(300);

impl FileWatch for Inotify {
    fn watch(&self, paths: &[PathBuf]) -> BoxStream<'static, PathBuf> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<PathBuf>();
        let wanted: Vec<PathBuf> = paths.to_vec();
        let matcher = wanted.clone();
        let handler = move |res: notify::Result<notify::Event>| {
            let Ok(event) = res else { return };
            if !matches!(event.kind, EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)) {
                return;
            }
            for changed in &event.paths {
                if let Some(hit) = matcher.iter().find(|w| changed == *w || changed.parent() == Some(w.as_path())) {
                    let _ = tx.send(hit.clone());
                }
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
        settled(rx)
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

/// Each path once per settle window: wait for a first change, gather for `SETTLE`, report the set.
fn settled(rx: tokio::sync::mpsc::UnboundedReceiver<PathBuf>) -> BoxStream<'static, PathBuf> {
    futures_util::stream::unfold((rx, VecDeque::new()), |(mut rx, mut ready)| async move {
        if ready.is_empty() {
            let first = rx.recv().await?;
            tokio::time::sleep(SETTLE).await;
            ready.push_back(first);
            while let Ok(more) = rx.try_recv() {
                if !ready.contains(&more) {
                    ready.push_back(more);
                }
            }
        }
        let next = ready.pop_front()?;
        Some((next, (rx, ready)))
    })
    .boxed()
}
