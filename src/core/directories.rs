//! Directories the operator configures (`--statistics-dir`, `--datasets-dir`) whose subdirectories a
//! request names: the name is resolved inside them and canonicalised, so a request never makes the server
//! read a path outside. The filesystem work here blocks; async callers run it through `blocking`.

use std::path::{Path, PathBuf};

use super::CoreError;

fn invalid(message: impl Into<String>) -> CoreError {
    CoreError::InvalidArgument(message.into())
}

/// The subdirectory `name` of `root`, the `what` configured with `flag`; never a path outside it.
pub fn subdirectory(root: Option<&Path>, name: &str, what: &str, flag: &str) -> Result<PathBuf, CoreError> {
    let root =
        root.ok_or_else(|| invalid(format!("no {what} is configured ({flag}); upload 'image' parts instead")))?;
    let root = root.canonicalize().map_err(|e| CoreError::Internal(format!("{what} {}: {e}", root.display())))?;
    let dir = root.join(name).canonicalize().map_err(|_| invalid(format!("no directory '{name}' in the {what}")))?;
    if !dir.starts_with(&root) || !dir.is_dir() {
        return Err(invalid(format!("'{name}' is not a directory inside the {what}")));
    }
    Ok(dir)
}

/// The file `name` inside `dir` (a path relative to it); never one outside it.
pub fn file_inside(dir: &Path, name: &str) -> Result<PathBuf, CoreError> {
    let path = dir.join(name).canonicalize().map_err(|_| invalid(format!("no file '{name}' in {}", dir.display())))?;
    if !path.starts_with(dir) || !path.is_file() {
        return Err(invalid(format!("'{name}' is not a file inside {}", dir.display())));
    }
    Ok(path)
}

/// The files of a directory, sorted, at most `most`.
pub fn files(dir: &Path, most: usize) -> Result<Vec<PathBuf>, CoreError> {
    let entries = std::fs::read_dir(dir).map_err(|e| CoreError::Internal(format!("{}: {e}", dir.display())))?;
    let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect();
    files.sort();
    if files.is_empty() {
        return Err(invalid(format!("{} holds no images", dir.display())));
    }
    if files.len() > most {
        return Err(invalid(format!("{} holds {} files; at most {most} are read", dir.display(), files.len())));
    }
    Ok(files)
}

/// Filesystem work, off the async runtime's threads.
pub async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, CoreError> + Send + 'static,
) -> Result<T, CoreError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| CoreError::Internal(format!("a blocking task failed: {e}")))?
}
