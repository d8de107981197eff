//! Routed experts computed in this process: a shard (any subset of expert ids) of every MoE layer,
//! loaded from the fused hub tensors `feed_forward.experts.gate_up_proj` `[E, hidden, 2·inter]`
//! (gate = first half of the last dim) and `down_proj` `[E, inter, hidden]`, or from per-expert
//! pre-quantized tensors (`feed_forward.experts.{e}.{gate,up,down}_proj.…`, as llm-compressor writes
//! Llama 4). Only the hosted experts' slices are read from the checkpoint, and quantized on the fly
//! one expert at a time when the load policy says so.
//!
//! The expert worker serves one; the coordinator's `local` transport uses one holding every expert.

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::WeightSource;
use crate::config::{FeedForwardKind, ModelConfig};
use crate::error::{Error, Result, Retry};
use crate::kernels;
use crate::layers::{Matrix, matmul_t, swiglu_down};
use crate::moe::{ExpertBackend, ExpertBatch, ExpertGroup, ExpertsInFlight};
use crate::quant::{LoadPolicy, MatrixRole};

/// One expert's weights, transposed at load from the checkpoint's `x·W` layout to `[out, in]`:
/// the layout candle's CPU gemm streams fastest for both few and many rows (see `matmul_t`).
#[derive(Debug, Clone)]
struct ExpertFfn {
    /// `[2·inter, hidden]`, gate rows first.
    gate_up: Matrix,
    /// `[hidden, inter]`.
    down: Matrix,
}

impl ExpertFfn {
    fn bytes(&self) -> u64 {
        self.gate_up.bytes() + self.down.bytes()
    }
}

#[derive(Debug)]
pub struct ExpertShard {
    /// `layers[l][e]`: expert `e` of layer `l`, when layer `l` is MoE and `e` is hosted here.
    layers: Vec<Vec<Option<ExpertFfn>>>,
    /// The ids hosted in every MoE layer.
    experts: Vec<u32>,
    /// The MoE layers' indices.
    moe_layers: Vec<usize>,
    inter: usize,
    hidden: usize,
    resident_bytes: u64,
}

impl ExpertShard {
    /// Loads `experts` (global ids) of every MoE layer, kept (and quantized) as `policy` says.
    /// `progress` is called after each expert is loaded.
    pub fn load(
        cfg: &ModelConfig,
        src: &dyn WeightSource,
        experts: &[u32],
        dtype: DType,
        policy: impl Into<LoadPolicy>,
        dev: &Device,
        progress: &mut dyn FnMut(),
    ) -> Result<Self> {
        let t = &cfg.text;
        if let Some(&bad) = experts.iter().find(|&&e| e as usize >= t.num_local_experts) {
            return Err(Error::Input(format!("expert {bad} does not exist (the model has {})", t.num_local_experts)));
        }
        Self::load_where(cfg, src, &|_, e| experts.contains(&e), dtype, policy, dev, progress)
    }

    /// Loads the experts of the `(layer, expert)` pairs `pairs` (layers that are not MoE and
    /// experts out of range are an error): the replicas that expert load balancing places on one
    /// worker differ from layer to layer.
    pub fn load_pairs(
        cfg: &ModelConfig,
        src: &dyn WeightSource,
        pairs: &[(usize, u32)],
        dtype: DType,
        policy: impl Into<LoadPolicy>,
        dev: &Device,
    ) -> Result<Self> {
        let t = &cfg.text;
        for &(layer, e) in pairs {
            if t.feed_forward.get(layer) != Some(&FeedForwardKind::Moe) || e as usize >= t.num_local_experts {
                return Err(Error::Input(format!("layer {layer} has no routed expert {e}")));
            }
        }
        Self::load_where(cfg, src, &|l, e| pairs.contains(&(l, e)), dtype, policy, dev, &mut || {})
    }

    /// Loads every expert `wanted(layer, expert)` selects in the MoE layers.
    #[allow(clippy::too_many_arguments)]
    fn load_where(
        cfg: &ModelConfig,
        src: &dyn WeightSource,
        wanted: &dyn Fn(usize, u32) -> bool,
        dtype: DType,
        policy: impl Into<LoadPolicy>,
        dev: &Device,
        progress: &mut dyn FnMut(),
    ) -> Result<Self> {
        let policy: LoadPolicy = policy.into();
        let scheme = policy.scheme_for(MatrixRole::RoutedExpert);
        let quantize = scheme.map(|s| (s, policy.activations));
        let t = &cfg.text;
        let all: Vec<u32> = (0..t.num_local_experts as u32).collect();
        let prefix = cfg.architecture.decoder_prefix();
        let mut layers = Vec::with_capacity(t.num_hidden_layers);
        let mut resident_bytes = 0u64;
        for (l, kind) in t.feed_forward.iter().enumerate() {
            let mut slots = vec![None; t.num_local_experts];
            if *kind == FeedForwardKind::Moe {
                let gu_key = format!("{prefix}layers.{l}.feed_forward.experts.gate_up_proj");
                let down_key = format!("{prefix}layers.{l}.feed_forward.experts.down_proj");
                let (hidden, inter) = (t.hidden_size, t.intermediate_size);
                // Quantized on the fly: read as stored (bf16 stays bf16), one expert at a time.
                let kept = |key: &str| match scheme {
                    Some(_) => {
                        src.stored_dtype(key).filter(|d| matches!(d, DType::BF16 | DType::F32)).unwrap_or(DType::F32)
                    }
                    None => policy.storage.dtype(src.stored_dtype(key), dtype, dev),
                };
                let (gu_dtype, down_dtype) = (kept(&gu_key), kept(&down_key));
                let on = if scheme.is_some() { Device::Cpu } else { dev.clone() };
                for e in all.iter().copied().filter(|&e| wanted(l, e)) {
                    let e = e as usize;
                    let per_expert =
                        |name: &str| format!("{prefix}layers.{l}.feed_forward.experts.{e}.{name}_proj.weight");
                    let ffn = if let Some(gate) = src.quantized(&per_expert("gate"), (inter, hidden))? {
                        let how = (dtype, policy, MatrixRole::RoutedExpert);
                        let up = Matrix::load(src, &per_expert("up"), (inter, hidden), how, dev)?;
                        let gate = Matrix::from_quant(gate, policy.activations, dev)?;
                        ExpertFfn {
                            gate_up: gate.concat_rows(up, dtype)?,
                            down: Matrix::load(src, &per_expert("down"), (hidden, inter), how, dev)?,
                        }
                    } else {
                        let gate_up = src.rows(&gu_key, &t.expert_gate_up_shape(), e, 1, gu_dtype, &on)?.squeeze(0)?;
                        let down = src.rows(&down_key, &t.expert_down_shape(), e, 1, down_dtype, &on)?.squeeze(0)?;
                        let (gate_up, down) = (gate_up.t()?.contiguous()?, down.t()?.contiguous()?);
                        ExpertFfn {
                            gate_up: Matrix::from_tensor(gate_up, quantize, dtype, dev)?
                                .with_activations(policy.activations),
                            down: Matrix::from_tensor(down, quantize, dtype, dev)?.with_activations(policy.activations),
                        }
                    };
                    resident_bytes += ffn.bytes();
                    slots[e] = Some(ffn);
                    progress();
                }
            }
            layers.push(slots);
        }
        let mut shard = ExpertShard {
            layers,
            experts: Vec::new(),
            moe_layers: t.moe_layers().collect(),
            inter: t.intermediate_size,
            hidden: t.hidden_size,
            resident_bytes,
        };
        shard.experts = shard.in_every_moe_layer();
        Ok(shard)
    }

    /// The expert ids hosted in every MoE layer.
    fn in_every_moe_layer(&self) -> Vec<u32> {
        if self.moe_layers.is_empty() {
            return Vec::new();
        }
        let num_experts = self.layers.first().map_or(0, Vec::len) as u32;
        (0..num_experts).filter(|&e| self.moe_layers.iter().all(|&l| self.hosts(l, e))).collect()
    }

    /// Takes over the experts of `other` (loaded later from the same checkpoint, e.g. because the
    /// placement leader assigned them here). Experts already hosted are kept as they are.
    pub fn absorb(&mut self, other: ExpertShard) -> Result<()> {
        if (other.inter, other.hidden, other.layers.len()) != (self.inter, self.hidden, self.layers.len()) {
            return Err(Error::Input("the shards come from different models".into()));
        }
        for (mine, theirs) in self.layers.iter_mut().zip(other.layers) {
            for (slot, ffn) in mine.iter_mut().zip(theirs) {
                if let (None, Some(ffn)) = (&slot, ffn) {
                    self.resident_bytes += ffn.bytes();
                    *slot = Some(ffn);
                }
            }
        }
        self.experts = self.in_every_moe_layer();
        Ok(())
    }

    /// Drops the expert of `(layer, expert)`; true if it was hosted. The hosted-everywhere list
    /// ([`Self::experts`]) loses `expert` too.
    pub fn remove(&mut self, layer: usize, expert: u32) -> bool {
        let Some(slot) = self.layers.get_mut(layer).and_then(|l| l.get_mut(expert as usize)) else { return false };
        let Some(ffn) = slot.take() else { return false };
        self.resident_bytes -= ffn.bytes();
        self.experts.retain(|&e| e != expert);
        true
    }

    /// Every hosted `(layer, expert)`, in layer then expert order.
    pub fn pairs(&self) -> Vec<(usize, u32)> {
        let mut out = Vec::new();
        for (l, slots) in self.layers.iter().enumerate() {
            out.extend(slots.iter().enumerate().filter(|(_, s)| s.is_some()).map(|(e, _)| (l, e as u32)));
        }
        out
    }

    /// The hosted expert ids, ascending.
    pub fn experts(&self) -> &[u32] {
        &self.experts
    }

    pub fn hosts(&self, layer: usize, expert: u32) -> bool {
        matches!(self.layers.get(layer).and_then(|l| l.get(expert as usize)), Some(Some(_)))
    }

    /// Bytes of expert weights held in memory.
    pub fn resident_bytes(&self) -> u64 {
        self.resident_bytes
    }

    /// Bytes of one expert of one layer as held in memory (`None` when nothing is hosted).
    pub fn expert_bytes(&self) -> Option<u64> {
        Some(self.layers.iter().flatten().flatten().next()?.bytes())
    }

    /// How the hosted experts' matrices are held, e.g. `bf16` or `int4 (group 32, f16 scales)`
    /// (`None` when nothing is hosted).
    pub fn weight_format(&self) -> Option<String> {
        let ffn = self.layers.iter().flatten().flatten().next()?;
        Some(ffn.gate_up.describe())
    }

    /// SwiGLU of every group's rows with its expert: one matrix product per expert, not per row.
    /// Runs on rayon's pool (see [`kernels::on_pool`]): an expert worker calls it from its own
    /// threads.
    pub fn compute(&self, layer: usize, groups: &[ExpertGroup], rows: &Tensor) -> Result<Tensor> {
        kernels::on_pool(|| self.compute_here(layer, groups, rows))
    }

    fn compute_here(&self, layer: usize, groups: &[ExpertGroup], rows: &Tensor) -> Result<Tensor> {
        let err = |reason: String| Error::experts(layer, Retry::Never, reason);
        let slots = self.layers.get(layer).ok_or_else(|| err(format!("layer out of range ({})", self.layers.len())))?;
        let total: usize = groups.iter().map(|g| g.rows as usize).sum();
        if rows.dims() != [total, self.hidden] {
            return Err(err(format!(
                "rows have shape {:?}, the groups announce [{total}, {}]",
                rows.dims(),
                self.hidden
            )));
        }
        let ffns = groups
            .iter()
            .map(|g| {
                slots
                    .get(g.expert as usize)
                    .and_then(Option::as_ref)
                    .ok_or_else(|| err(format!("expert {} is not hosted here", g.expert)))
            })
            .collect::<Result<Vec<&ExpertFfn>>>()?;
        // The plain-Rust kernels take every group of up to `max_rows` rows, and every group when
        // the weights are kept in bf16 (in blocks of `max_rows`: candle cannot mix the dtypes).
        let quantized = ffns.iter().any(|f| f.gate_up.dense_dtype().is_none() || f.down.dense_dtype().is_none());
        if quantized {
            // Only the kernels read quantized weights; they take f32 rows.
            let x = rows.to_dtype(DType::F32)?;
            let out = self
                .compute_kernels_f32(groups, &ffns, &x)?
                .ok_or_else(|| err("quantized experts are computed on the CPU only".into()))?;
            return Ok(out.to_dtype(rows.dtype())?);
        }
        if rows.dtype() == DType::F32 && rows.device().is_cpu() {
            let narrow = ffns
                .iter()
                .any(|f| f.gate_up.dense_dtype() != Some(DType::F32) || f.down.dense_dtype() != Some(DType::F32));
            if (narrow || groups.iter().all(|g| g.rows as usize <= kernels::max_rows()))
                && let Some(out) = self.compute_kernels_f32(groups, &ffns, rows)?
            {
                return Ok(out);
            }
        }
        let mut outputs = Vec::with_capacity(groups.len());
        let mut offset = 0;
        for (g, ffn) in groups.iter().zip(ffns) {
            let n = g.rows as usize;
            if n == 0 {
                continue;
            }
            let x = rows.narrow(0, offset, n)?;
            let (Some(gate_up), Some(down)) = (ffn.gate_up.dense(), ffn.down.dense()) else {
                return Err(err("quantized experts reached the dense path".into()));
            };
            let gu = matmul_t(&x, &gate_up.to_dtype(x.dtype())?)?;
            outputs.push(swiglu_down(&gu, self.inter, |h| matmul_t(h, &down.to_dtype(h.dtype())?))?);
            offset += n;
        }
        if outputs.is_empty() {
            return Ok(rows.zeros_like()?);
        }
        Ok(if outputs.len() == 1 { outputs.swap_remove(0) } else { Tensor::cat(&outputs, 0)? })
    }

    /// Every group with its expert in plain Rust (see [`kernels`]), groups longer than
    /// [`kernels::max_rows`] in blocks of that many rows. `None` when a weight is not an f32 or bf16
    /// CPU tensor (the caller falls back to candle).
    fn compute_kernels_f32(
        &self,
        groups: &[ExpertGroup],
        ffns: &[&ExpertFfn],
        rows: &Tensor,
    ) -> Result<Option<Tensor>> {
        let x = rows.flatten_all()?.to_vec1::<f32>()?;
        let mut views = Vec::with_capacity(ffns.len());
        for ffn in ffns {
            let (Some(gate_up), Some(down)) = (ffn.gate_up.view(), ffn.down.view()) else {
                return Ok(None);
            };
            views.push((gate_up, down));
        }
        let mut experts = Vec::with_capacity(groups.len());
        let mut offset = 0;
        let block = kernels::max_rows();
        for (g, (gate_up, down)) in groups.iter().zip(&views) {
            let end = offset + g.rows as usize;
            while offset < end {
                let m = (end - offset).min(block);
                let x = &x[offset * self.hidden..(offset + m) * self.hidden];
                experts.push(kernels::ExpertRows { x, m, gate_up: gate_up.weights(), down: down.weights() });
                offset += m;
            }
        }
        let mut out = vec![0f32; x.len()];
        kernels::swiglu_experts(&experts, self.inter, &mut out);
        Ok(Some(Tensor::from_vec(out, rows.dims(), rows.device())?))
    }
}

struct LocalInFlight<'a> {
    shard: &'a ExpertShard,
    batch: ExpertBatch,
}

impl ExpertsInFlight for LocalInFlight<'_> {
    fn wait(self: Box<Self>) -> Result<Tensor> {
        self.shard.compute(self.batch.layer, &self.batch.groups, &self.batch.rows)
    }
}

/// In process, the computation runs when the caller waits: after the shared expert, same thread.
impl ExpertBackend for ExpertShard {
    fn submit<'a>(&'a self, batch: ExpertBatch) -> Result<Box<dyn ExpertsInFlight + 'a>> {
        Ok(Box::new(LocalInFlight { shard: self, batch }))
    }
}
