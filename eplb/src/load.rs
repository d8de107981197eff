//! Token loads per (MoE layer, expert): summed over a whole trace ([`LoadMatrix`], what a placement
//! can fix) or for one step ([`StepLoads`], what that step waits on).

use serde::{Deserialize, Serialize};

use crate::error::PlanError;

/// Tokens routed to each expert of each MoE layer: `loads[i][e]` is for layer `layers[i]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadMatrix {
    pub layers: Vec<u32>,
    pub loads: Vec<Vec<f64>>,
}

impl LoadMatrix {
    /// All-zero loads for `layers` of `experts` experts each.
    pub fn zeros(layers: &[u32], experts: usize) -> Self {
        LoadMatrix { layers: layers.to_vec(), loads: vec![vec![0.0; experts]; layers.len()] }
    }

    /// Adds a step's routed-token counts (same layers, in the same order).
    pub fn add_step(&mut self, step: &StepLoads) {
        for (row, counts) in self.loads.iter_mut().zip(&step.counts) {
            for (l, &c) in row.iter_mut().zip(counts) {
                *l += f64::from(c);
            }
        }
    }

    /// The loads of `layer`, if it is one of the matrix's.
    pub fn layer(&self, layer: u32) -> Option<&[f64]> {
        self.layers.iter().position(|&l| l == layer).map(|i| self.loads[i].as_slice())
    }

    /// Checks the shape and that every load is a finite non-negative number.
    pub fn validate(&self) -> Result<(), PlanError> {
        if self.layers.len() != self.loads.len() {
            return Err(PlanError::Shape { layers: self.layers.len(), rows: self.loads.len() });
        }
        for (&layer, row) in self.layers.iter().zip(&self.loads) {
            if let Some((expert, &value)) = row.iter().enumerate().find(|(_, v)| !v.is_finite() || **v < 0.0) {
                return Err(PlanError::BadLoad { layer, expert, value });
            }
        }
        Ok(())
    }

    /// Each expert's share of its layer's tokens, hottest first, averaged over layers (a layer's
    /// ranking is its own: popularity is compared by rank, not by expert id).
    pub fn mean_ranked_shares(&self) -> Vec<f64> {
        let experts = self.loads.first().map_or(0, Vec::len);
        let mut out = vec![0.0; experts];
        let mut counted = 0usize;
        for row in &self.loads {
            let total: f64 = row.iter().sum();
            if total <= 0.0 {
                continue;
            }
            let mut shares: Vec<f64> = row.iter().map(|l| l / total).collect();
            shares.sort_by(|a, b| b.total_cmp(a));
            for (o, s) in out.iter_mut().zip(shares) {
                *o += s;
            }
            counted += 1;
        }
        if counted > 0 {
            out.iter_mut().for_each(|o| *o /= counted as f64);
        }
        out
    }
}

/// Routed-token counts of one step: `counts[i][e]` for the trace's `i`-th MoE layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepLoads {
    /// Microseconds since the Unix epoch when the step finished.
    pub timestamp_us: u64,
    /// Tokens the step computed (rows of its first MoE layer).
    pub tokens: u32,
    pub counts: Vec<Vec<u32>>,
}
