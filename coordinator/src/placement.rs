//! Checking that every expert of every MoE layer has a host, and listing the gaps compactly when
//! not (the coordinator refuses to start, or to wait any longer, with that list).

use epserve_model::TextConfig;

use crate::errors::TransportError;

/// Fails with every (layer, expert) of an MoE layer for which `has_host` is false, compactly.
pub fn check_complete(cfg: &TextConfig, has_host: impl Fn(usize, u32) -> bool) -> Result<(), TransportError> {
    let mut gaps = Vec::new();
    for layer in cfg.moe_layers() {
        let missing: Vec<u32> = (0..cfg.num_local_experts as u32).filter(|&e| !has_host(layer, e)).collect();
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
        let json = epserve_synthetic::Preset::Tiny.config_json(480);
        epserve_model::ModelConfig::from_json(&json).expect("tiny").text
    }

    #[test]
    fn gaps_are_listed() {
        let cfg = cfg();
        let hosted = |experts: Vec<u32>| move |_: usize, e: u32| experts.contains(&e);
        let err = check_complete(&cfg, hosted(vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12])).expect_err("gaps").to_string();
        assert!(err.contains("layer 0: experts 10-11,13-15"), "{err}");
        check_complete(&cfg, hosted((0..16).collect())).expect("complete");
    }
}
