//! One MoE layer's placement as the planners work on it: which experts each worker holds, and the
//! worker loads that follow (an expert's tokens split evenly across its replicas).

use epserve_control::PlacementMap;

use crate::error::PlanError;

#[derive(Debug, Clone)]
pub(crate) struct LayerState<'a> {
    pub load: &'a [f64],
    pub slots: usize,
    /// `bins[w]`: the experts worker `w` holds, each at most once.
    pub bins: Vec<Vec<u32>>,
    /// `replicas[e]`: how many workers hold expert `e`.
    pub replicas: Vec<usize>,
}

impl<'a> LayerState<'a> {
    pub fn empty(load: &'a [f64], workers: usize, slots: usize) -> Self {
        LayerState { load, slots, bins: vec![Vec::new(); workers], replicas: vec![0; load.len()] }
    }

    /// The layer `layer` of `current`, over `workers`; every host must be one of `workers`, every
    /// expert placed, and no worker over `slots`.
    pub fn from_placement(
        load: &'a [f64],
        layer: u32,
        current: &PlacementMap,
        workers: &[String],
        slots: usize,
    ) -> Result<Self, PlanError> {
        let Some(lp) = current.layers.iter().find(|l| l.layer == layer) else {
            return Err(PlanError::Current(format!("has no layer {layer}")));
        };
        if lp.hosts.len() != load.len() {
            return Err(PlanError::Current(format!(
                "layer {layer} lists {} experts, the trace {}",
                lp.hosts.len(),
                load.len()
            )));
        }
        let mut s = LayerState::empty(load, workers.len(), slots);
        for (e, hosts) in lp.hosts.iter().enumerate() {
            if hosts.is_empty() {
                return Err(PlanError::Current(format!("layer {layer}: expert {e} has no host")));
            }
            for h in hosts {
                let Some(w) = workers.iter().position(|x| x == h) else {
                    return Err(PlanError::Current(format!("layer {layer}: host {h:?} is not one of the workers")));
                };
                if !s.bins[w].contains(&(e as u32)) {
                    s.add(e as u32, w);
                }
            }
        }
        if let Some((w, bin)) = s.bins.iter().enumerate().find(|(_, b)| b.len() > slots) {
            return Err(PlanError::Current(format!(
                "layer {layer}: worker {:?} holds {} experts, more than {slots} slots",
                workers[w],
                bin.len()
            )));
        }
        Ok(s)
    }

    pub fn add(&mut self, e: u32, w: usize) {
        self.bins[w].push(e);
        self.replicas[e as usize] += 1;
    }

    pub fn remove(&mut self, e: u32, w: usize) {
        if let Some(i) = self.bins[w].iter().position(|&x| x == e) {
            self.bins[w].swap_remove(i);
            self.replicas[e as usize] -= 1;
        }
    }

    pub fn holds(&self, w: usize, e: u32) -> bool {
        self.bins[w].contains(&e)
    }

    /// The load one replica of `e` carries.
    pub fn share(&self, e: u32) -> f64 {
        self.load[e as usize] / self.replicas[e as usize].max(1) as f64
    }

    pub fn worker_loads(&self) -> Vec<f64> {
        self.bins.iter().map(|b| b.iter().map(|&e| self.share(e)).sum()).collect()
    }

    /// `hosts[e]`: worker ids in worker order.
    pub fn hosts(&self, workers: &[String]) -> Vec<Vec<String>> {
        let mut hosts = vec![Vec::new(); self.load.len()];
        for (w, bin) in self.bins.iter().enumerate() {
            for &e in bin {
                hosts[e as usize].push(workers[w].clone());
            }
        }
        hosts
    }
}

/// A layer's objective: the most loaded worker, plus a little of the spread so that a move that
/// evens out the other workers counts even while a tie keeps the maximum where it is.
pub(crate) fn objective(loads: &[f64]) -> f64 {
    let n = loads.len().max(1) as f64;
    let mean = loads.iter().sum::<f64>() / n;
    let max = loads.iter().copied().fold(0.0, f64::max);
    let spread = (loads.iter().map(|l| (l - mean) * (l - mean)).sum::<f64>() / n).sqrt();
    max + 0.05 * spread
}
