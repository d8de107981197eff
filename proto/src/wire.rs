//! Exchange payloads: `rows × hidden` values of the wire dtype, little-endian, row-major. bf16 and
//! f32 are plain arrays; int8 carries each row as the bf16 scales of its groups of [`INT8_GROUP`]
//! values (`max |group| / 127`, rounded up), then the row's `hidden` signed bytes
//! (`value ≈ code · scale`): 1 + 2/32 bytes a value, 0.53× bf16's 2. Groups rather than one scale a
//! row: a hidden state's few large features would otherwise cost every other feature its precision.

use bytes::{Bytes, BytesMut};

use crate::v1::WireDtype as ProtoDtype;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireDtype {
    Bf16,
    F32,
    /// Symmetric 8-bit, one bf16 scale per group of [`INT8_GROUP`] values of a row.
    Int8,
}

/// Values per scale of the int8 wire.
pub const INT8_GROUP: usize = 32;

impl WireDtype {
    /// Bytes of one row of `hidden` values.
    pub fn row_bytes(self, hidden: usize) -> usize {
        match self {
            WireDtype::Bf16 => 2 * hidden,
            WireDtype::F32 => 4 * hidden,
            WireDtype::Int8 => 2 * hidden.div_ceil(INT8_GROUP) + hidden,
        }
    }

    /// Bytes of a payload of `rows` rows of `hidden` values.
    pub fn payload_bytes(self, rows: usize, hidden: usize) -> usize {
        rows * self.row_bytes(hidden)
    }

    pub fn to_proto(self) -> ProtoDtype {
        match self {
            WireDtype::Bf16 => ProtoDtype::Bf16,
            WireDtype::F32 => ProtoDtype::F32,
            WireDtype::Int8 => ProtoDtype::Int8,
        }
    }

    pub fn from_proto(value: i32) -> Option<Self> {
        match ProtoDtype::try_from(value).ok()? {
            ProtoDtype::Bf16 => Some(WireDtype::Bf16),
            ProtoDtype::F32 => Some(WireDtype::F32),
            ProtoDtype::Int8 => Some(WireDtype::Int8),
            ProtoDtype::Unspecified => None,
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "bf16" => Some(WireDtype::Bf16),
            "f32" => Some(WireDtype::F32),
            "int8" => Some(WireDtype::Int8),
            _ => None,
        }
    }

    /// Encodes `values`, rows of `hidden` (bf16 rounds to nearest even, as torch does; int8 rounds
    /// each value to the nearest step of its row's scale).
    pub fn encode(self, values: &[f32], hidden: usize) -> Bytes {
        let rows = values.len() / hidden.max(1);
        let mut out = BytesMut::with_capacity(self.payload_bytes(rows, hidden));
        match self {
            WireDtype::F32 => {
                for v in values {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            WireDtype::Bf16 => {
                for v in values {
                    out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes());
                }
            }
            WireDtype::Int8 => {
                for row in values.chunks(hidden.max(1)) {
                    let scales: Vec<f32> = row.chunks(INT8_GROUP).map(int8_scale).collect();
                    for s in &scales {
                        out.extend_from_slice(&half::bf16::from_f32(*s).to_le_bytes());
                    }
                    for (group, s) in row.chunks(INT8_GROUP).zip(&scales) {
                        out.extend(
                            group.iter().map(|v| {
                                if *s == 0.0 { 0u8 } else { (v / s).round().clamp(-127.0, 127.0) as i8 as u8 }
                            }),
                        );
                    }
                }
            }
        }
        out.freeze()
    }

    /// Decodes a payload of rows of `hidden` values into `out` (cleared first). The length must be
    /// [`WireDtype::payload_bytes`] of some number of rows.
    pub fn decode_into(self, payload: &[u8], hidden: usize, out: &mut Vec<f32>) {
        out.clear();
        match self {
            WireDtype::F32 => out.extend(payload.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
            WireDtype::Bf16 => {
                out.extend(payload.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()))
            }
            WireDtype::Int8 => {
                let groups = hidden.div_ceil(INT8_GROUP);
                for row in payload.chunks_exact(self.row_bytes(hidden)) {
                    let (scales, codes) = row.split_at(2 * groups);
                    for (s, group) in scales.chunks_exact(2).zip(codes.chunks(INT8_GROUP)) {
                        let s = half::bf16::from_le_bytes([s[0], s[1]]).to_f32();
                        out.extend(group.iter().map(|&c| f32::from(c as i8) * s));
                    }
                }
            }
        }
    }
}

/// The scale of one group: `max |group| / 127` as a bf16 value no smaller than that (no code is
/// clipped); 0 for an all-zero or non-finite group.
fn int8_scale(group: &[f32]) -> f32 {
    let amax = group.iter().fold(0f32, |m, v| m.max(v.abs()));
    if !amax.is_finite() || amax == 0.0 {
        return 0.0;
    }
    let s = half::bf16::from_f32(amax / 127.0);
    let s = if s.to_f32() * 127.0 < amax { half::bf16::from_bits(s.to_bits() + 1) } else { s };
    s.to_f32()
}

impl std::fmt::Display for WireDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WireDtype::Bf16 => "bf16",
            WireDtype::F32 => "f32",
            WireDtype::Int8 => "int8",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let values = [0.0f32, -1.5, 3.140625, 1e-3, 65504.0, -3.0e38];
        let mut out = Vec::new();
        WireDtype::F32.decode_into(&WireDtype::F32.encode(&values, 3), 3, &mut out);
        assert_eq!(out, values);
        let bytes = WireDtype::Bf16.encode(&values, 3);
        assert_eq!(bytes.len(), values.len() * 2);
        WireDtype::Bf16.decode_into(&bytes, 3, &mut out);
        for (a, b) in values.iter().zip(&out) {
            assert!((a - b).abs() <= a.abs() / 128.0, "{a} vs {b}");
        }
        assert_eq!(out[2], 3.140625, "exactly representable in bf16");
    }

    #[test]
    fn int8_groups_keep_half_a_step_of_their_own_scale() {
        let hidden = 64;
        // Rows of very different magnitudes: each keeps its own precision.
        let values: Vec<f32> = (0..3 * hidden)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * [1e-3, 1.0, 300.0][i / hidden])
            .chain(std::iter::repeat_n(0.0, hidden))
            .collect();
        let bytes = WireDtype::Int8.encode(&values, hidden);
        assert_eq!(bytes.len(), WireDtype::Int8.payload_bytes(4, hidden));
        assert!(bytes.len() * 100 < values.len() * 2 * 54, "about half of bf16's bytes");
        let mut out = Vec::new();
        WireDtype::Int8.decode_into(&bytes, hidden, &mut out);
        assert_eq!(out.len(), values.len());
        for (group, (a, b)) in values.chunks(INT8_GROUP).zip(out.chunks(INT8_GROUP)).enumerate() {
            // The bf16 scale is rounded up by at most 2⁻⁸ of itself.
            let step = a.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0 * (1.0 + 1.0 / 128.0);
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= step * 0.5, "group {group}: {x} vs {y}");
            }
        }
        assert!(out[3 * hidden..].iter().all(|&v| v == 0.0), "an all-zero row stays zero");
    }
}
