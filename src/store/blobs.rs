//! Content-addressed blobs on the local filesystem: `<root>/<first two hex digits>/<sha256>`. Written to
//! a temporary file, fsynced, then renamed, so a crash never leaves a partly written blob under its name.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use sha2::{Digest, Sha256};

use super::{BlobStore, StoreError};

pub struct FsBlobStore {
    root: PathBuf,
}

impl FsBlobStore {
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(root).map_err(|e| StoreError::Blob(format!("{}: {e}", root.display())))?;
        Ok(Self { root: root.to_path_buf() })
    }

    fn path(&self, sha256: &str) -> Result<PathBuf, StoreError> {
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(StoreError::MissingBlob(sha256.to_string()));
        }
        Ok(self.root.join(&sha256[..2]).join(sha256))
    }
}

#[async_trait]
impl BlobStore for FsBlobStore {
    async fn put(&self, bytes: Vec<u8>) -> Result<String, StoreError> {
        let sha256 = format!("{:x}", Sha256::digest(&bytes));
        let path = self.path(&sha256)?;
        tokio::task::spawn_blocking(move || write_atomically(&path, &bytes))
            .await
            .map_err(|e| StoreError::Blob(e.to_string()))??;
        Ok(sha256)
    }

    async fn get(&self, sha256: &str) -> Result<Vec<u8>, StoreError> {
        let path = self.path(sha256)?;
        match tokio::fs::read(&path).await {
            Ok(bytes) => Ok(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(StoreError::MissingBlob(sha256.to_string())),
            Err(e) => Err(StoreError::Blob(format!("{}: {e}", path.display()))),
        }
    }

    async fn sweep(&self, keep: &HashSet<String>) -> Result<(u64, u64), StoreError> {
        let (root, keep) = (self.root.clone(), keep.clone());
        tokio::task::spawn_blocking(move || sweep(&root, &keep)).await.map_err(|e| StoreError::Blob(e.to_string()))?
    }
}

fn sweep(root: &Path, keep: &HashSet<String>) -> Result<(u64, u64), StoreError> {
    let error = |path: &Path, e: std::io::Error| StoreError::Blob(format!("{}: {e}", path.display()));
    let (mut blobs, mut bytes) = (0, 0);
    for shard in std::fs::read_dir(root).map_err(|e| error(root, e))? {
        let shard = shard.map_err(|e| error(root, e))?.path();
        if !shard.is_dir() {
            continue;
        }
        for entry in std::fs::read_dir(&shard).map_err(|e| error(&shard, e))? {
            let path = entry.map_err(|e| error(&shard, e))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if keep.contains(name) {
                continue;
            }
            let size = path.metadata().map(|m| m.len()).unwrap_or(0);
            std::fs::remove_file(&path).map_err(|e| error(&path, e))?;
            (blobs, bytes) = (blobs + 1, bytes + size);
        }
    }
    Ok((blobs, bytes))
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    use std::io::Write;
    if path.exists() {
        return Ok(());
    }
    let error = |e: std::io::Error| StoreError::Blob(format!("{}: {e}", path.display()));
    let dir = path.parent().ok_or_else(|| StoreError::Blob("blob path has no parent".into()))?;
    std::fs::create_dir_all(dir).map_err(error)?;
    let tmp = dir.join(format!(".tmp-{}", uuid::Uuid::new_v4()));
    let mut file = std::fs::File::create(&tmp).map_err(error)?;
    file.write_all(bytes).map_err(error)?;
    file.sync_all().map_err(error)?;
    std::fs::rename(&tmp, path).map_err(error)?;
    // The rename is durable once the directory entry is.
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stores_by_content_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).unwrap();
        let id = store.put(b"hello".to_vec()).await.unwrap();
        assert_eq!(id, "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
        assert_eq!(store.put(b"hello".to_vec()).await.unwrap(), id);
        assert_eq!(store.get(&id).await.unwrap(), b"hello");
        assert!(matches!(store.get(&"0".repeat(64)).await, Err(StoreError::MissingBlob(_))));
        assert!(matches!(store.get("../etc/passwd").await, Err(StoreError::MissingBlob(_))));
        // No temporary file is left beside the blob.
        let leftovers = std::fs::read_dir(dir.path().join(&id[..2])).unwrap().count();
        assert_eq!(leftovers, 1);
    }

    #[tokio::test]
    async fn sweeps_what_nothing_refers_to() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).unwrap();
        let kept = store.put(b"kept".to_vec()).await.unwrap();
        let dropped = store.put(b"dropped".to_vec()).await.unwrap();
        std::fs::write(dir.path().join(&kept[..2]).join(".tmp-crashed"), b"half").unwrap();
        let keep: HashSet<String> = [kept.clone()].into();
        assert_eq!(store.sweep(&keep).await.unwrap(), (2, 7 + 4));
        assert_eq!(store.get(&kept).await.unwrap(), b"kept");
        assert!(matches!(store.get(&dropped).await, Err(StoreError::MissingBlob(_))));
    }
}
