//! Pre-quantized checkpoints as compressed-tensors (the format llm-compressor and the hub's
//! `RedHatAI/*` checkpoints use) writes them, read as published: `quantization_config` in
//! `config.json` says the scheme, and every quantized `nn.Linear` `X` is stored as
//!
//! - `pack-quantized` (W4A16, W8A16): `X.weight_packed` int32 `[out, ⌈in·bits/32⌉]`, each int32
//!   holding `32/bits` values, the lowest-indexed in the low bits, each stored as value + 2^(bits−1);
//!   `X.weight_scale` `[out, ⌈in/group⌉]` (or `[out, 1]` per channel); `X.weight_shape` `[out, in]`.
//!   `w = (code − 2^(bits−1)) · scale`. Symmetric only (a `weight_zero_point` is refused), no
//!   activation ordering (`weight_g_idx` is refused).
//! - `float-quantized` (FP8): `X.weight` `float8_e4m3fn` `[out, in]` and `X.weight_scale` `[out, 1]`
//!   (per channel) or one value (per tensor): `w = fp8(code) · scale`. Activations are not quantized
//!   here: the products run in f32 on the dequantised weights, which is what dynamic per-token
//!   activation scales approximate.
//!
//! Anything else (integer activations as in W8A8, asymmetric weights, other formats or methods) is
//! refused when the checkpoint is opened, with a message naming the scheme.

use serde::Deserialize;
use std::collections::BTreeMap;

use super::matrix::{Group, QuantMatrix, Scales};
use crate::kernels::CodeKind;
use crate::kernels::source::int4_from_sequential;

/// The pre-quantized formats this loader reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Packed integers of `bits` bits with a group size.
    PackQuantized { bits: u32, group: Group },
    /// FP8 E4M3 weights with per-channel (or per-tensor) scales.
    FloatQuantized,
}

/// A checkpoint's `quantization_config`, as far as loading needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompressedTensors {
    pub format: Format,
    /// The published scheme, for messages and `Status`: e.g. `pack-quantized int4 group 128`.
    pub description: String,
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    quant_method: Option<String>,
    format: Option<String>,
    #[serde(default)]
    config_groups: BTreeMap<String, RawGroup>,
}

#[derive(Debug, Deserialize)]
struct RawGroup {
    format: Option<String>,
    weights: Option<RawArgs>,
    input_activations: Option<RawArgs>,
    output_activations: Option<RawArgs>,
}

#[derive(Debug, Deserialize)]
struct RawArgs {
    num_bits: u32,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default = "yes")]
    symmetric: bool,
    strategy: Option<String>,
    group_size: Option<i64>,
    #[serde(default)]
    dynamic: serde_json::Value,
    #[serde(default)]
    actorder: serde_json::Value,
    #[serde(default)]
    block_structure: serde_json::Value,
}

fn yes() -> bool {
    true
}

impl RawArgs {
    fn describe(&self) -> String {
        let mut s = format!(
            "{}{} {} {}",
            self.kind,
            self.num_bits,
            if self.symmetric { "symmetric" } else { "asymmetric" },
            self.strategy.as_deref().unwrap_or("?")
        );
        if let Some(g) = self.group_size {
            s += &format!(" {g}");
        }
        s
    }
}

impl CompressedTensors {
    /// The scheme of `quantization_config` (the JSON object of `config.json`), or a refusal naming
    /// what is not supported.
    pub fn parse(config: &serde_json::Value) -> Result<Self, String> {
        let raw: RawConfig = serde_json::from_value(config.clone()).map_err(|e| format!("unreadable: {e}"))?;
        let method = raw.quant_method.as_deref().unwrap_or("(none)");
        if method != "compressed-tensors" {
            return Err(format!(
                "quant_method `{method}` is not supported (compressed-tensors pack-quantized W4A16/W8A16 and \
                 float-quantized FP8 are; other checkpoints can be quantized at load with --quantize)"
            ));
        }
        let mut found: Option<(Format, String)> = None;
        for (name, group) in &raw.config_groups {
            let format = group.format.as_deref().or(raw.format.as_deref()).unwrap_or("(none)");
            let weights =
                group.weights.as_ref().ok_or_else(|| format!("config group `{name}` quantizes no weights"))?;
            let scheme = format!(
                "format `{format}`, weights {}, input activations {}",
                weights.describe(),
                group.input_activations.as_ref().map_or("none".into(), RawArgs::describe)
            );
            let refuse = |why: &str| format!("compressed-tensors scheme ({scheme}) is not supported: {why}");
            if group.output_activations.is_some() {
                return Err(refuse("output activations are quantized"));
            }
            let parsed = match format {
                "pack-quantized" => {
                    if weights.kind != "int" || !matches!(weights.num_bits, 4 | 8) {
                        return Err(refuse("packed weights must be 4- or 8-bit integers"));
                    }
                    if !weights.symmetric {
                        return Err(refuse("asymmetric weights (zero points) are not read"));
                    }
                    if !weights.actorder.is_null() && weights.actorder != serde_json::Value::Bool(false) {
                        return Err(refuse("activation ordering (g_idx) is not read"));
                    }
                    if let Some(a) = &group.input_activations {
                        return Err(refuse(&format!(
                            "input activations quantized to {}{} (only weight-only W4A16/W8A16 is)",
                            a.kind, a.num_bits
                        )));
                    }
                    let group = match (weights.strategy.as_deref(), weights.group_size) {
                        (Some("group"), Some(g)) if g > 0 => Group::Elements(g as usize),
                        (Some("channel"), _) => Group::Row,
                        _ => return Err(refuse("weights must be quantized per group or per channel")),
                    };
                    Format::PackQuantized { bits: weights.num_bits, group }
                }
                "float-quantized" => {
                    if weights.kind != "float" || weights.num_bits != 8 {
                        return Err(refuse("float-quantized weights must be 8-bit floats"));
                    }
                    if !matches!(weights.strategy.as_deref(), Some("channel" | "tensor"))
                        || !weights.block_structure.is_null()
                    {
                        return Err(refuse("FP8 weights must have per-channel or per-tensor scales"));
                    }
                    if let Some(a) = &group.input_activations {
                        let dynamic = a.dynamic == serde_json::Value::Bool(true);
                        if a.kind != "float" || !dynamic {
                            return Err(refuse("input activations must be dynamic FP8 (or not quantized)"));
                        }
                    }
                    Format::FloatQuantized
                }
                other => return Err(refuse(&format!("format `{other}` is not read"))),
            };
            if let Some((prev, _)) = &found
                && *prev != parsed
            {
                return Err(refuse("config groups with different schemes are not read"));
            }
            found = Some((parsed, scheme));
        }
        let (format, description) = found.ok_or("compressed-tensors config has no config_groups")?;
        Ok(CompressedTensors { format, description })
    }
}

/// A stored tensor's raw bytes with its safetensors dtype and shape.
#[derive(Debug)]
pub struct Raw<'a> {
    pub dtype: safetensors::Dtype,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

/// The matrix `{base}weight…` `[n, k]` of a compressed-tensors checkpoint, or `None` when it is not
/// stored quantized. `tensor(name)` gives a stored tensor's raw bytes.
pub fn load<'a>(
    ct: &CompressedTensors,
    base: &str,
    (n, k): (usize, usize),
    tensor: impl Fn(&str) -> Option<Raw<'a>>,
) -> Result<Option<QuantMatrix>, String> {
    use safetensors::Dtype;
    let name = |suffix: &str| format!("{base}{suffix}");
    let scales = |per_row: usize| -> Result<Scales, String> {
        let key = name("weight_scale");
        let raw = tensor(&key).ok_or_else(|| format!("`{key}` is missing"))?;
        let count: usize = raw.shape.iter().product();
        let values = match raw.dtype {
            Dtype::BF16 => {
                Scales::Bf16(raw.bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]])).collect())
            }
            Dtype::F16 => {
                Scales::F16(raw.bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]])).collect())
            }
            Dtype::F32 => {
                Scales::F32(raw.bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
            }
            other => return Err(format!("`{key}` is {other:?}; scales must be bf16, f16 or f32")),
        };
        if count == n * per_row {
            return Ok(values);
        }
        // One scale for the whole tensor: given to every row.
        if count == 1 && per_row == 1 {
            return Ok(match values {
                Scales::Bf16(v) => Scales::Bf16(vec![v[0]; n]),
                Scales::F16(v) => Scales::F16(vec![v[0]; n]),
                Scales::F32(v) => Scales::F32(vec![v[0]; n]),
            });
        }
        Err(format!("`{key}` has shape {:?}; expected [{n}, {per_row}]", raw.shape))
    };
    match ct.format {
        Format::PackQuantized { bits, group } => {
            let Some(packed) = tensor(&name("weight_packed")) else { return Ok(None) };
            for refused in ["weight_zero_point", "weight_g_idx"] {
                if tensor(&name(refused)).is_some() {
                    return Err(format!("`{}` is present: {} are not read", name(refused), refused));
                }
            }
            if let Some(shape) = tensor(&name("weight_shape")) {
                let stored: Vec<i64> = match shape.dtype {
                    Dtype::I64 => shape
                        .bytes
                        .chunks_exact(8)
                        .map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
                        .collect(),
                    Dtype::I32 => shape
                        .bytes
                        .chunks_exact(4)
                        .map(|b| i64::from(i32::from_le_bytes(b.try_into().unwrap_or([0; 4]))))
                        .collect(),
                    other => return Err(format!("`{}` is {other:?}", name("weight_shape"))),
                };
                if stored != [n as i64, k as i64] {
                    return Err(format!("`{}` says {stored:?}; the model expects [{n}, {k}]", name("weight_shape")));
                }
            }
            let words = (k * bits as usize).div_ceil(32);
            if packed.dtype != Dtype::I32 || packed.shape != [n, words] {
                return Err(format!(
                    "`{}` is {:?} {:?}; expected I32 [{n}, {words}]",
                    name("weight_packed"),
                    packed.dtype,
                    packed.shape
                ));
            }
            // Little-endian int32 words, lowest-indexed value in the low bits: for 4 bits, codes of
            // value + 8 two per byte in order, rewritten in CodeKind::Int4's chunk order; for 8
            // bits, bytes of value + 128, turned into signed bytes.
            let kind = if bits == 4 { CodeKind::Int4 } else { CodeKind::Int8 };
            let row_bytes = kind.row_bytes(k);
            let mut codes = vec![0u8; n * row_bytes];
            for (row, out) in packed.bytes.chunks_exact(words * 4).zip(codes.chunks_exact_mut(row_bytes.max(1))) {
                if bits == 4 {
                    int4_from_sequential(&row[..row_bytes], k, out);
                } else {
                    out.copy_from_slice(&row[..row_bytes]);
                }
            }
            if bits == 8 {
                codes.iter_mut().for_each(|c| *c ^= 0x80);
            }
            let scales = scales(group.per_row(k))?;
            QuantMatrix::from_parts(kind, (n, k), group, codes, scales).map(Some).map_err(|e| e.to_string())
        }
        Format::FloatQuantized => {
            let key = name("weight");
            let Some(w) = tensor(&key) else { return Ok(None) };
            if w.dtype != Dtype::F8_E4M3 {
                return Ok(None);
            }
            if w.shape != [n, k] {
                return Err(format!("`{key}` has shape {:?}; expected [{n}, {k}]", w.shape));
            }
            let scales = scales(1)?;
            QuantMatrix::from_parts(CodeKind::Fp8E4m3, (n, k), Group::Row, w.bytes.to_vec(), scales)
                .map(Some)
                .map_err(|e| e.to_string())
        }
    }
}
