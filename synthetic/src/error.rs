//! Errors of writing a synthetic checkpoint. None is retryable: they name a bad argument or a
//! file-system failure.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{} already holds a checkpoint (use --force to overwrite)", .0.display())]
    AlreadyExists(PathBuf),

    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    #[error("writing {}: {source}", path.display())]
    Json { path: PathBuf, source: serde_json::Error },

    /// A `--router-skew` that cannot be parsed or reached.
    #[error("{0}")]
    Skew(String),

    #[error(transparent)]
    Model(#[from] epserve_model::Error),

    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}
