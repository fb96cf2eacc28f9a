//! File-change notification as the machines need it for `restart_files`. The binary implements it
//! with inotify (notify crate); the core only consumes the stream.

use futures_util::stream::BoxStream;
use std::path::PathBuf;

pub trait FileWatch: Send + Sync + 'static {
    /// Yields a path each time one of `paths` is created, written, touched or replaced by rename.
    fn watch(&self, paths: &[PathBuf]) -> BoxStream<'static, PathBuf>;
}
