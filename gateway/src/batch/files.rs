//! The Files API's store: uploaded batch inputs and the batches' output and error files, on disk
//! under `<data-dir>/files/`.
//!
//! Each file is two entries, `<id>.data` (the bytes) and `<id>.meta.json` (its [`FileObject`]), each
//! written whole by [`write_atomic`]: a temporary file in the same directory, `fsync`, `rename` over
//! the name, `fsync` of the directory. The metadata is written last and removed first, so a file
//! exists exactly when its metadata does; a crash between the two leaves an orphan `.data` (or a
//! `.tmp-*`), which [`FileStore::open`] removes. Temp-file + rename rather than an embedded database
//! (redb): files are write-once blobs up to 200 MB read back whole, which a database would only copy
//! into its pages, and the directory stays inspectable with `ls` and `cat` by an operator.
//!
//! The calls block (file I/O); async callers run them under `tokio::task::spawn_blocking`.

use std::collections::hash_map::RandomState;
use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Upload purpose of a batch input (the only one accepted from clients).
pub const PURPOSE_BATCH: &str = "batch";
/// Purpose of the files a batch writes (its output and error files).
pub const PURPOSE_BATCH_OUTPUT: &str = "batch_output";

/// A file as the Files API describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileObject {
    pub id: String,
    pub object: String,
    pub bytes: u64,
    pub created_at: u64,
    pub filename: String,
    pub purpose: String,
    /// Deprecated by OpenAI but still in its schema: always `processed` here (a file is stored
    /// whole or not at all).
    #[serde(default = "processed")]
    pub status: String,
}

fn processed() -> String {
    "processed".into()
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no such file: {0}")]
    NotFound(String),
    #[error("file store I/O on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("file store metadata {path} is unreadable: {source}")]
    Corrupt { path: PathBuf, source: serde_json::Error },
}

/// The files of one gateway's data directory.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
}

impl FileStore {
    /// Opens (creating it if needed) `<data_dir>/files`, and removes what an interrupted write left.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let dir = data_dir.join("files");
        fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        let store = FileStore { dir };
        for entry in fs::read_dir(&store.dir).map_err(io_at(&store.dir))? {
            let entry = entry.map_err(io_at(&store.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let orphan = match name.strip_suffix(".data") {
                Some(id) => !store.meta_path(id).exists(),
                None => name.starts_with(".tmp-"),
            };
            if orphan {
                let path = entry.path();
                fs::remove_file(&path).map_err(io_at(&path))?;
            }
        }
        Ok(store)
    }

    /// Stores `content` as a new file and returns its description.
    pub fn create(&self, filename: &str, purpose: &str, content: &[u8]) -> Result<FileObject, StoreError> {
        self.write(&new_id("file"), filename, purpose, content)
    }

    /// Stores `content` under `id` (one [`new_id`] made), replacing a file of that id: the batch
    /// runner picks its output files' ids first and records them, so that writing them again after
    /// a crash makes the same files, not new ones.
    pub fn write(&self, id: &str, filename: &str, purpose: &str, content: &[u8]) -> Result<FileObject, StoreError> {
        if !valid_id(id) {
            return Err(StoreError::NotFound(id.into()));
        }
        let file = FileObject {
            id: id.into(),
            object: "file".into(),
            bytes: content.len() as u64,
            created_at: unix_now(),
            filename: filename.into(),
            purpose: purpose.into(),
            status: processed(),
        };
        let data = self.data_path(&file.id);
        write_atomic(&data, content).map_err(io_at(&data))?;
        let meta = self.meta_path(&file.id);
        let json = serde_json::to_vec(&file).expect("a FileObject serialises");
        write_atomic(&meta, &json).map_err(io_at(&meta))?;
        Ok(file)
    }

    pub fn get(&self, id: &str) -> Result<FileObject, StoreError> {
        if !valid_id(id) {
            return Err(StoreError::NotFound(id.into()));
        }
        let path = self.meta_path(id);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::NotFound(id.into())),
            Err(e) => return Err(StoreError::Io { path, source: e }),
        };
        serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt { path, source })
    }

    /// The bytes of a file.
    pub fn content(&self, id: &str) -> Result<Vec<u8>, StoreError> {
        self.get(id)?;
        let path = self.data_path(id);
        fs::read(&path).map_err(io_at(&path))
    }

    /// Removes a file; its description is what was removed.
    pub fn delete(&self, id: &str) -> Result<FileObject, StoreError> {
        let file = self.get(id)?;
        for path in [self.meta_path(id), self.data_path(id)] {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::Io { path, source: e }),
            }
        }
        Ok(file)
    }

    /// Every file (of `purpose`, if given), newest first.
    pub fn list(&self, purpose: Option<&str>) -> Result<Vec<FileObject>, StoreError> {
        let mut files = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_at(&self.dir))? {
            let entry = entry.map_err(io_at(&self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".meta.json") else { continue };
            match self.get(id) {
                Ok(file) if purpose.is_none_or(|p| p == file.purpose) => files.push(file),
                Ok(_) | Err(StoreError::NotFound(_)) => {} // another purpose, or deleted meanwhile
                Err(e) => return Err(e),
            }
        }
        files.sort_by(|a, b| b.created_at.cmp(&a.created_at).then_with(|| b.id.cmp(&a.id)));
        Ok(files)
    }

    fn meta_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.meta.json"))
    }

    fn data_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.data"))
    }
}

/// Writes `bytes` to `path` so that a reader (or a restart after a crash) sees the old content or
/// the new, never a part: temporary file in the same directory, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().ok_or_else(|| io::Error::other("path has no directory"))?;
    let name = path.file_name().ok_or_else(|| io::Error::other("path has no file name"))?;
    let tmp = dir.join(format!(".tmp-{}-{}", std::process::id(), name.to_string_lossy()));
    let result = (|| {
        let mut file = fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// A fresh identifier, `<prefix>-` and 24 hex digits (time, a counter and the process's random
/// hasher keys: unique across restarts and gateways sharing a directory).
pub fn new_id(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u128(nanos);
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u32(std::process::id());
    format!("{prefix}-{:08x}{:016x}", (nanos as u64) & 0xffff_ffff, hasher.finish())
}

/// Whether `id` is one [`new_id`] could have made (and so names no path outside the store).
pub fn valid_id(id: &str) -> bool {
    id.split_once('-').is_some_and(|(prefix, hex)| {
        !prefix.is_empty()
            && prefix.bytes().all(|b| b.is_ascii_lowercase())
            && hex.len() == 24
            && hex.bytes().all(|b| b.is_ascii_hexdigit())
    })
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_owned(), source }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("epserve-files-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn create_read_list_delete() {
        let dir = scratch("crud");
        let store = FileStore::open(&dir).expect("store I/O");
        let a = store.create("in.jsonl", PURPOSE_BATCH, b"line\n").expect("store I/O");
        let b = store.create("out.jsonl", PURPOSE_BATCH_OUTPUT, b"").expect("store I/O");
        assert!(valid_id(&a.id) && a.id.starts_with("file-") && a.id != b.id);
        assert_eq!((a.bytes, a.object.as_str()), (5, "file"));
        assert_eq!(store.get(&a.id).expect("store I/O"), a);
        assert_eq!(store.content(&a.id).expect("store I/O"), b"line\n");
        assert_eq!(store.list(Some(PURPOSE_BATCH)).expect("store I/O"), std::slice::from_ref(&a));
        assert_eq!(store.list(None).expect("store I/O").len(), 2);
        // A reopened store (a restarted gateway) sees the same files.
        let reopened = FileStore::open(&dir).expect("store I/O");
        assert_eq!(reopened.get(&b.id).expect("store I/O"), b);
        assert_eq!(store.delete(&a.id).expect("store I/O"), a);
        assert!(matches!(store.get(&a.id), Err(StoreError::NotFound(_))));
        assert!(matches!(store.content(&a.id), Err(StoreError::NotFound(_))));
        fs::remove_dir_all(&dir).expect("store I/O");
    }

    #[test]
    fn ids_cannot_escape_the_store() {
        let dir = scratch("ids");
        let store = FileStore::open(&dir).expect("store I/O");
        for id in ["../etc/passwd", "file-", "file-../../x", "FILE-0123456789abcdef01234567", ""] {
            assert!(!valid_id(id), "{id}");
            assert!(matches!(store.get(id), Err(StoreError::NotFound(_))), "{id}");
        }
        fs::remove_dir_all(&dir).expect("store I/O");
    }

    #[test]
    fn open_removes_what_an_interrupted_write_left() {
        let dir = scratch("orphans");
        let store = FileStore::open(&dir).expect("store I/O");
        let kept = store.create("a", PURPOSE_BATCH, b"x").expect("store I/O");
        // Data written, metadata never: the upload never happened.
        fs::write(dir.join("files/file-0123456789abcdef01234567.data"), b"partial").expect("store I/O");
        fs::write(dir.join("files/.tmp-1-file-x.meta.json"), b"{").expect("store I/O");
        let store = FileStore::open(&dir).expect("store I/O");
        let mut names: Vec<_> = fs::read_dir(dir.join("files"))
            .expect("store I/O")
            .map(|e| e.expect("store I/O").file_name().into_string().expect("store I/O"))
            .collect();
        names.sort();
        assert_eq!(names, [format!("{}.data", kept.id), format!("{}.meta.json", kept.id)]);
        assert_eq!(store.list(None).expect("store I/O"), [kept]);
        fs::remove_dir_all(&dir).expect("store I/O");
    }
}
