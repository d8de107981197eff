//! `write_checkpoint` end to end: what the presets write, read back the way the servers read it
//! (`epserve-model`'s config parser, memory-mapped checkpoint and text model).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use epserve_model::config::Architecture;
use epserve_model::{
    Checkpoint, ExpertShard, LogitsFor, ModelConfig, SequenceStep, TextModel, WeightSource, WeightStorage,
};
use epserve_synthetic::{CheckpointOptions, Preset, text_tensor_specs, vision_tensor_specs, write_checkpoint};
use epserve_testkit::fixtures;
use serde_json::Value;

fn write(preset: Preset, options: &CheckpointOptions) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    write_checkpoint(preset, 0, dir.path(), options).expect("checkpoint written");
    dir
}

fn text_only() -> CheckpointOptions {
    CheckpointOptions { vision: false, ..Default::default() }
}

fn config(dir: &Path) -> ModelConfig {
    ModelConfig::from_file(&dir.join("config.json")).expect("config.json parses")
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("readable")).expect("JSON")
}

/// Every tensor's key and stored shape, sorted by key.
fn keys_and_shapes(ckpt: &Checkpoint) -> Vec<(String, Vec<usize>)> {
    let mut all: Vec<_> =
        ckpt.keys().map(|k| (k.to_owned(), ckpt.shape(k).expect("listed key has a shape").to_vec())).collect();
    all.sort();
    all
}

fn values(ckpt: &Checkpoint, key: &str) -> Vec<f32> {
    let shape = ckpt.shape(key).unwrap_or_else(|| panic!("{key} is missing")).to_vec();
    let t = ckpt.tensor(key, &shape, DType::F32, &Device::Cpu).expect("tensor reads");
    t.flatten_all().and_then(|t| t.to_vec1()).expect("f32 values")
}

/// FNV-1a over the key and the stored bf16 bits of every text tensor, in key order.
fn text_digest(dir: &Path) -> u64 {
    let cfg = config(dir);
    let ckpt = Checkpoint::open(dir).expect("checkpoint opens");
    let mut keys: Vec<String> = text_tensor_specs(&cfg).into_iter().map(|(key, _)| key).collect();
    keys.sort();
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    };
    for key in keys {
        eat(key.as_bytes());
        // bf16 widens to f32 exactly, so the top 16 bits are the stored ones.
        for v in values(&ckpt, &key) {
            eat(&((v.to_bits() >> 16) as u16).to_le_bytes());
        }
    }
    hash
}

#[test]
fn tiny_has_the_fixtures_tensors_vision_config_and_image_processor() {
    let dir = write(Preset::Tiny, &CheckpointOptions::default());
    let fixture = fixtures::dir(fixtures::TINY_LLAMA4);

    // The same keys and shapes as the checkpoint transformers saved, text and vision alike.
    let ours = Checkpoint::open(dir.path()).expect("checkpoint opens");
    let theirs = Checkpoint::open(&fixture).expect("fixture opens");
    assert_eq!(keys_and_shapes(&ours), keys_and_shapes(&theirs));

    let (cfg, fixture_cfg) = (config(dir.path()), config(&fixture));
    assert_eq!(cfg.architecture, Architecture::ConditionalGeneration);
    assert_eq!(cfg.vision, fixture_cfg.vision, "tiny's vision tower is the fixture's");
    assert_eq!(
        (cfg.image_token_index, cfg.boi_token_index, cfg.eoi_token_index),
        (fixture_cfg.image_token_index, fixture_cfg.boi_token_index, fixture_cfg.eoi_token_index)
    );
    assert_eq!(
        json(&dir.path().join("preprocessor_config.json")),
        json(&fixture.join("preprocessor_config.json")),
        "tiny's image processor is the fixture's"
    );

    // Norm weights 1, biases small but present, weights ~N(0, 1/fan_in) (up to the √2 gain before a
    // GELU), every value finite.
    for (key, shape) in vision_tensor_specs(&cfg) {
        let v = values(&ours, &key);
        assert!(v.iter().all(|x| x.is_finite()), "{key} is finite");
        if key.contains("layernorm") && key.ends_with(".weight") {
            assert!(v.iter().all(|&x| x == 1.0), "{key} is all ones");
            continue;
        }
        let rms = (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
        let expected = if key.ends_with(".bias") { 0.02 } else { 1.0 / (shape[shape.len() - 1] as f32).sqrt() };
        assert!((0.7..1.7).contains(&(rms / expected)), "{key}: rms {rms}, expected about {expected}");
    }
}

#[test]
fn every_vision_tensor_of_scout_wire_is_written_with_its_shape() {
    let dir = write(Preset::ScoutWire, &CheckpointOptions::default());
    let cfg = config(dir.path());
    let ckpt = Checkpoint::open(dir.path()).expect("checkpoint opens");
    let specs = vision_tensor_specs(&cfg);
    assert!(!specs.is_empty());
    for (key, shape) in &specs {
        assert_eq!(ckpt.shape(key), Some(shape.as_slice()), "{key}");
    }
    let processor = json(&dir.path().join("preprocessor_config.json"));
    assert_eq!(processor["size"]["height"], 336);
    assert_eq!(processor["max_patches"], 16);
}

#[test]
fn text_only_checkpoint_holds_the_same_text_model() {
    let multimodal = write(Preset::Tiny, &CheckpointOptions::default());
    // Written over a multimodal checkpoint: nothing of the vision tower may stay behind.
    let text = write(Preset::Tiny, &CheckpointOptions::default());
    write_checkpoint(Preset::Tiny, 0, text.path(), &CheckpointOptions { force: true, ..text_only() })
        .expect("text-only checkpoint written over it");

    let (mm_cfg, text_cfg) = (config(multimodal.path()), config(text.path()));
    assert_eq!(text_cfg.architecture, Architecture::CausalLm);
    assert_eq!(text_cfg.vision, None);
    assert_eq!(text_cfg.text, mm_cfg.text);
    assert!(!text.path().join("preprocessor_config.json").exists());
    let mm_ckpt = Checkpoint::open(multimodal.path()).expect("opens");
    let text_ckpt = Checkpoint::open(text.path()).expect("opens");
    assert!(text_ckpt.keys().all(|k| k.starts_with("model.") || k == "lm_head.weight"), "only text keys");
    for (key, shape) in text_tensor_specs(&text_cfg) {
        assert_eq!(text_ckpt.shape(&key), Some(shape.as_slice()), "{key}");
        let mm_key = format!("language_model.{key}");
        assert!(values(&text_ckpt, &key) == values(&mm_ckpt, &mm_key), "{key} equals {mm_key}");
    }

    // And both load as the servers load them, giving the same logits.
    let tokens = [480u32, 72, 101, 108, 108, 111, 495, 44, 32, 119];
    let logits = |cfg: &ModelConfig, ckpt: &Checkpoint| -> Tensor {
        let dev = Device::Cpu;
        let all: Vec<u32> = (0..cfg.text.num_local_experts as u32).collect();
        let model = TextModel::load(cfg, ckpt, DType::F32, WeightStorage::AsStored, &dev, &mut |_, _| {})
            .expect("text model loads");
        let experts = ExpertShard::load(cfg, ckpt, &all, DType::F32, WeightStorage::AsStored, &dev, &mut || {})
            .expect("experts load");
        let mut cache = model.new_cache();
        model.forward(&mut [SequenceStep::new(&tokens, &mut cache)], &experts, LogitsFor::All, None).expect("forward")
    };
    let (a, b) = (logits(&mm_cfg, &mm_ckpt), logits(&text_cfg, &text_ckpt));
    let diff = (a - b).and_then(|d| d.abs()).and_then(|d| d.max_all()).and_then(|d| d.to_scalar::<f32>());
    assert_eq!(diff.expect("diff"), 0.0);
}

/// The text tensors' digests of `gen-model --seed 0`, taken before the presets had a vision tower
/// (commit 4aadb26): adding the tower must not change a text weight, or every figure measured on
/// these checkpoints would silently describe another model.
#[test]
fn the_vision_tower_changed_no_text_tensor() {
    for (preset, before) in [(Preset::Tiny, TINY_TEXT_DIGEST), (Preset::ScoutWire, SCOUT_WIRE_TEXT_DIGEST)] {
        let dir = write(preset, &CheckpointOptions::default());
        assert_eq!(text_digest(dir.path()), before, "{preset:?}");
    }
}

const TINY_TEXT_DIGEST: u64 = 0x18ab_bae8_4409_603f;
const SCOUT_WIRE_TEXT_DIGEST: u64 = 0x3153_89d9_db57_3340;
