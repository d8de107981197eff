//! A quantized weight matrix `[n, k]` (row-major, `nn.Linear`'s `[out, in]`): codes and group
//! scales, owned. Made at load from bf16 or f32 rows ([`QuantMatrix::quantize`]: epserve's own
//! schemes) or taken as a pre-quantized checkpoint stores it ([`QuantMatrix::from_parts`]:
//! compressed-tensors' packed int4 and FP8). The kernels read it through [`QuantMatrix::view`].

use half::{bf16, f16};

use super::QuantScheme;
use crate::error::{Error, Result};
use crate::kernels::source::int4_position;
use crate::kernels::{CodeKind, QuantView, ScalesRef, Weights};

/// Scales as stored: f16 for epserve's schemes (as GGUF's Q8_0/Q4_0: bf16's 8-bit mantissa
/// measurably hurt int8, docs/model.md), the checkpoint's dtype for pre-quantized ones.
#[derive(Debug, Clone)]
pub enum Scales {
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
    F32(Vec<f32>),
}

impl Scales {
    fn view(&self) -> ScalesRef<'_> {
        match self {
            Scales::F16(s) => ScalesRef::F16(s),
            Scales::Bf16(s) => ScalesRef::Bf16(s),
            Scales::F32(s) => ScalesRef::F32(s),
        }
    }

    fn len(&self) -> usize {
        match self {
            Scales::F16(s) => s.len(),
            Scales::Bf16(s) => s.len(),
            Scales::F32(s) => s.len(),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Scales::F16(s) => s.len() * 2,
            Scales::Bf16(s) => s.len() * 2,
            Scales::F32(s) => s.len() * 4,
        }
    }
}

/// The group size of a layout: a power of two of at least 16 elements, or a whole row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    Elements(usize),
    Row,
}

impl Group {
    fn shift(self) -> Result<u32> {
        match self {
            Group::Row => Ok(usize::BITS - 1),
            Group::Elements(g) if g.is_power_of_two() && g >= 16 => Ok(g.trailing_zeros()),
            Group::Elements(g) => Err(Error::Input(format!(
                "quantization group size {g} is not supported (a power of two of at least 16, or per channel)"
            ))),
        }
    }

    /// Groups in a row of `k` elements.
    pub fn per_row(self, k: usize) -> usize {
        match self {
            Group::Row => 1,
            Group::Elements(g) => k.div_ceil(g),
        }
    }
}

#[derive(Debug, Clone)]
pub struct QuantMatrix {
    kind: CodeKind,
    n: usize,
    k: usize,
    group_shift: u32,
    codes: Vec<u8>,
    scales: Scales,
    activations: super::Activations,
}

impl QuantMatrix {
    /// A matrix from its stored parts: `codes` as [`CodeKind`] describes them (rows of
    /// `kind.row_bytes(k)` bytes), `scales` `[n, group.per_row(k)]`.
    pub fn from_parts(
        kind: CodeKind,
        (n, k): (usize, usize),
        group: Group,
        codes: Vec<u8>,
        scales: Scales,
    ) -> Result<Self> {
        let group_shift = group.shift()?;
        if codes.len() != n * kind.row_bytes(k) {
            return Err(Error::Input(format!("{} bytes of codes for a [{n}, {k}] {kind:?} matrix", codes.len())));
        }
        if scales.len() != n * group.per_row(k) {
            return Err(Error::Input(format!(
                "{} scales for a [{n}, {k}] matrix in {} groups per row",
                scales.len(),
                group.per_row(k)
            )));
        }
        Ok(QuantMatrix { kind, n, k, group_shift, codes, scales, activations: super::Activations::F32 })
    }

    /// Quantizes `w` (`[n, k]`, f32 or bf16; not quantized) with `scheme`, rows in parallel on
    /// rayon's pool: no copy of the matrix is made in any other dtype.
    pub fn quantize(w: Weights<'_>, (n, k): (usize, usize), scheme: QuantScheme) -> Result<Self> {
        use rayon::prelude::*;
        if w.len() != n * k {
            return Err(Error::Input(format!("{} weights for a [{n}, {k}] matrix", w.len())));
        }
        if matches!(w, Weights::Quant(_)) {
            return Err(Error::Input("the matrix is quantized already".into()));
        }
        let group = scheme.group();
        let (kind, per_row) = (scheme.kind(), Group::Elements(group).per_row(k));
        let row_bytes = kind.row_bytes(k).max(1);
        let mut codes = vec![0u8; n * kind.row_bytes(k)];
        let mut scales = vec![half::f16::ZERO; n * per_row];
        let quantize_row = |(r, (row_codes, row_scales)): (usize, (&mut [u8], &mut [f16]))| {
            let mut buf = vec![0f32; group];
            for (g, scale_out) in row_scales.iter_mut().enumerate() {
                let (start, end) = (g * group, ((g + 1) * group).min(k));
                let values = &mut buf[..end - start];
                for (i, v) in values.iter_mut().enumerate() {
                    *v = match w {
                        Weights::F32(w) => w[r * k + start + i],
                        Weights::Bf16(w) | Weights::Bf16Products(w) => w[r * k + start + i].to_f32(),
                        Weights::Quant(_) => 0.0,
                    };
                }
                let scale = scheme.scale_for(values);
                *scale_out = scale;
                let s = scale.to_f32();
                for (i, &v) in values.iter().enumerate() {
                    let q = if s == 0.0 { 0.0 } else { super::round_code(v / s) };
                    let at = start + i;
                    match kind {
                        CodeKind::Int8 => row_codes[at] = q.clamp(-127.0, 127.0) as i8 as u8,
                        _ => {
                            let code = (q + 8.0).clamp(0.0, 15.0) as u8;
                            let (byte, shift) = int4_position(k, at);
                            row_codes[byte] |= code << shift;
                        }
                    }
                }
            }
        };
        codes.par_chunks_mut(row_bytes).zip(scales.par_chunks_mut(per_row.max(1))).enumerate().for_each(quantize_row);
        Self::from_parts(kind, (n, k), Group::Elements(group), codes, Scales::F16(scales))
    }

    /// E.g. `int4 (group 32, f16 scales)`, `fp8-e4m3 (per channel, bf16 scales)`.
    pub fn describe(&self) -> String {
        let kind = match self.kind {
            CodeKind::Int8 => "int8",
            CodeKind::Int4 => "int4",
            CodeKind::Fp8E4m3 => "fp8-e4m3",
        };
        let group = if self.group_shift >= usize::BITS - 1 {
            "per channel".to_owned()
        } else {
            format!("group {}", 1usize << self.group_shift)
        };
        let scales = match self.scales {
            Scales::F16(_) => "f16",
            Scales::Bf16(_) => "bf16",
            Scales::F32(_) => "f32",
        };
        format!("{kind} ({group}, {scales} scales)")
    }

    pub fn kind(&self) -> CodeKind {
        self.kind
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Bytes held: codes and scales.
    pub fn bytes(&self) -> u64 {
        (self.codes.len() + self.scales.bytes()) as u64
    }

    pub fn view(&self) -> QuantView<'_> {
        QuantView::new(self.kind, &self.codes, self.scales.view(), self.k, self.group_shift)
            .with_int8_activations(self.activations == super::Activations::Int8)
    }

    /// The same matrix, multiplied with `activations` from now on.
    pub fn with_activations(self, activations: super::Activations) -> Self {
        QuantMatrix { activations, ..self }
    }

    /// Every weight as f32, `[n, k]`: the reference the kernels compute exactly.
    pub fn dequantize(&self) -> Vec<f32> {
        let v = self.view();
        (0..self.n).flat_map(|r| (0..self.k).map(move |i| (r, i))).map(|(r, i)| v.dequantize(r, i)).collect()
    }
}

impl QuantMatrix {
    /// `a`'s rows then `b`'s (e.g. gate and up fused into one product); both must share their
    /// layout.
    pub fn concat_rows(a: QuantMatrix, b: QuantMatrix) -> Result<QuantMatrix> {
        if (a.kind, a.k, a.group_shift) != (b.kind, b.k, b.group_shift) {
            return Err(Error::Input("cannot fuse quantized matrices of different layouts".into()));
        }
        let scales = match (a.scales, b.scales) {
            (Scales::F16(mut x), Scales::F16(y)) => {
                x.extend(y);
                Scales::F16(x)
            }
            (Scales::Bf16(mut x), Scales::Bf16(y)) => {
                x.extend(y);
                Scales::Bf16(x)
            }
            (Scales::F32(mut x), Scales::F32(y)) => {
                x.extend(y);
                Scales::F32(x)
            }
            _ => return Err(Error::Input("cannot fuse quantized matrices with scales of different dtypes".into())),
        };
        let mut codes = a.codes;
        codes.extend(b.codes);
        Ok(QuantMatrix { n: a.n + b.n, codes, scales, ..a })
    }
}
