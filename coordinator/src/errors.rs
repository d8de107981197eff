//! Errors of the expert transports. [`TransportError::retry`] says whether the same exchange could
//! succeed on another attempt (another replica, a later step); the error reaches the engine whole,
//! as the typed cause of `epserve_model::Error::Experts` ([`TransportError::at_layer`]).

use std::time::Duration;

use epserve_model::Retry;

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
    /// Whether the same exchange can succeed on another attempt. `Now` is what the grpc transport
    /// re-sends to another host within the step (and what the engine retries the step for).
    pub fn retry(&self) -> Retry {
        match self {
            TransportError::Unavailable { .. } | TransportError::Deadline { .. } => Retry::Now,
            // What the worker's status code says (gRPC's own guidance on retrying codes): an
            // invalid exchange, a worker serving another model or a computation that failed gives
            // the same answer every time.
            // `FAILED_PRECONDITION` (it does not host an expert it is listed for) and `DATA_LOSS`
            // (its answer was malformed) are that worker's fault: another host may answer.
            TransportError::Rejected { code, .. } => match code {
                tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::ResourceExhausted
                | tonic::Code::Aborted
                | tonic::Code::FailedPrecondition
                | tonic::Code::DataLoss => Retry::Now,
                _ => Retry::Never,
            },
            TransportError::NoHost { .. } => Retry::AfterRecovery,
            TransportError::Placement(_) => Retry::Never,
        }
    }

    /// Whether the answer showed the worker itself at fault (its record or its computation cannot
    /// be trusted): the transport stops using it for a while instead of retrying it.
    pub fn worker_at_fault(&self) -> bool {
        matches!(self, TransportError::Rejected { code: tonic::Code::FailedPrecondition | tonic::Code::DataLoss, .. })
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

    /// As the model sees it: the experts of `layer` failed, with this error as the typed cause.
    pub fn at_layer(self, layer: usize) -> epserve_model::Error {
        let retry = self.retry();
        epserve_model::Error::experts(layer, retry, self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected(code: tonic::Code) -> TransportError {
        TransportError::Rejected { worker: "w".into(), exchange: 1, code, message: "no".into() }
    }

    #[test]
    fn invalid_exchanges_are_never_retried() {
        assert_eq!(rejected(tonic::Code::InvalidArgument).retry(), Retry::Never);
        assert_eq!(rejected(tonic::Code::Internal).retry(), Retry::Never);
        assert_eq!(rejected(tonic::Code::DataLoss).retry(), Retry::Now, "a malformed answer: another host");
        assert_eq!(rejected(tonic::Code::FailedPrecondition).retry(), Retry::Now, "not hosted there: another host");
        assert!(rejected(tonic::Code::FailedPrecondition).worker_at_fault());
        assert!(!rejected(tonic::Code::InvalidArgument).worker_at_fault());
        assert_eq!(TransportError::Placement("another model".into()).retry(), Retry::Never);
        assert_eq!(rejected(tonic::Code::Unavailable).retry(), Retry::Now);
        let lost = TransportError::Unavailable { worker: "w".into(), reason: "reset".into() };
        assert_eq!(lost.retry(), Retry::Now);
        let late = TransportError::Deadline { worker: "w".into(), exchange: 2, layer: 1, deadline: Duration::ZERO };
        assert_eq!(late.retry(), Retry::Now);
        let none = TransportError::NoHost { layer: 1, expert: 3, waited: Duration::ZERO, why: Vec::new() };
        assert_eq!(none.retry(), Retry::AfterRecovery);
    }

    #[test]
    fn the_model_error_keeps_the_transport_error() {
        let e = rejected(tonic::Code::InvalidArgument).at_layer(4);
        assert_eq!(e.retry(), Retry::Never);
        assert!(e.to_string().starts_with("experts of layer 4: expert worker w rejected exchange 1"), "{e}");
        let epserve_model::Error::Experts { layer: 4, cause } = &e else { panic!("{e:?}") };
        let t = cause.get_ref().downcast_ref::<TransportError>().expect("the transport error");
        assert!(matches!(t, TransportError::Rejected { code: tonic::Code::InvalidArgument, .. }));
    }
}
