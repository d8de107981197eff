//! Exchange payloads: `rows × hidden` little-endian values of the wire dtype.

use bytes::{Bytes, BytesMut};

use crate::v1::WireDtype as ProtoDtype;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireDtype {
    Bf16,
    F32,
}

impl WireDtype {
    pub fn size(self) -> usize {
        match self {
            WireDtype::Bf16 => 2,
            WireDtype::F32 => 4,
        }
    }

    pub fn to_proto(self) -> ProtoDtype {
        match self {
            WireDtype::Bf16 => ProtoDtype::Bf16,
            WireDtype::F32 => ProtoDtype::F32,
        }
    }

    pub fn from_proto(value: i32) -> Option<Self> {
        match ProtoDtype::try_from(value).ok()? {
            ProtoDtype::Bf16 => Some(WireDtype::Bf16),
            ProtoDtype::F32 => Some(WireDtype::F32),
            ProtoDtype::Unspecified => None,
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "bf16" => Some(WireDtype::Bf16),
            "f32" => Some(WireDtype::F32),
            _ => None,
        }
    }

    /// Encodes `values` (bf16 rounds to nearest even, as torch does).
    pub fn encode(self, values: &[f32]) -> Bytes {
        let mut out = BytesMut::with_capacity(values.len() * self.size());
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
        }
        out.freeze()
    }

    /// Decodes a payload into `out` (cleared first). The length must be a multiple of the size.
    pub fn decode_into(self, payload: &[u8], out: &mut Vec<f32>) {
        out.clear();
        match self {
            WireDtype::F32 => out.extend(payload.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
            WireDtype::Bf16 => {
                out.extend(payload.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()))
            }
        }
    }
}

impl std::fmt::Display for WireDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WireDtype::Bf16 => "bf16",
            WireDtype::F32 => "f32",
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
        WireDtype::F32.decode_into(&WireDtype::F32.encode(&values), &mut out);
        assert_eq!(out, values);
        let bytes = WireDtype::Bf16.encode(&values);
        assert_eq!(bytes.len(), values.len() * 2);
        WireDtype::Bf16.decode_into(&bytes, &mut out);
        for (a, b) in values.iter().zip(&out) {
            assert!((a - b).abs() <= a.abs() / 128.0, "{a} vs {b}");
        }
        assert_eq!(out[2], 3.140625, "exactly representable in bf16");
    }
}
