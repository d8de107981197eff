//! `Llama4TextMoe`: top-k router with a sigmoid score that scales the expert **input**, routed
//! experts reached through an [`ExpertBackend`], and the shared expert added to every token.
//!
//! The block never calls an expert itself: it groups the routed rows by expert, hands them to the
//! backend (in process, or other processes in the coordinator's transports), computes the shared
//! expert while they are away, and adds the answers back into their tokens' rows.

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::WeightSource;
use crate::config::TextConfig;
#[cfg(any(test, feature = "testing"))]
use crate::deviation::Deviation;
use crate::deviation::deviates;
use crate::error::{Error, Result, Retry};
use crate::layers::{Linear, Mlp};
use crate::quant::{LoadPolicy, MatrixRole};

/// `rows` consecutive rows of an [`ExpertBatch`] go to expert `expert`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertGroup {
    pub expert: u32,
    pub rows: u32,
}

/// The routed rows of one MoE layer, grouped by expert in ascending expert order.
#[derive(Debug, Clone)]
pub struct ExpertBatch {
    pub layer: usize,
    pub groups: Vec<ExpertGroup>,
    /// `[Σ rows, hidden]`, already scaled by each row's router score.
    pub rows: Tensor,
}

impl ExpertBatch {
    pub fn total_rows(&self) -> usize {
        self.groups.iter().map(|g| g.rows as usize).sum()
    }
}

/// Expert outputs that are being computed; `wait` returns them `[Σ rows, hidden]` in batch order.
pub trait ExpertsInFlight: Send {
    fn wait(self: Box<Self>) -> Result<Tensor>;
}

/// Computes the routed experts of a layer for rows grouped by expert. Implementations: the
/// in-process [`crate::experts::ExpertShard`] and the coordinator's remote transports.
pub trait ExpertBackend: Send + Sync {
    /// Starts the computation and returns without waiting for it when the backend is remote.
    fn submit<'a>(&'a self, batch: ExpertBatch) -> Result<Box<dyn ExpertsInFlight + 'a>>;

    /// Told after every step that completed, for backends that track recoveries (failover).
    fn step_finished(&self) {}
}

/// Which experts each token row chose at each MoE layer, for tests and load statistics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RoutingTrace {
    /// `(layer, per row: the top-k expert ids in descending logit order)`.
    pub layers: Vec<(usize, Vec<Vec<u32>>)>,
}

#[derive(Debug)]
pub(crate) struct MoeBlock {
    layer: usize,
    router: Linear,
    shared_expert: Mlp,
    top_k: usize,
    num_experts: usize,
    #[cfg(any(test, feature = "testing"))]
    pub(crate) deviation: Option<Deviation>,
}

impl MoeBlock {
    /// Bytes of the router and the shared expert as kept in memory.
    pub fn matrix_bytes(&self) -> u64 {
        self.router.bytes() + self.shared_expert.bytes()
    }

    pub fn load(
        cfg: &TextConfig,
        layer: usize,
        src: &dyn WeightSource,
        prefix: &str,
        (dtype, policy): (DType, LoadPolicy),
        dev: &Device,
    ) -> Result<Self> {
        let p = format!("{prefix}feed_forward.");
        Ok(MoeBlock {
            layer,
            router: Linear::load(
                src,
                &format!("{p}router.weight"),
                (cfg.num_local_experts, cfg.hidden_size),
                (dtype, policy, MatrixRole::Router),
                dev,
            )?,
            shared_expert: Mlp::load(
                src,
                &format!("{p}shared_expert."),
                (cfg.hidden_size, cfg.intermediate_size),
                (dtype, policy, MatrixRole::SharedExpert),
                dev,
            )?,
            top_k: cfg.num_experts_per_tok,
            num_experts: cfg.num_local_experts,
            #[cfg(any(test, feature = "testing"))]
            deviation: None,
        })
    }

    /// Routes `h` (the post-attention-normed hidden states) and sends the routed rows to the experts.
    pub fn submit<'e>(
        &self,
        h: Tensor,
        experts: &'e dyn ExpertBackend,
        trace: Option<&mut RoutingTrace>,
    ) -> Result<MoeInFlight<'e>> {
        let logits = self.router.forward(&h)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let routing = Routing::top_k(&logits, self.top_k, self.num_experts, self.layer)?;
        if let Some(trace) = trace {
            trace.layers.push((self.layer, routing.per_row));
        }
        let rows_total = routing.order.len();
        let index = Tensor::from_slice(&routing.order, rows_total, h.device())?;
        let scores = Tensor::from_slice(&routing.scores, (rows_total, 1), h.device())?.to_dtype(h.dtype())?;
        let gathered = h.index_select(&index, 0)?;
        let scale_output = deviates!(self.deviation, ScaleExpertOutput);
        // Llama 4 multiplies the score into the expert input (`routed_in = h · score`), which is not
        // the same as scaling the output: silu(s·g)·(s·u) ≠ s·silu(g)·u.
        let rows = if scale_output { gathered } else { gathered.broadcast_mul(&scores)? };
        let in_flight = experts.submit(ExpertBatch { layer: self.layer, groups: routing.groups, rows })?;
        Ok(MoeInFlight { h, index, scores: scale_output.then_some(scores), in_flight })
    }

    /// Computes the shared expert while the routed experts work, then adds their answers.
    pub fn complete(&self, pending: MoeInFlight<'_>) -> Result<Tensor> {
        let MoeInFlight { h, index, scores, in_flight } = pending;
        let shared = self.shared_expert.forward(&h)?;
        let mut routed = in_flight.wait()?;
        if routed.dims() != [index.dim(0)?, h.dim(1)?] {
            let reason = format!("backend answered shape {:?} for {} rows", routed.dims(), index.dim(0)?);
            return Err(Error::experts(self.layer, Retry::Never, reason));
        }
        if let Some(scores) = scores {
            routed = routed.broadcast_mul(&scores)?;
        }
        Ok(shared.index_add(&index, &routed, 0)?)
    }
}

/// A MoE layer whose routed rows are with the experts.
pub(crate) struct MoeInFlight<'e> {
    h: Tensor,
    /// Source row of each routed row.
    index: Tensor,
    /// Router scores to apply to the outputs (only under `Deviation::ScaleExpertOutput`).
    scores: Option<Tensor>,
    in_flight: Box<dyn ExpertsInFlight + 'e>,
}

impl std::fmt::Debug for MoeInFlight<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MoeInFlight").field("rows", &self.index.dims()).finish_non_exhaustive()
    }
}

/// Top-k decisions of one layer, with the routed rows ordered by expert.
#[derive(Debug)]
struct Routing {
    per_row: Vec<Vec<u32>>,
    /// Source row of each routed row, grouped by expert.
    order: Vec<u32>,
    /// `sigmoid(logit)` of each routed row.
    scores: Vec<f32>,
    groups: Vec<ExpertGroup>,
}

impl Routing {
    fn top_k(logits: &[Vec<f32>], k: usize, num_experts: usize, layer: usize) -> Result<Self> {
        let mut per_row = Vec::with_capacity(logits.len());
        let mut by_expert: Vec<Vec<(u32, f32)>> = vec![Vec::new(); num_experts];
        for (row, l) in logits.iter().enumerate() {
            if l.iter().any(|v| v.is_nan()) {
                return Err(Error::experts(layer, Retry::Never, format!("router logits of row {row} contain NaN")));
            }
            let mut idx: Vec<u32> = (0..num_experts as u32).collect();
            // Descending logit; ties broken towards the lower expert id.
            idx.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]).then(a.cmp(&b)));
            idx.truncate(k);
            for &e in &idx {
                let score = 1.0 / (1.0 + (-l[e as usize]).exp());
                by_expert[e as usize].push((row as u32, score));
            }
            per_row.push(idx);
        }
        let mut order = Vec::with_capacity(logits.len() * k);
        let mut scores = Vec::with_capacity(logits.len() * k);
        let mut groups = Vec::new();
        for (e, rows) in by_expert.iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            groups.push(ExpertGroup { expert: e as u32, rows: rows.len() as u32 });
            for &(r, s) in rows {
                order.push(r);
                scores.push(s);
            }
        }
        Ok(Routing { per_row, order, scores, groups })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_groups_rows_by_expert() {
        let logits = vec![vec![0.1, 2.0, -1.0], vec![3.0, 0.0, 0.5], vec![0.0, 1.0, 0.9]];
        let r = Routing::top_k(&logits, 1, 3, 0).expect("routing");
        assert_eq!(r.per_row, vec![vec![1], vec![0], vec![1]]);
        assert_eq!(r.groups, vec![ExpertGroup { expert: 0, rows: 1 }, ExpertGroup { expert: 1, rows: 2 }]);
        assert_eq!(r.order, vec![1, 0, 2]);
        assert!((r.scores[0] - 1.0 / (1.0 + (-3.0f32).exp())).abs() < 1e-7);
        let r2 = Routing::top_k(&logits, 2, 3, 0).expect("routing");
        assert_eq!(r2.per_row[0], vec![1, 0]);
        assert_eq!(r2.order.len(), 6);
    }

    #[test]
    fn nan_logits_are_an_error() {
        assert!(Routing::top_k(&[vec![f32::NAN, 1.0]], 1, 2, 3).is_err());
    }
}
