//! `--router-skew zipf:S`: a skewed `mini` checkpoint, read back the way the servers read it, routes
//! held-out text (not the calibration tokens; short and long prompts) with the hottest expert of every MoE layer
//! near Zipf's share and the experts in the recorded order; an unskewed checkpoint does not.

use std::path::Path;

use candle_core::{DType, Device};
use epserve_model::{
    Checkpoint, ExpertShard, LogitsFor, ModelConfig, RoutingTrace, SequenceStep, TextModel, WeightStorage,
};
use epserve_synthetic::{CheckpointOptions, Preset, RouterSkew, SKEW_FILE, write_checkpoint};
use serde_json::Value;

const TEXT: &[&str] = &[
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch of his old house.",
    "In 1969 two astronauts walked on the Moon, and millions of people watched the grainy pictures on television.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Expert parallelism spreads the experts of a mixture-of-experts model over many workers, one shard each.",
    "Bonjour, je voudrais réserver une table pour quatre personnes ce soir à vingt heures, s'il vous plaît.",
    "SELECT name, count(*) FROM orders JOIN customers USING (customer_id) GROUP BY name ORDER BY 2 DESC;",
    "Rain fell on the city all night; by morning the river had risen above the second step of the old bridge.",
    "Prices rose 3.2 % in the year to March, driven by energy, food and the cost of housing services.",
    "Dear team, the quarterly report is attached; please send me your comments before Friday afternoon.",
    "fn main() { let v: Vec<u32> = (0..10).map(|x| x * x).collect(); println!(\"{v:?}\"); }",
    "The mitochondria is the powerhouse of the cell, turning sugar and oxygen into the energy it runs on.",
    "Turn left at the second traffic light, then keep going until you see the bakery on the corner.",
    "Q: What is the capital of Australia? A: Canberra, although Sydney and Melbourne are larger cities.",
    "<html><body><h1>Welcome</h1><p>This page is under construction. Come back soon!</p></body></html>",
    "She sold her bicycle, bought a train ticket to the coast and never looked back at the grey town.",
    "Gradient descent updates each weight by a small step against the gradient of the loss function.",
];

/// Share of each expert in the routed rows of every MoE layer, for the held-out text.
fn measured_shares(dir: &Path) -> Vec<(usize, Vec<f64>)> {
    let cfg = ModelConfig::from_file(&dir.join("config.json")).expect("config");
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).expect("tokenizer");
    let ckpt = Checkpoint::open(dir).expect("checkpoint opens");
    let dev = Device::Cpu;
    let experts = cfg.text.num_local_experts;
    let all: Vec<u32> = (0..experts as u32).collect();
    let model = TextModel::load(&cfg, &ckpt, DType::F32, WeightStorage::AsStored, &dev, &mut |_, _| {})
        .expect("text model loads");
    let shard = ExpertShard::load(&cfg, &ckpt, &all, DType::F32, WeightStorage::AsStored, &dev, &mut || {})
        .expect("experts load");
    // Each sentence alone (short prompts), and all of them as one long prompt.
    let joined = TEXT.join("\n");
    let sequences: Vec<Vec<u32>> = TEXT
        .iter()
        .copied()
        .chain([joined.as_str()])
        .map(|t| tokenizer.encode(t, true).expect("encodes").get_ids().to_vec())
        .collect();
    let mut counts: std::collections::BTreeMap<usize, Vec<u32>> = Default::default();
    for seq in &sequences {
        let mut cache = model.new_cache();
        let mut trace = RoutingTrace::default();
        model
            .forward(&mut [SequenceStep::new(seq, &mut cache)], &shard, LogitsFor::Last, Some(&mut trace))
            .expect("forward");
        for (layer, rows) in trace.layers {
            let c = counts.entry(layer).or_insert_with(|| vec![0; experts]);
            rows.iter().flatten().for_each(|&e| c[e as usize] += 1);
        }
    }
    counts
        .into_iter()
        .map(|(layer, c)| {
            let total: u32 = c.iter().sum();
            (layer, c.iter().map(|&n| f64::from(n) / f64::from(total)).collect())
        })
        .collect()
}

#[test]
fn a_zipf_skewed_mini_routes_held_out_text_as_zipf_predicts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let skew = RouterSkew::parse("zipf:1.2").expect("parses").expect("a skew");
    let options = CheckpointOptions { vision: false, router_skew: Some(skew), ..Default::default() };
    write_checkpoint(Preset::Mini, 0, dir.path(), &options).expect("checkpoint written");
    let record: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(SKEW_FILE)).expect("skew record")).expect("json");
    let predicted = skew.rank_shares(16)[0];
    assert!((predicted - 0.365).abs() < 0.002);

    let shares = measured_shares(dir.path());
    assert_eq!(shares.len(), 8, "mini has 8 MoE layers");
    let zipf = skew.rank_shares(16);
    let mut hottest = Vec::new();
    for ((layer, s), rec) in shares.iter().zip(record["layers"].as_array().expect("layers")) {
        assert_eq!(rec["layer"], *layer);
        let by_rank: Vec<usize> = rec["experts_by_rank"]
            .as_array()
            .expect("ranks")
            .iter()
            .map(|e| e.as_u64().expect("id") as usize)
            .collect();
        assert_eq!(by_rank, skew.experts_by_rank(*layer, 16).iter().map(|&e| e as usize).collect::<Vec<_>>());
        let calibrated = rec["calibrated_shares"][0].as_f64().expect("share");
        assert!((calibrated - predicted).abs() < 0.02, "layer {layer}: calibrated {calibrated}");
        let ranked: Vec<f64> = by_rank.iter().map(|&e| s[e]).collect();
        let top4: f64 = ranked[..4].iter().sum();
        let bottom8: f64 = ranked[8..].iter().sum();
        eprintln!(
            "layer {layer}: hottest expert {} at {:.3} (Zipf {predicted:.3}), top 4 {top4:.3} (Zipf {:.3}), bottom 8 {bottom8:.3} (Zipf {:.3})",
            by_rank[0],
            ranked[0],
            zipf[..4].iter().sum::<f64>(),
            zipf[8..].iter().sum::<f64>()
        );
        hottest.push((*layer, ranked));
    }
    // Every layer: the expert Zipf ranks first is the most popular, with a share in Zipf's
    // neighbourhood, and the top four carry most of the rows. Off-calibration traffic moves a layer's
    // share (the bias scales with 1 / rms(residual)): measured 0.27 to 0.52 per layer against 0.365,
    // 0.377 on average; the mean is held to 0.05 below, each layer to 0.2.
    for (layer, ranked) in &hottest {
        let max = ranked.iter().copied().fold(0.0, f64::max);
        assert_eq!(ranked[0], max, "layer {layer}: rank 1 is not the hottest: {ranked:?}");
        assert!((ranked[0] - predicted).abs() < 0.2, "layer {layer}: hottest share {}, Zipf {predicted}", ranked[0]);
        assert!(ranked[..4].iter().sum::<f64>() > 0.5, "layer {layer}: {ranked:?}");
    }
    let mean = hottest.iter().map(|(_, r)| r[0]).sum::<f64>() / hottest.len() as f64;
    eprintln!("mean hottest share {mean:.3} against Zipf's {predicted:.3}");
    assert!((mean - predicted).abs() < 0.05, "mean hottest share {mean} against Zipf's {predicted}");

    // Written again without a skew: random routers, no record left behind, no expert near 36 %.
    let plain = CheckpointOptions { vision: false, force: true, ..Default::default() };
    write_checkpoint(Preset::Mini, 0, dir.path(), &plain).expect("rewritten");
    assert!(!dir.path().join(SKEW_FILE).exists(), "a stale skew record is removed");
    let plain_hottest: f64 =
        measured_shares(dir.path()).iter().map(|(_, s)| s.iter().copied().fold(0.0, f64::max)).sum::<f64>() / 8.0;
    eprintln!("unskewed: mean hottest share {plain_hottest:.3}");
    assert!(plain_hottest < predicted - 0.1, "the random routers are already skewed: {plain_hottest}");
}
