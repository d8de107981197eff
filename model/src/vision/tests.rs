//! Parity of images with transformers on `tiny-llama4` (tests/fixtures/README.md: golden
//! `pixel_values` from `Llama4ImageProcessor`, `input_ids` as `Llama4Processor` expands them, and
//! the last position's logits of the composed vision tower → projector → masked scatter → text
//! model, fp32 on the bf16 weights), through every way the serving engine feeds a prompt: whole,
//! in chunks that split the `<|patch|>` run, and beside another sequence in one step. Negative
//! controls show that the test notices each Llama-4 vision detail.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use epserve_testkit::fixtures;
use epserve_testkit::golden::{VisionCase, vision_cases};

use super::VisionModel;
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::deviation::Deviation;
use crate::error::Error;
use crate::experts::ExpertShard;
use crate::kv_cache::KvStore;
use crate::layers::WeightStorage;
use crate::text_model::{ImageRows, LogitsFor, SequenceStep, TextModel};

/// As for the text goldens: the reference expects ~1e-5 on logits of ~3.
const TOLERANCE: f32 = 1e-3;

/// The pixel values of a golden case as a tensor.
fn pixels(case: &VisionCase) -> Tensor {
    Tensor::from_slice(&case.pixel_values, case.pixel_values_shape.as_slice(), &Device::Cpu).expect("pixel values")
}

struct Loaded {
    cfg: ModelConfig,
    vision: VisionModel,
    text: TextModel,
    experts: ExpertShard,
}

fn load(dir: &Path, storage: WeightStorage) -> Loaded {
    let cfg = ModelConfig::from_file(&dir.join("config.json")).expect("config");
    let ckpt = Checkpoint::open(dir).expect("checkpoint");
    let dev = Device::Cpu;
    let all: Vec<u32> = (0..cfg.text.num_local_experts as u32).collect();
    Loaded {
        vision: VisionModel::load(&cfg, &ckpt, DType::F32, storage, &dev).expect("vision loads").expect("a tower"),
        text: TextModel::load(&cfg, &ckpt, DType::F32, storage, &dev, &mut |_, _| {}).expect("text loads"),
        experts: ExpertShard::load(&cfg, &ckpt, &all, DType::F32, storage, &dev, &mut || {}).expect("experts"),
        cfg,
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "vocab");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

impl Loaded {
    /// Absolute positions of the `<|patch|>` placeholders in `ids`.
    fn patch_positions(&self, ids: &[u32]) -> Vec<u32> {
        let patch = self.cfg.image_token_index.expect("image_token_index");
        ids.iter().enumerate().filter(|&(_, &t)| t == patch).map(|(i, _)| i as u32).collect()
    }

    /// The last position's logits of `case`, its prompt fed in pieces ending at each of `cuts`
    /// (absolute positions), each piece with the features of its own placeholders.
    fn last_logits(&self, case: &VisionCase, cuts: &[usize]) -> Vec<f32> {
        let features = self.vision.forward(&pixels(case)).expect("vision forward");
        let positions = self.patch_positions(&case.input_ids);
        assert_eq!(features.dim(0).expect("rows"), positions.len(), "{}: one feature row per <|patch|>", case.image);
        let mut cache = self.text.new_cache();
        let mut logits = None;
        let mut start = 0;
        for end in cuts.iter().copied().chain([case.input_ids.len()]) {
            let first = positions.partition_point(|&p| (p as usize) < start);
            let last = positions.partition_point(|&p| (p as usize) < end);
            let images = (last > first).then(|| ImageRows {
                positions: &positions[first..last],
                features: features.narrow(0, first, last - first).expect("rows"),
            });
            let mut step = [SequenceStep::new(&case.input_ids[start..end], &mut cache).with_images(images)];
            logits = Some(self.text.forward(&mut step, &self.experts, LogitsFor::Last, None).expect("text forward"));
            start = end;
        }
        logits.expect("a step").to_vec2::<f32>().expect("logits").remove(0)
    }
}

fn assert_images_match(dir: &Path) {
    let m = load(dir, WeightStorage::AsStored);
    for case in vision_cases(dir) {
        let diff = max_abs_diff(&m.last_logits(&case, &[]), &case.last_logits);
        eprintln!("{} ({} tiles): max |Δlogit| = {diff:e}", case.image, case.pixel_values_shape[0]);
        assert!(diff < TOLERANCE, "{}: max |Δlogit| = {diff}", case.image);
    }
}

#[test]
fn images_match_transformers() {
    assert_images_match(&crate::parity_tests::fixture_dir());
}

/// The goldens of the independently made `tiny-llama4` beside the checkout, when present.
#[test]
fn independent_fixture_images_match() {
    match fixtures::independent_copy(fixtures::TINY_LLAMA4) {
        Some(dir) => assert_images_match(&dir),
        None => eprintln!(
            "skipped: no independent fixture at {} (optional cross-check)",
            fixtures::independent_root().join(fixtures::TINY_LLAMA4).display()
        ),
    }
}

/// Chunked prefill: the prompt cut in the middle of its `<|patch|>` run (and, for the multi-tile
/// image, also between two tiles' runs), each chunk given the features of its own placeholders.
#[test]
fn a_prompt_in_chunks_that_split_the_patch_run_gives_the_same_logits() {
    let m = load(&crate::parity_tests::fixture_dir(), WeightStorage::AsStored);
    for case in vision_cases(&crate::parity_tests::fixture_dir()) {
        let positions = m.patch_positions(&case.input_ids);
        let middle = positions[positions.len() / 2] as usize + 1;
        let mut cut_sets = vec![vec![middle], vec![positions[0] as usize + 1, middle, middle + 1]];
        if case.pixel_values_shape[0] > 1 {
            cut_sets.push(vec![positions[m.vision.tokens_per_tile()] as usize]);
        }
        for cuts in cut_sets {
            let diff = max_abs_diff(&m.last_logits(&case, &cuts), &case.last_logits);
            eprintln!("{} in chunks ending at {cuts:?}: max |Δlogit| = {diff:e}", case.image);
            assert!(diff < TOLERANCE, "{} cut at {cuts:?}: max |Δlogit| = {diff}", case.image);
        }
    }
}

/// Both golden prompts, each with its image, in one step: each gets its own logits.
#[test]
fn two_sequences_with_images_in_one_step() {
    let dir = crate::parity_tests::fixture_dir();
    let m = load(&dir, WeightStorage::AsStored);
    let cases = vision_cases(&dir);
    let features: Vec<Tensor> = cases.iter().map(|c| m.vision.forward(&pixels(c)).expect("vision")).collect();
    let positions: Vec<Vec<u32>> = cases.iter().map(|c| m.patch_positions(&c.input_ids)).collect();
    let mut caches: Vec<_> = cases.iter().map(|_| m.text.new_cache()).collect();
    let mut steps: Vec<SequenceStep<'_>> = cases
        .iter()
        .zip(caches.iter_mut())
        .zip(features.iter().zip(&positions))
        .map(|((c, cache), (f, p))| {
            SequenceStep::new(&c.input_ids, cache).with_images(Some(ImageRows { positions: p, features: f.clone() }))
        })
        .collect();
    let logits = m.text.forward(&mut steps, &m.experts, LogitsFor::Last, None).expect("forward");
    for (case, row) in cases.iter().zip(logits.to_vec2::<f32>().expect("logits")) {
        let diff = max_abs_diff(&row, &case.last_logits);
        eprintln!("{} beside another image: max |Δlogit| = {diff:e}", case.image);
        assert!(diff < TOLERANCE, "{} in a batch: max |Δlogit| = {diff}", case.image);
    }
}

/// The tiles of one call are independent: the multi-tile image's features are those of its tiles
/// encoded one by one, in order.
#[test]
fn tiles_are_encoded_independently_and_in_order() {
    let dir = crate::parity_tests::fixture_dir();
    let m = load(&dir, WeightStorage::AsStored);
    let case = vision_cases(&dir).into_iter().max_by_key(|c| c.pixel_values_shape[0]).expect("a case");
    let pixels = pixels(&case);
    let all = m.vision.forward(&pixels).expect("all tiles").to_vec2::<f32>().expect("rows");
    let per_tile = m.vision.tokens_per_tile();
    for tile in 0..pixels.dim(0).expect("tiles") {
        let one = m.vision.forward(&pixels.narrow(0, tile, 1).expect("tile")).expect("one tile");
        let one = one.to_vec2::<f32>().expect("rows");
        let diff = max_abs_diff(&one.concat(), &all[tile * per_tile..(tile + 1) * per_tile].concat());
        assert!(diff < 1e-5, "tile {tile}: {diff}");
    }
}

#[test]
fn mismatched_feature_count_is_an_input_error_naming_both() {
    let dir = crate::parity_tests::fixture_dir();
    let m = load(&dir, WeightStorage::AsStored);
    let case = vision_cases(&dir).into_iter().next().expect("a case");
    let features = m.vision.forward(&pixels(&case)).expect("vision");
    let positions = m.patch_positions(&case.input_ids);
    let short = features.narrow(0, 0, positions.len() - 1).expect("rows");
    let mut cache = m.text.new_cache();
    let mut step = [SequenceStep::new(&case.input_ids, &mut cache)
        .with_images(Some(ImageRows { positions: &positions, features: short }))];
    let err = m.text.forward(&mut step, &m.experts, LogitsFor::Last, None).expect_err("count mismatch");
    let message = err.to_string();
    assert!(matches!(err, Error::Input(_)), "{err:?}");
    assert!(
        message.contains(&format!("{} image positions", positions.len()))
            && message.contains(&format!("[{}, {}]", positions.len() - 1, m.cfg.text.hidden_size)),
        "{message}"
    );
    assert_eq!(cache.len(), 0, "a refused step leaves the cache as it was");
}

/// Each deliberate mistake moves the logits beyond the tolerance: the parity test would catch an
/// implementation that made it.
#[test]
fn each_vision_detail_matters() {
    let dir = crate::parity_tests::fixture_dir();
    let cases = vision_cases(&dir);
    for deviation in
        [Deviation::VisionRopeRowFirst, Deviation::VisionClassTokenFirst, Deviation::VisionNoSecondAdapterGelu]
    {
        let mut m = load(&dir, WeightStorage::AsStored);
        m.vision = m.vision.with_deviation(Some(deviation));
        let diff =
            cases.iter().map(|case| max_abs_diff(&m.last_logits(case, &[]), &case.last_logits)).fold(0.0, f32::max);
        eprintln!("{deviation:?}: max |Δlogit| = {diff:e}");
        assert!(diff > 10.0 * TOLERANCE, "{deviation:?} changed the logits by only {diff}");
    }
}

/// bf16 weights widened per product compute exactly what weights converted at load compute, in
/// half the memory.
#[test]
fn weights_kept_in_bf16_compute_what_weights_converted_at_load_compute() {
    let dir = crate::parity_tests::fixture_dir();
    let (kept, widened) = (load(&dir, WeightStorage::AsStored), load(&dir, WeightStorage::Compute));
    assert!(kept.vision.matrix_bytes() < widened.vision.matrix_bytes() * 6 / 10, "bf16 matrices take about half");
    for case in vision_cases(&dir) {
        let a = kept.vision.forward(&pixels(&case)).expect("bf16 kept");
        let b = widened.vision.forward(&pixels(&case)).expect("f32");
        assert_eq!(a.to_vec2::<f32>().expect("a"), b.to_vec2::<f32>().expect("b"), "{}", case.image);
    }
}

#[test]
fn pixel_values_of_the_wrong_shape_are_input_errors() {
    let m = load(&crate::parity_tests::fixture_dir(), WeightStorage::AsStored);
    for shape in [vec![1, 3, 56, 42], vec![2, 3, 42, 42], vec![1, 1, 56, 56], vec![3, 56, 56], vec![0, 3, 56, 56]] {
        let pixels = Tensor::zeros(shape.as_slice(), DType::F32, &Device::Cpu).expect("zeros");
        let err = m.vision.forward(&pixels).expect_err("wrong shape");
        assert!(matches!(err, Error::Input(_)), "{shape:?}: {err:?}");
        assert!(err.to_string().contains(&format!("{shape:?}")) && err.to_string().contains("[tiles ≥ 1, 3, 56, 56]"));
    }
}

fn tiny_config_with(edit: impl FnOnce(&mut serde_json::Value)) -> crate::Result<ModelConfig> {
    let path = crate::parity_tests::fixture_dir().join("config.json");
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json");
    edit(&mut value["vision_config"]);
    ModelConfig::from_json(&value)
}

/// What this implementation does not do is refused at load, naming the field.
#[test]
fn configs_it_does_not_implement_are_refused_by_name() {
    let ckpt = Checkpoint::open(&crate::parity_tests::fixture_dir()).expect("checkpoint");
    let cases: [(&str, serde_json::Value); 9] = [
        ("vision_feature_select_strategy", serde_json::json!("full")),
        ("vision_feature_layer", serde_json::json!(-2)),
        ("image_size", serde_json::json!(60)),
        ("pixel_shuffle_ratio", serde_json::json!(0.4)),
        ("pixel_shuffle_ratio", serde_json::json!(1.0 / 3.0)),
        ("num_attention_heads", serde_json::json!(3)),
        ("num_attention_heads", serde_json::json!(16)),
        ("intermediate_size", serde_json::json!(96)),
        ("projector_output_dim", serde_json::json!(32)),
    ];
    for (field, value) in cases {
        let cfg = tiny_config_with(|v| v[field] = value.clone()).expect("config parses");
        let err = VisionModel::load(&cfg, &ckpt, DType::F32, WeightStorage::AsStored, &Device::Cpu)
            .expect_err(&format!("{field} = {value}"));
        assert!(
            matches!(&err, Error::Config { field: f, .. } if f == &format!("vision_config.{field}")),
            "{field} = {value}: {err}"
        );
    }
    // The eps written in the config is not used (torch's LayerNorm default is), so it is no error.
    let cfg = tiny_config_with(|v| v["norm_eps"] = serde_json::json!(1e-6)).expect("config");
    assert!(VisionModel::load(&cfg, &ckpt, DType::F32, WeightStorage::AsStored, &Device::Cpu).is_ok());
}

#[test]
fn a_text_only_config_has_no_tower() {
    let dir = fixtures::dir(fixtures::TINY_LLAMA4_TOP2);
    let cfg = ModelConfig::from_file(&dir.join("config.json")).expect("config");
    let ckpt = Checkpoint::open(&dir).expect("checkpoint");
    assert!(VisionModel::load(&cfg, &ckpt, DType::F32, WeightStorage::AsStored, &Device::Cpu).expect("ok").is_none());
}

#[test]
fn scout_geometry() {
    let cfg = ModelConfig::from_file(&fixtures::dir(fixtures::SCOUT_CONFIG).join("config.json")).expect("config");
    let vision = cfg.vision.as_ref().expect("vision config");
    assert_eq!(vision.tokens_per_tile(), 144);
    let g = super::Geometry::new(&cfg).expect("supported").expect("a tower");
    assert_eq!((g.tokens, g.head_dim, g.shuffled_dim, g.text_hidden), (577, 88, 5632, 5120));
    // 34 layers of 23.8 M multiply-adds per token, plus stem, adapter and projector: ~1 TFLOP per tile.
    let tflops = g.flops_per_tile() / 1e12;
    assert!((0.9..1.1).contains(&tflops), "{tflops}");
    let tiny = ModelConfig::from_file(&crate::parity_tests::fixture_dir().join("config.json")).expect("config");
    assert_eq!(tiny.vision.as_ref().expect("vision").tokens_per_tile(), 4);
}
