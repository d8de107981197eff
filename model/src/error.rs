//! Errors of the model crate. None of them is retryable: they describe a checkpoint, a config or a
//! caller bug, and retrying the same call gives the same answer.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config field is missing, has the wrong type, or contradicts another one.
    #[error("config field `{field}`: {reason}")]
    Config { field: String, reason: String },

    #[error("checkpoint tensor `{key}` is missing (looked in {where_})")]
    MissingTensor { key: String, where_: String },

    #[error("checkpoint tensor `{key}` has shape {found:?}, the config implies {expected:?}")]
    ShapeMismatch { key: String, expected: Vec<usize>, found: Vec<usize> },

    #[error("checkpoint tensor `{key}` has dtype {dtype}, only BF16, F16 and F32 are supported")]
    UnsupportedDtype { key: String, dtype: String },

    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },

    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    /// The caller asked for something the model cannot do (a token id past the vocabulary, a
    /// sequence that does not fit its cache...).
    #[error("invalid input: {0}")]
    Input(String),

    /// An expert backend (local or remote) failed to compute a layer's experts.
    #[error("experts of layer {layer}: {reason}")]
    Experts { layer: usize, reason: String },

    /// Some experts have no live host, even after the backend waited for one: retrying at once
    /// cannot help; the cluster has to heal first.
    #[error("experts of layer {layer} unavailable: {reason}")]
    ExpertsUnavailable { layer: usize, reason: String },

    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

impl Error {
    pub(crate) fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Config { field: field.into(), reason: reason.into() }
    }

    pub(crate) fn checkpoint(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Checkpoint { path: path.into(), reason: reason.into() }
    }
}
