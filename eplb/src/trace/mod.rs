//! Routing traces: every step, for every MoE layer, the experts each token was routed to.
//!
//! Format, version 1 (all integers little-endian; docs/load-balancing.md, "Trace format"):
//!
//! ```text
//! file    := magic "EPRTRACE" | version u16 | header_len u32 | header (JSON, header_len bytes) | record*
//! record  := kind u8 | body_len u32 | body (body_len bytes)
//! kind 1  step:    timestamp_us u64 | tokens u32 | per header layer: n u32 | n·top_k expert ids
//! kind 2  dropped: timestamp_us u64 | steps u64   (steps the writer's buffer had no room for)
//! ```
//!
//! Expert ids are one byte when the model has at most 256 experts, else two (`id_bytes` in the
//! header); a token's `top_k` ids are in the router's order (descending logit). A trace that grows
//! past its part size continues in `PATH.1`, `PATH.2`, …, each a complete file with its own header
//! (`part`), so that any part can be read alone and a reader given `PATH` reads them all in order.

mod reader;
mod recorder;
mod writer;

use serde::{Deserialize, Serialize};

use crate::error::TraceError;
use crate::load::StepLoads;

pub use reader::{Record, StepRecord, TraceReader, part_path};
pub use recorder::Recorder;
pub use writer::{StepBuilder, TraceWriter, WriterOptions, WriterStats};

pub const MAGIC: &[u8; 8] = b"EPRTRACE";
pub const VERSION: u16 = 1;
pub(crate) const KIND_STEP: u8 = 1;
pub(crate) const KIND_DROPPED: u8 = 2;
/// A record body larger than this is corruption, not a step (2^20 tokens × 8 layers × top-1 fits).
pub(crate) const MAX_BODY: u32 = 256 << 20;
pub(crate) const MAX_HEADER: u32 = 1 << 20;

/// What a trace was recorded from; the same in every part but `part`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceHeader {
    /// The checkpoint's directory name.
    pub model: String,
    /// `fnv1a64:` and the FNV-1a 64 hash of the checkpoint's `config.json` bytes, in hex: traces of
    /// different models (or configs) must not be mixed.
    pub config_hash: String,
    /// The MoE layer ids, in the order each step lists them.
    pub layers: Vec<u32>,
    pub num_experts: u32,
    pub top_k: u32,
    /// Bytes of one expert's weights in one layer as the checkpoint stores them (what moving a
    /// replica loads); 0 when unknown.
    #[serde(default)]
    pub expert_bytes: u64,
    /// Milliseconds since the Unix epoch when recording started.
    pub start_unix_ms: u64,
    /// 0 for `PATH`, n for `PATH.n`.
    #[serde(default)]
    pub part: u32,
}

impl TraceHeader {
    /// Bytes per expert id.
    pub fn id_bytes(&self) -> usize {
        if self.num_experts <= 256 { 1 } else { 2 }
    }

    pub fn validate(&self) -> Result<(), TraceError> {
        let bad = |r: &str| Err(TraceError::Header(r.to_owned()));
        if self.layers.is_empty() {
            return bad("no MoE layers");
        }
        if self.num_experts == 0 || self.num_experts > 65_536 {
            return bad("num_experts must be 1 to 65536");
        }
        if self.top_k == 0 || self.top_k > self.num_experts {
            return bad("top_k must be 1 to num_experts");
        }
        let mut seen = std::collections::BTreeSet::new();
        if !self.layers.iter().all(|l| seen.insert(*l)) {
            return bad("a layer id is listed twice");
        }
        Ok(())
    }

    /// Whether two parts' headers describe the same recording.
    pub(crate) fn same_recording(&self, other: &TraceHeader) -> bool {
        TraceHeader { part: 0, ..self.clone() } == TraceHeader { part: 0, ..other.clone() }
    }
}

/// FNV-1a 64 of `bytes` as the header writes it.
pub fn config_hash(bytes: &[u8]) -> String {
    let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("fnv1a64:{h:016x}")
}

impl StepRecord {
    /// Tokens per expert per layer of this step.
    pub fn loads(&self, header: &TraceHeader) -> StepLoads {
        let counts = self
            .layers
            .iter()
            .map(|ids| {
                let mut c = vec![0u32; header.num_experts as usize];
                for &e in ids {
                    c[e as usize] += 1;
                }
                c
            })
            .collect();
        StepLoads { timestamp_us: self.timestamp_us, tokens: self.tokens, counts }
    }
}

#[cfg(test)]
mod tests;
