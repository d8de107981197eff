//! Errors of the model crate, and whether trying again can help ([`Error::retry`]).
//!
//! The model's own errors never can: they describe a checkpoint, a config, an input or a caller
//! bug, and the same call gives the same answer (a candle error in the forward pass included: the
//! computation is deterministic). Only an expert backend — the coordinator's transports, whose
//! workers can be lost or late — reports failures that another attempt may get past; it says so in
//! the [`ExpertsError`] it returns, and the serving engine retries exactly those.

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

    /// The routed experts of a layer could not be computed: by the backend (local or remote), or
    /// because the router or the backend's answer was unusable. The message includes the cause,
    /// which is therefore not also the `source()` (an error chain would print it twice).
    #[error("experts of layer {layer}: {cause}")]
    Experts { layer: usize, cause: ExpertsError },

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

    /// The experts of `layer` failed with `error`; `retry` says whether another attempt can help.
    pub fn experts(layer: usize, retry: Retry, error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Error::Experts { layer, cause: ExpertsError::new(retry, error) }
    }

    /// Whether the same call can succeed if made again: only an expert backend's transient
    /// failures can; every other error is [`Retry::Never`].
    pub fn retry(&self) -> Retry {
        match self {
            Error::Experts { cause, .. } => cause.retry(),
            _ => Retry::Never,
        }
    }
}

/// Whether a failed call can succeed if it is made again (tikv's errors say the same of theirs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// The same call gives the same error: an invalid input, a bug, a model mismatch.
    Never,
    /// A transient failure (a worker lost mid-exchange, a deadline missed under load): the same
    /// call may succeed at once.
    Now,
    /// Nothing can serve it until the cluster changes (no live host of some experts, even after
    /// the backend waited for one): retrying at once cannot help, a client may try again later.
    AfterRecovery,
}

/// Why an expert backend failed: its own error (typed; [`ExpertsError::get_ref`] gives it back for
/// `downcast_ref`) and whether trying again can help. Displays as that error.
#[derive(Debug)]
pub struct ExpertsError {
    retry: Retry,
    error: Box<dyn std::error::Error + Send + Sync>,
}

impl ExpertsError {
    pub fn new(retry: Retry, error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        ExpertsError { retry, error: error.into() }
    }

    pub fn retry(&self) -> Retry {
        self.retry
    }

    /// The backend's own error.
    pub fn get_ref(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.error
    }
}

impl std::fmt::Display for ExpertsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

// Transparent, as `#[error(transparent)]` would be: the wrapper adds the retry decision, not a
// message of its own, so an error chain does not print the backend's error twice.
impl std::error::Error for ExpertsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_expert_backends_say_retry() {
        assert_eq!(Error::Input("token id 9999".into()).retry(), Retry::Never);
        assert_eq!(Error::config("hidden_size", "missing").retry(), Retry::Never);
        for retry in [Retry::Never, Retry::Now, Retry::AfterRecovery] {
            assert_eq!(Error::experts(3, retry, "worker lost").retry(), retry);
        }
    }

    #[test]
    fn the_backend_error_stays_typed() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        let e = Error::experts(7, Retry::Now, io);
        assert_eq!(e.to_string(), "experts of layer 7: reset by peer");
        let Error::Experts { cause, .. } = &e else { panic!("{e:?}") };
        let io = cause.get_ref().downcast_ref::<std::io::Error>().expect("the io error itself");
        assert_eq!(io.kind(), std::io::ErrorKind::ConnectionReset);
    }
}
