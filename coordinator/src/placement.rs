//! Static expert placement: which worker serves each (layer, expert), built from what the workers
//! report they host. Every expert of every MoE layer must have a host, or the coordinator refuses to
//! start and lists the gaps.

use epserve_model::TextConfig;

use crate::errors::TransportError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// `hosts[layer][expert]`: indices of the workers hosting it (empty for dense layers).
    hosts: Vec<Vec<Vec<usize>>>,
}

impl Placement {
    /// `hosted[w]` lists `(layer, experts)` for worker `w`.
    pub fn from_hosted(cfg: &TextConfig, hosted: &[Vec<(usize, Vec<u32>)>]) -> Self {
        let mut hosts = vec![vec![Vec::new(); cfg.num_local_experts]; cfg.num_hidden_layers];
        for (w, layers) in hosted.iter().enumerate() {
            for (layer, experts) in layers {
                for &e in experts {
                    if let Some(slot) = hosts.get_mut(*layer).and_then(|l| l.get_mut(e as usize)) {
                        slot.push(w);
                    }
                }
            }
        }
        Placement { hosts }
    }

    /// Fails with every (layer, expert) of an MoE layer that no worker hosts, compactly.
    pub fn check_complete(&self, cfg: &TextConfig) -> Result<(), TransportError> {
        let mut gaps = Vec::new();
        for layer in cfg.moe_layers() {
            let missing: Vec<u32> =
                (0..cfg.num_local_experts as u32).filter(|&e| self.hosts[layer][e as usize].is_empty()).collect();
            if !missing.is_empty() {
                gaps.push(format!("layer {layer}: experts {}", ranges(&missing)));
            }
        }
        if gaps.is_empty() {
            return Ok(());
        }
        let shown: Vec<&str> = gaps.iter().take(8).map(String::as_str).collect();
        let more = if gaps.len() > 8 { format!("; and {} more layers", gaps.len() - 8) } else { String::new() };
        Err(TransportError::Placement(format!("no worker hosts {}{more}", shown.join("; "))))
    }

    /// The worker that serves `(layer, expert)`: the first host (replicas are for failover).
    pub fn worker_for(&self, layer: usize, expert: u32) -> Option<usize> {
        self.hosts.get(layer)?.get(expert as usize)?.first().copied()
    }
}

/// `[0, 1, 2, 5, 7, 8]` → `0-2,5,7-8`.
fn ranges(ids: &[u32]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < ids.len() {
        let start = ids[i];
        let mut end = start;
        while i + 1 < ids.len() && ids[i + 1] == end + 1 {
            i += 1;
            end = ids[i];
        }
        parts.push(if start == end { start.to_string() } else { format!("{start}-{end}") });
        i += 1;
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> TextConfig {
        let json = epserve_model::synthetic::Preset::Tiny.config_json(480);
        epserve_model::ModelConfig::from_json(&json).expect("tiny").text
    }

    #[test]
    fn gaps_are_listed() {
        let cfg = cfg();
        let all_layers = |experts: Vec<u32>| (0..4).map(|l| (l, experts.clone())).collect::<Vec<_>>();
        let p = Placement::from_hosted(&cfg, &[all_layers((0..8).collect()), all_layers(vec![8, 9, 12])]);
        let err = p.check_complete(&cfg).expect_err("gaps").to_string();
        assert!(err.contains("layer 0: experts 10-11,13-15"), "{err}");
        let p = Placement::from_hosted(&cfg, &[all_layers((0..8).collect()), all_layers((8..16).collect())]);
        p.check_complete(&cfg).expect("complete");
        assert_eq!(p.worker_for(2, 9), Some(1));
    }
}
