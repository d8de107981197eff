//! Quantized weights: which matrices are quantized at load and how ([`Quantize`], [`QuantScope`],
//! [`QuantScheme`]), the quantized matrix itself ([`QuantMatrix`]), pre-quantized checkpoints in
//! compressed-tensors' formats ([`compressed`]), and the measures that compare a quantized model's
//! logits with the unquantized ones ([`quality`]).
//!
//! Only matrices are ever quantized (routed and shared experts, attention, dense MLPs, `lm_head`);
//! the router, norms, embeddings and the vision tower always stay as the checkpoint stores them:
//! routing decisions are made in full precision.

pub mod compressed;
mod matrix;
pub mod quality;
#[cfg(test)]
mod tests;

use std::str::FromStr;

use half::f16;

pub use matrix::{Group, QuantMatrix, Scales};

use crate::kernels::CodeKind;
use crate::layers::WeightStorage;

/// epserve's on-the-fly schemes (docs/model.md, "Quantized weights", says why these).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantScheme {
    /// Symmetric 8-bit, one f16 scale per 32 weights of a row (GGUF's Q8_0 layout): 8.5 bits a
    /// weight.
    Int8,
    /// Symmetric 4-bit stored as value + 8, two per byte, one f16 scale per 32 weights of a row
    /// (GGUF's Q4_0 layout), the scale chosen per group to minimise the squared error: 4.5 bits a
    /// weight.
    Int4,
}

impl QuantScheme {
    /// Weights per scale.
    pub fn group(self) -> usize {
        32
    }

    pub fn kind(self) -> CodeKind {
        match self {
            QuantScheme::Int8 => CodeKind::Int8,
            QuantScheme::Int4 => CodeKind::Int4,
        }
    }

    /// The scale of one group, rounded to f16 (codes are computed from the rounded scale).
    fn scale_for(self, values: &[f32]) -> f16 {
        // The value of largest magnitude, with its sign.
        let extreme = values.iter().copied().fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
        if extreme == 0.0 || !extreme.is_finite() {
            return f16::ZERO;
        }
        match self {
            QuantScheme::Int8 => f16::from_f32(extreme.abs() / 127.0),
            QuantScheme::Int4 => {
                // Codes run from −8 to 7. Candidate scales put the extreme at −8 (a negative scale
                // when it is positive, as GGUF's Q4_0 does) or a little inside; for the codes each
                // gives, the least-squares scale `Σ v·q / Σ q²` is taken, and the candidate with the
                // smallest squared error over the group wins (measured: docs/model.md).
                // Written as fixed-length loops over one zero-padded group (zeros change no sum),
                // with rounding that needs no library call: they vectorize, and a worker quantizes
                // billions of weights at load.
                let mut group = [0f32; 32];
                let len = values.len().min(group.len());
                group[..len].copy_from_slice(&values[..len]);
                let code = |v: f32, inv: f32| round_code(v * inv).clamp(-8.0, 7.0);
                let mut best = (f32::INFINITY, f16::ZERO);
                for i in 0..=20 {
                    let first = -extreme / (6.5 + 0.1 * i as f32);
                    let inv = 1.0 / first;
                    // Eight independent partial sums: a float sum in one chain would not vectorize.
                    let (mut dot, mut norm) = ([0f32; 8], [0f32; 8]);
                    for chunk in group.chunks_exact(8) {
                        for l in 0..8 {
                            let q = code(chunk[l], inv);
                            dot[l] += chunk[l] * q;
                            norm[l] += q * q;
                        }
                    }
                    let (dot, norm): (f32, f32) = (dot.iter().sum(), norm.iter().sum());
                    let s = f16::from_f32(if norm > 0.0 { dot / norm } else { first });
                    let sf = s.to_f32();
                    if sf == 0.0 || !sf.is_finite() {
                        continue;
                    }
                    let inv = 1.0 / sf;
                    let mut errors = [0f32; 8];
                    for chunk in group.chunks_exact(8) {
                        for l in 0..8 {
                            errors[l] += (chunk[l] - code(chunk[l], inv) * sf).powi(2);
                        }
                    }
                    let error: f32 = errors.iter().sum();
                    if error < best.0 {
                        best = (error, s);
                    }
                }
                best.1
            }
        }
    }
}

/// `x` rounded to the nearest integer, ties to even, without a library call (`f32::round` is one on
/// CPUs without SSE4.1 at compile time): adding and removing `1.5 · 2²³`. Valid for `|x| < 2²²`;
/// codes are at most 128 in magnitude.
#[inline(always)]
pub(crate) fn round_code(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (x + MAGIC) - MAGIC
}

impl FromStr for QuantScheme {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "int8" => Ok(QuantScheme::Int8),
            "int4" => Ok(QuantScheme::Int4),
            other => Err(format!("unknown quantization `{other}` (int8, int4)")),
        }
    }
}

impl std::fmt::Display for QuantScheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            QuantScheme::Int8 => "int8",
            QuantScheme::Int4 => "int4",
        })
    }
}

/// What a weight matrix is, for deciding whether it is quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatrixRole {
    RoutedExpert,
    SharedExpert,
    /// q, k, v and o projections.
    Attention,
    /// The MLPs of dense (non-MoE) layers.
    DenseMlp,
    LmHead,
    /// Never quantized.
    Router,
}

/// The matrices quantized besides the routed experts (which always are, when quantizing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantScope {
    pub shared_experts: bool,
    pub attention: bool,
    pub dense_mlp: bool,
    pub lm_head: bool,
}

impl Default for QuantScope {
    /// Meta's choice for Scout on one GPU: routed and shared experts; attention, dense MLPs and
    /// `lm_head` stay as stored.
    fn default() -> Self {
        QuantScope { shared_experts: true, attention: false, dense_mlp: false, lm_head: false }
    }
}

impl QuantScope {
    /// Every matrix.
    pub const ALL: QuantScope = QuantScope { shared_experts: true, attention: true, dense_mlp: true, lm_head: true };
    /// The routed experts only.
    pub const ROUTED: QuantScope =
        QuantScope { shared_experts: false, attention: false, dense_mlp: false, lm_head: false };

    pub fn covers(&self, role: MatrixRole) -> bool {
        match role {
            MatrixRole::RoutedExpert => true,
            MatrixRole::SharedExpert => self.shared_experts,
            MatrixRole::Attention => self.attention,
            MatrixRole::DenseMlp => self.dense_mlp,
            MatrixRole::LmHead => self.lm_head,
            MatrixRole::Router => false,
        }
    }
}

impl FromStr for QuantScope {
    type Err = String;

    /// A comma-separated list of `routed`, `shared`, `attention`, `dense`, `lm-head`, or `all`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut scope = QuantScope::ROUTED;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "routed" => {}
                "shared" => scope.shared_experts = true,
                "attention" => scope.attention = true,
                "dense" => scope.dense_mlp = true,
                "lm-head" | "lm_head" => scope.lm_head = true,
                "all" => scope = QuantScope::ALL,
                other => {
                    return Err(format!(
                        "unknown quantization scope `{other}` (routed, shared, attention, dense, lm-head, all)"
                    ));
                }
            }
        }
        Ok(scope)
    }
}

impl std::fmt::Display for QuantScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = vec!["routed"];
        for (on, name) in [
            (self.shared_experts, "shared"),
            (self.attention, "attention"),
            (self.dense_mlp, "dense"),
            (self.lm_head, "lm-head"),
        ] {
            if on {
                parts.push(name);
            }
        }
        f.write_str(&parts.join(","))
    }
}

/// On-the-fly quantization: a scheme and the matrices it applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantize {
    pub scheme: QuantScheme,
    pub scope: QuantScope,
}

/// What the rows entering a product are multiplied as: with int8 or int4 weights (`Int8`), or with
/// bf16 weights (`Bf16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Activations {
    /// f32, against the weights widened in registers: the product the dequantised weights give
    /// (the default, and what the tests pin).
    #[default]
    F32,
    /// Quantized to int8, one scale per 32 values, and multiplied with integer dot products
    /// (AVX512-VNNI) for products of 1 to 8 rows; larger products, other weights and CPUs without
    /// the instructions stay f32 (docs/model.md, "Int8 activations").
    Int8,
    /// Rounded to bf16 and multiplied with bf16 weights by AVX512-BF16's `vdpbf16ps` (f32 sums),
    /// for products of one row, and of up to 64 rows (prefill in blocks of 64) where the CPU runs
    /// the instruction at least 1.25× as fast as f32 FMAs (measured at load, or
    /// `EPSERVE_BF16_ROWS`, whose `batched` leaves one-row products exact) or that has AMX-BF16
    /// (products of 16 rows and more on AMX tiles); other products, other weights and CPUs without
    /// the instruction stay f32 (docs/model.md, "bf16 mode").
    Bf16,
}

impl FromStr for Activations {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Activations::F32),
            "int8" => Ok(Activations::Int8),
            "bf16" => Ok(Activations::Bf16),
            other => Err(format!("unknown activation precision `{other}` (f32, int8, bf16)")),
        }
    }
}

impl std::fmt::Display for Activations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Activations::F32 => "f32",
            Activations::Int8 => "int8",
            Activations::Bf16 => "bf16",
        })
    }
}

/// How a load keeps weight matrices: their dtype ([`WeightStorage`]), which are quantized, and
/// what integer-quantized ones are multiplied with. Pre-quantized matrices of a checkpoint are kept
/// as stored whatever this says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoadPolicy {
    pub storage: WeightStorage,
    pub quantize: Option<Quantize>,
    pub activations: Activations,
}

impl LoadPolicy {
    /// The scheme a matrix of `role` is quantized with, if any.
    pub fn scheme_for(&self, role: MatrixRole) -> Option<QuantScheme> {
        self.quantize.filter(|q| q.scope.covers(role)).map(|q| q.scheme)
    }
}

impl From<WeightStorage> for LoadPolicy {
    fn from(storage: WeightStorage) -> Self {
        LoadPolicy { storage, quantize: None, activations: Activations::F32 }
    }
}
