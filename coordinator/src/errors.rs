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

    /// No live worker hosts the expert, even after waiting for one (a worker coming back, or the
    /// placement leader reassigning the expert).
    #[error(
        "no live expert worker hosts expert {expert} of layer {layer} (waited {} ms){}",
        waited.as_millis(),
        why.iter().map(|w| format!("; {w}")).collect::<String>()
    )]
    NoHost { layer: usize, expert: u32, waited: Duration, why: Vec<String> },

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
            TransportError::NoHost { .. } => "no_host",
            TransportError::Placement(_) => "placement",
        }
    }
}

impl From<TransportError> for epserve_model::Error {
    fn from(e: TransportError) -> Self {
        match &e {
            TransportError::NoHost { layer, .. } => {
                epserve_model::Error::ExpertsUnavailable { layer: *layer, reason: e.to_string() }
            }
            TransportError::Deadline { layer, .. } => {
                epserve_model::Error::Experts { layer: *layer, reason: e.to_string() }
            }
            _ => epserve_model::Error::Experts { layer: usize::MAX, reason: e.to_string() },
        }
    }
}
