//! Errors of the expert transports. `retryable` says whether the same exchange could succeed on
//! another attempt (another replica, a later step).

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The worker could not be reached, or its stream ended (process died, connection reset).
    #[error("expert worker {worker} is unavailable: {reason}")]
    Unavailable { worker: String, reason: String },

    /// The worker did not answer within the exchange deadline.
    #[error("expert worker {worker} did not answer exchange {exchange} (layer {layer}) within {deadline:?}")]
    Deadline { worker: String, exchange: u64, layer: usize, deadline: Duration },

    /// The worker refused the exchange (a bug on our side, or a worker serving another model).
    #[error("expert worker {worker} rejected exchange {exchange}: {code:?}: {message}")]
    Rejected { worker: String, exchange: u64, code: tonic::Code, message: String },

    /// The workers together do not host every expert, or do not serve this model.
    #[error("expert placement: {0}")]
    Placement(String),
}

impl TransportError {
    pub fn retryable(&self) -> bool {
        matches!(self, TransportError::Unavailable { .. } | TransportError::Deadline { .. })
    }

    /// Label value for `epserve_exchange_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            TransportError::Unavailable { .. } => "unavailable",
            TransportError::Deadline { .. } => "deadline",
            TransportError::Rejected { .. } => "rejected",
            TransportError::Placement(_) => "placement",
        }
    }
}

impl From<TransportError> for epserve_model::Error {
    fn from(e: TransportError) -> Self {
        let layer = match &e {
            TransportError::Deadline { layer, .. } => *layer,
            _ => usize::MAX,
        };
        epserve_model::Error::Experts { layer, reason: e.to_string() }
    }
}
