//! Errors of the shared-memory segment and its rings.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    /// Creating, opening or mapping the file failed.
    #[error("shared-memory file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    /// The file exists but must not be used: wrong owner or mode, wrong nonce, a header that does
    /// not describe this file, a name that is not one of ours.
    #[error("shared-memory file {path} refused: {reason}")]
    Refused { path: PathBuf, reason: String },

    /// A ring size that is not a multiple of 8 bytes in [4 KiB, 1 GiB].
    #[error("ring size {0} bytes: must be a multiple of 8 between 4096 and 1 GiB")]
    RingSize(usize),

    /// The message can never fit the ring: the caller sends it another way.
    #[error("a message of {len} bytes does not fit the shared-memory ring (at most {max} bytes)")]
    TooLarge { len: usize, max: usize },

    /// The ring had no room for the message before the deadline (the consumer stopped reading).
    #[error("no room in the shared-memory ring before the deadline")]
    Full,

    /// One side closed the segment (the link ended).
    #[error("the shared-memory link is closed")]
    Closed,

    /// Positions or a record header read from the mapping do not add up.
    #[error("the shared-memory ring is corrupt: {0}")]
    Corrupt(String),
}

impl ShmError {
    /// Whether the same message can go through this segment later: only a full ring may drain.
    /// Every other error ends the segment's use (a message too large is sent another way).
    pub fn retryable(&self) -> bool {
        matches!(self, ShmError::Full)
    }
}
