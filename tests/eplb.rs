//! `epserve eplb` offline (issue 17): a routing trace of Zipf(1.2) traffic over 16 experts, written
//! with the recorder's own writer, is summarised, planned for 4 workers with 25 % redundant slots
//! and replayed through the real command (which also draws its charts, `--plot`); the balanced
//! plan must flatten what contiguous sharding leaves skewed, and the cost-aware plan must come close
//! for fewer bytes. A cut trace is an error that names where it was cut. The same plan and replay
//! bounds on a trace recorded from a skewed `mini` checkpoint serving mixed traffic.

mod support;

use std::path::Path;

use epserve_eplb::plan::contiguous;
use epserve_eplb::trace::{StepBuilder, TraceHeader, TraceWriter, WriterOptions, config_hash};

const EXPERTS: u32 = 16;
const LAYERS: [u32; 4] = [0, 1, 2, 3];
const STEPS: usize = 240;
const TOKENS: usize = 320;
const EXPERT_BYTES: u64 = 3 << 20;

/// A small deterministic generator (xorshift64*), so the trace is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Writes a top-1 trace where each layer's expert popularity follows Zipf(1.2) under its own
/// permutation; steps alternate between full prefill-sized batches and small decode batches.
fn write_trace(path: &Path) {
    let header = TraceHeader {
        model: "zipf-test".into(),
        config_hash: config_hash(b"{\"zipf\": 1.2}"),
        layers: LAYERS.to_vec(),
        num_experts: EXPERTS,
        top_k: 1,
        expert_bytes: EXPERT_BYTES,
        start_unix_ms: 1_796_000_000_000,
        part: 0,
    };
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let weights: Vec<f64> = (1..=EXPERTS).map(|r| 1.0 / f64::from(r).powf(1.2)).collect();
    let total: f64 = weights.iter().sum();
    let perms: Vec<Vec<u32>> = LAYERS
        .iter()
        .map(|_| {
            let mut p: Vec<u32> = (0..EXPERTS).collect();
            for i in (1..p.len()).rev() {
                p.swap(i, (rng.next() % (i as u64 + 1)) as usize);
            }
            p
        })
        .collect();
    let writer = TraceWriter::create(path, header, WriterOptions::default()).expect("create trace");
    let mut step = StepBuilder::new(writer.header());
    for s in 0..STEPS {
        let tokens = if s % 4 == 3 { 32 } else { TOKENS };
        for (i, &layer) in LAYERS.iter().enumerate() {
            let rows: Vec<Vec<u32>> = (0..tokens)
                .map(|_| {
                    let mut x = rng.unit() * total;
                    let rank = weights.iter().position(|w| {
                        x -= w;
                        x <= 0.0
                    });
                    vec![perms[i][rank.unwrap_or(EXPERTS as usize - 1)]]
                })
                .collect();
            step.record(layer as usize, &rows);
        }
        while !writer.submit(step.clone().finish()) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        step.finish();
    }
    let stats = writer.finish().expect("finish trace");
    assert_eq!((stats.steps, stats.dropped_steps), (STEPS as u64, 0));
}

fn report<'a>(reports: &'a serde_json::Value, name: &Path) -> &'a serde_json::Value {
    let name = name.display().to_string();
    reports.as_array().expect("array").iter().find(|r| r["name"] == name.as_str()).expect("placement reported")
}

/// `replay --plot` wrote every chart as a PNG of a sensible size, not a blank or tiny canvas, and
/// as an SVG that names every placement where it should.
fn check_plots(dir: &Path, placements: &[&str]) {
    for chart in ["expert-load", "imbalance-over-time", "worker-load-histogram"] {
        let png = std::fs::read(dir.join(format!("{chart}.png"))).unwrap_or_else(|e| panic!("{chart}.png: {e}"));
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && &png[12..16] == b"IHDR", "{chart}.png is not a PNG");
        let (w, h) = (
            u32::from_be_bytes(png[16..20].try_into().expect("width")),
            u32::from_be_bytes(png[20..24].try_into().expect("height")),
        );
        assert!(w >= 800 && h >= 300, "{chart}.png is {w}x{h}");
        // A white canvas compresses to a few hundred bytes; text, bars and lines do not.
        assert!(png.len() > 20_000, "{chart}.png is only {} bytes", png.len());
        let svg =
            std::fs::read_to_string(dir.join(format!("{chart}.svg"))).unwrap_or_else(|e| panic!("{chart}.svg: {e}"));
        assert!(svg.starts_with("<svg") && svg.len() > 5_000, "{chart}.svg");
        if chart != "expert-load" {
            for p in placements {
                assert!(svg.contains(p), "{chart}.svg does not name placement {p}");
            }
        }
    }
}

/// Plans 4 workers × 5 slots (25 % redundant) for `trace` from contiguous shards, replays the three
/// placements and checks issue 17's bounds; returns the contiguous, balanced and cost-aware reports.
fn plan_replay_and_check(dir: &Path, trace: &Path, layers: &[u32]) -> [serde_json::Value; 3] {
    let t = |p: &Path| p.to_str().expect("utf-8").to_owned();
    let workers: Vec<String> = (0..4).map(|i| format!("w{i}")).collect();
    let sharded = contiguous(layers, EXPERTS as usize, &workers).expect("contiguous");
    let current = dir.join("contiguous.json");
    std::fs::write(&current, serde_json::to_string(&sharded).expect("json")).expect("write");
    let plan_args = |algorithm: &str, out: &Path| {
        support::run_json(&[
            "eplb",
            "plan",
            "--trace",
            &t(trace),
            "--workers",
            "4",
            "--slots-per-worker",
            "5",
            "--current",
            &t(&current),
            "--algorithm",
            algorithm,
            "--out",
            &t(out),
            "--json",
        ])
    };
    let balanced = dir.join("balanced.json");
    let cost_aware = dir.join("cost-aware.json");
    let b = plan_args("balanced", &balanced);
    let c = plan_args("cost-aware", &cost_aware);
    assert!(c["pareto"].as_array().expect("points").len() > 2, "{c}");

    let reports = support::run_json(&[
        "eplb",
        "replay",
        "--trace",
        &t(trace),
        "--placement",
        &t(&current),
        "--placement",
        &t(&balanced),
        "--placement",
        &t(&cost_aware),
        "--plot",
        &t(&dir.join("plots")),
        "--json",
    ]);
    check_plots(&dir.join("plots"), &["contiguous", "balanced", "cost-aware"]);
    let (r0, rb, rc) = (report(&reports, &current), report(&reports, &balanced), report(&reports, &cost_aware));
    let f = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} in {r}"));
    eprintln!("contiguous {r0}\nbalanced {rb}\ncost-aware {rc}");
    // The plan's own figure is the replay's.
    assert!((f(&b, "imbalance_aggregate") - f(rb, "imbalance_aggregate")).abs() < 1e-9);
    assert!(f(r0, "imbalance_aggregate") > 1.3, "contiguous shards of a Zipf 1.2 trace are skewed");
    assert!(f(rb, "imbalance_aggregate") <= 1.05, "balanced aggregate");
    assert!(f(rb, "imbalance_step_mean") <= 1.15, "balanced per-step mean over steps of >= 256 tokens");
    assert!(f(rc, "imbalance_aggregate") <= f(rb, "imbalance_aggregate") + 0.05, "cost-aware within 0.05");
    let balanced_from_contiguous = f(&b, "moved_bytes");
    let cost_aware_bytes = f(rc, "moved_bytes");
    assert!(
        cost_aware_bytes <= 0.30 * balanced_from_contiguous,
        "cost-aware moves at most 30 % of balanced's bytes: {cost_aware_bytes} vs {balanced_from_contiguous}"
    );
    assert_eq!(f(r0, "moved_bytes"), 0.0);
    assert!(f(rb, "modelled_step_time_ms") < f(r0, "modelled_step_time_ms"));
    [r0.clone(), rb.clone(), rc.clone()]
}

#[test]
fn planned_placements_flatten_a_zipf_trace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let trace = dir.path().join("routing.trace");
    write_trace(&trace);
    let t = |p: &Path| p.to_str().expect("utf-8").to_owned();

    let stats = support::run_json(&["eplb", "trace-stats", &t(&trace), "--json"]);
    assert_eq!(stats["steps"], STEPS as u64);
    assert_eq!(stats["num_experts"], EXPERTS);
    assert_eq!(stats["dropped_steps"], 0);
    let hottest = stats["mean_ranked_shares"][0].as_f64().expect("share");
    assert!((0.33..0.40).contains(&hottest), "Zipf 1.2 over 16 sends ~36 % to the hottest expert: {hottest}");

    let [_, balanced, _] = plan_replay_and_check(dir.path(), &trace, &LAYERS);
    assert_eq!(balanced["steps_counted"].as_u64(), Some((STEPS - STEPS / 4) as u64));

    // A cut trace is an error naming the offset, not a shorter summary.
    let bytes = std::fs::read(&trace).expect("read");
    let cut = dir.path().join("cut.trace");
    std::fs::write(&cut, &bytes[..bytes.len() - 5]).expect("write");
    let out = std::process::Command::new(support::epserve())
        .args(["eplb", "trace-stats", &t(&cut)])
        .output()
        .expect("run epserve");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("truncated at byte"), "{err}");
}

/// Issue 17's acceptance on a real recording: a `zipf:1.2` `mini` checkpoint (`gen-model
/// --router-skew`) serves mixed traffic through the engine (`engine-bench`: 16 clients, each
/// sending 6 requests one after the other, so prompt chunks and decodes share steps) while
/// `--record-routing` writes the trace; the trace must hold every step (≥ 200, none dropped) and
/// the same plan and replay bounds must hold on it. Each step gives a sequence at most one token, so
/// one client's 6 requests of 36 output tokens take at least 6 × 36 = 216 steps whatever the
/// scheduling (with 32 output tokens a CI run recorded 198). The cost-aware bytes bound sits close
/// to its 30 %: 28.4–31.0 % on traces of 6 × 32…36 and 8 × 32 requests (2026-12-07).
#[test]
fn a_recorded_trace_of_a_skewed_mini_meets_the_bounds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = |p: &Path| p.to_str().expect("utf-8").to_owned();
    let model = dir.path().join("mini-zipf");
    support::run_ok(&[
        "gen-model",
        "--preset",
        "mini",
        "--no-vision",
        "--router-skew",
        "zipf:1.2",
        "--out",
        &t(&model),
    ]);
    let trace = dir.path().join("serving.trace");
    let bench = support::run_json(&[
        "engine-bench",
        "--model",
        &t(&model),
        "--concurrency",
        "16",
        "--requests-per-client",
        "6",
        "--prompt-len",
        "128",
        "--max-tokens",
        "36",
        "--max-batch-tokens",
        "512",
        "--record-routing",
        &t(&trace),
    ]);
    assert_eq!(bench[0]["requests"], 96, "{bench}");

    let stats = support::run_json(&["eplb", "trace-stats", &t(&trace), "--json"]);
    eprintln!("trace-stats {stats}");
    let steps = stats["steps"].as_u64().expect("steps");
    assert!(steps >= 200, "{steps} steps recorded");
    assert_eq!(stats["dropped_steps"], 0);
    assert_eq!(stats["num_experts"], EXPERTS);
    // Every token of every step, prompts and outputs: 96 requests × (128 + 36 − 1 sampled inputs).
    assert_eq!(stats["tokens"].as_u64(), Some(96 * (128 + 35)), "{stats}");
    let hottest = stats["mean_ranked_shares"][0].as_f64().expect("share");
    assert!((0.29..0.44).contains(&hottest), "Zipf 1.2 over 16 sends ~36 % to the hottest expert: {hottest}");

    let layers: Vec<u32> = (0..8).collect();
    let [contiguous, balanced, cost_aware] = plan_replay_and_check(dir.path(), &trace, &layers);
    eprintln!("recorded: contiguous {contiguous}\nbalanced {balanced}\ncost-aware {cost_aware}");
    assert!(balanced["steps_counted"].as_u64().expect("counted") >= 16, "steps of >= 256 tokens");
}
