//! Validated exchange requests. Everything a worker can check without knowing its model happens
//! here, once, on receipt; model-specific checks (is the expert hosted, is the layer an MoE layer)
//! belong to the worker.

use bytes::Bytes;

use crate::v1::{ExchangeRequest, ExpertRows};
use crate::wire::WireDtype;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidExchange(pub String);

/// `rows` consecutive rows for `expert`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowGroup {
    pub expert: u32,
    pub rows: u32,
}

#[derive(Debug, Clone)]
pub struct Exchange {
    pub id: u64,
    pub step: u64,
    pub layer: u32,
    pub micro_batch: u32,
    pub groups: Vec<RowGroup>,
    pub dtype: WireDtype,
    pub hidden: usize,
    pub payload: Bytes,
}

impl Exchange {
    pub fn total_rows(&self) -> usize {
        self.groups.iter().map(|g| g.rows as usize).sum()
    }

    pub fn into_proto(self) -> ExchangeRequest {
        ExchangeRequest {
            id: self.id,
            step: self.step,
            layer: self.layer,
            micro_batch: self.micro_batch,
            groups: self.groups.iter().map(|g| ExpertRows { expert: g.expert, rows: g.rows }).collect(),
            dtype: self.dtype.to_proto() as i32,
            hidden: self.hidden as u32,
            payload: self.payload,
        }
    }
}

impl TryFrom<ExchangeRequest> for Exchange {
    type Error = InvalidExchange;

    fn try_from(r: ExchangeRequest) -> Result<Self, Self::Error> {
        let dtype = WireDtype::from_proto(r.dtype)
            .ok_or_else(|| InvalidExchange(format!("exchange {}: unknown wire dtype {}", r.id, r.dtype)))?;
        if r.hidden == 0 {
            return Err(InvalidExchange(format!("exchange {}: hidden size is 0", r.id)));
        }
        if r.groups.is_empty() {
            return Err(InvalidExchange(format!("exchange {}: no expert groups", r.id)));
        }
        let mut seen = std::collections::HashSet::new();
        for g in &r.groups {
            if !seen.insert(g.expert) {
                return Err(InvalidExchange(format!("exchange {}: expert {} appears in two groups", r.id, g.expert)));
            }
        }
        let rows: u64 = r.groups.iter().map(|g| u64::from(g.rows)).sum();
        // Both factors are the sender's: unchecked, 2³¹ rows of 2³¹ f32 values wrapped to 0 bytes, and
        // an empty payload passed as that many rows (found by fuzz/fuzz_targets/exchange_frame.rs).
        let expected = rows.checked_mul(dtype.row_bytes(r.hidden as usize) as u64).ok_or_else(|| {
            InvalidExchange(format!("exchange {}: {rows} rows of {} values is more than any payload", r.id, r.hidden))
        })?;
        if r.payload.len() as u64 != expected {
            return Err(InvalidExchange(format!(
                "exchange {}: payload is {} bytes, {rows} rows of {} values × {} bytes a row ({dtype}) = {expected}",
                r.id,
                r.payload.len(),
                r.hidden,
                dtype.row_bytes(r.hidden as usize)
            )));
        }
        Ok(Exchange {
            id: r.id,
            step: r.step,
            layer: r.layer,
            micro_batch: r.micro_batch,
            groups: r.groups.iter().map(|g| RowGroup { expert: g.expert, rows: g.rows }).collect(),
            dtype,
            hidden: r.hidden as usize,
            payload: r.payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(payload_len: usize) -> ExchangeRequest {
        ExchangeRequest {
            id: 7,
            step: 1,
            layer: 2,
            micro_batch: 0,
            groups: vec![ExpertRows { expert: 3, rows: 2 }, ExpertRows { expert: 5, rows: 1 }],
            dtype: WireDtype::Bf16.to_proto() as i32,
            hidden: 4,
            payload: Bytes::from(vec![0u8; payload_len]),
        }
    }

    #[test]
    fn validates_payload_length_and_dtype() {
        let ok = Exchange::try_from(request(3 * 4 * 2)).expect("valid");
        assert_eq!(ok.total_rows(), 3);
        let err = Exchange::try_from(request(10)).expect_err("short payload");
        assert!(err.0.contains("payload is 10 bytes"), "{err}");
        let mut r = request(24);
        r.dtype = 0;
        assert!(Exchange::try_from(r).is_err());
        let mut r = request(24);
        r.groups[1].expert = 3;
        assert!(Exchange::try_from(r).expect_err("duplicate").0.contains("two groups"));
    }

    #[test]
    fn refuses_rows_whose_size_overflows() {
        // fuzz/corpus/exchange_frame/regression-rows-overflow: 2³¹ rows of 2³¹ f32 values announce
        // 2⁶⁴ bytes, which wrapped to the 0 bytes sent.
        let r = ExchangeRequest {
            groups: vec![ExpertRows { expert: 0, rows: 1 << 31 }],
            dtype: WireDtype::F32.to_proto() as i32,
            hidden: 1 << 31,
            payload: Bytes::new(),
            ..request(0)
        };
        let err = Exchange::try_from(r).expect_err("2^64 bytes announced, none sent");
        assert!(err.0.contains("more than any payload"), "{err}");
    }
}
