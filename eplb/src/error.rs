//! Errors of the planners, the replay, the trace format and the plots. None is retryable: each names bad input
//! (a placement, a trace file, an argument) or a file-system failure.

use std::path::PathBuf;

/// A plan cannot be made for these arguments.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("no workers to place experts on")]
    NoWorkers,
    #[error("worker id {0:?} is listed twice")]
    DuplicateWorker(String),
    #[error("slots per worker must be positive")]
    NoSlots,
    #[error("layer {layer} has {experts} experts but only {slots} slots ({workers} workers × {per_worker})")]
    TooFewSlots { layer: u32, experts: usize, slots: usize, workers: usize, per_worker: usize },
    #[error("the load matrix has {layers} layer ids but {rows} rows of loads")]
    Shape { layers: usize, rows: usize },
    #[error("layer {layer}: load of expert {expert} is {value}, not a finite non-negative number")]
    BadLoad { layer: u32, expert: usize, value: f64 },
    #[error("current placement: {0}")]
    Current(String),
}

/// A placement cannot be replayed against these loads.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("the placement has no layer {0}")]
    MissingLayer(u32),
    #[error("layer {layer}: the placement lists {placed} experts, the loads {loaded}")]
    ExpertCount { layer: u32, placed: usize, loaded: usize },
    #[error("layer {layer}: expert {expert} has no host")]
    Unplaced { layer: u32, expert: usize },
    #[error("the placement has no workers")]
    NoWorkers,
}

/// A routing trace cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: truncated at byte {offset}: {what}", path.display())]
    Truncated { path: PathBuf, offset: u64, what: String },
    #[error("{}: at byte {offset}: {reason}", path.display())]
    Corrupt { path: PathBuf, offset: u64, reason: String },
    #[error("{}: not a routing trace (bad magic)", path.display())]
    NotATrace { path: PathBuf },
    #[error("{}: trace format version {found}, this build reads version {supported}", path.display())]
    Version { path: PathBuf, found: u16, supported: u16 },
    #[error("invalid trace header: {0}")]
    Header(String),
    #[error("{0}")]
    Mismatch(String),
}

/// Charts cannot be drawn or written (`plot` feature).
#[cfg(feature = "plot")]
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the bundled chart font could not be loaded")]
    Font,
    #[error("drawing a chart: {0}")]
    Draw(String),
    #[error("{}: encoding the chart: {reason}", path.display())]
    Encode { path: PathBuf, reason: String },
}
