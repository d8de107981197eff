//! Parity with transformers' `Llama4Processor` on the golden images of the tiny-llama4 fixture:
//! the PNG decoded and preprocessed here gives the golden `pixel_values`, and the prompt tokenised
//! with the fixture's tokenizer, with `expand` spliced in for `<|image|>`, gives the golden
//! `input_ids`. Run on the committed fixture and on the independent copy beside the checkout.

use std::path::Path;

use epserve_imaging::{DecodeLimits, ImageTokenIds, ProcessorConfig, decode, expand, preprocess};
use epserve_testkit::fixtures;
use epserve_testkit::golden::vision_cases;
use serde::Deserialize;

#[derive(Deserialize)]
struct ModelConfig {
    vision_config: VisionConfig,
}

#[derive(Deserialize)]
struct VisionConfig {
    image_size: usize,
    patch_size: usize,
    pixel_shuffle_ratio: f64,
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> T {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The golden is rounded to 5 decimals: a value within 1e-5 is exact; one uint8 level is 2/255
/// after normalisation with mean = std = 0.5.
fn check_pixel_values(dir: &Path) {
    let config = ProcessorConfig::from_checkpoint(dir).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((config.tile_size, config.max_patches), (56, 4), "the fixture's preprocessor_config.json is read");
    for case in vision_cases(dir) {
        let path = dir.join("golden").join(&case.image);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let image = decode(&bytes, &DecodeLimits::default()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let tiles = preprocess(&image, &config);
        let ours = tiles.pixel_values(&config);
        let shape = [tiles.count(), 3, tiles.tile_size, tiles.tile_size];
        assert_eq!(shape.as_slice(), case.pixel_values_shape.as_slice(), "{}: shape", case.image);
        assert_eq!(ours.len(), case.pixel_values.len());

        let diffs: Vec<f32> = ours.iter().zip(&case.pixel_values).map(|(a, b)| (a - b).abs()).collect();
        let within = diffs.iter().filter(|&&d| d <= 1e-5).count();
        let max = diffs.iter().copied().fold(0.0f32, f32::max);
        let fraction = within as f64 / diffs.len() as f64;
        println!(
            "{} {}: {} values, {:.4} % within 1e-5, max difference {max:.6} ({:.2} uint8 levels)",
            dir.display(),
            case.image,
            diffs.len(),
            100.0 * fraction,
            max * 255.0 / 2.0
        );
        assert!(fraction >= 0.999, "{}: only {:.4} % of the values within 1e-5", case.image, 100.0 * fraction);
        assert!(max <= 2.0 / 255.0 + 1e-5, "{}: a value is {max} off, more than one uint8 level", case.image);
    }
}

/// The prompt as `Llama4Processor` tokenises it (special tokens added, hence the double BOS of the
/// golden), with each `<|image|>` placeholder replaced by [`expand`].
fn check_prompt_expansion(dir: &Path) {
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap_or_else(|e| panic!("{e}"));
    let ids = ImageTokenIds::lookup(|name| tokenizer.token_to_id(name)).unwrap_or_else(|e| panic!("{e}"));
    let vision: ModelConfig = read_json(&dir.join("config.json"));
    let v = vision.vision_config;
    let tokens_per_tile =
        ((v.image_size / v.patch_size).pow(2) as f64 * v.pixel_shuffle_ratio * v.pixel_shuffle_ratio) as usize;
    let config = ProcessorConfig::from_checkpoint(dir).unwrap_or_else(|e| panic!("{e}"));
    for case in vision_cases(dir) {
        let bytes = std::fs::read(dir.join("golden").join(&case.image)).unwrap_or_else(|e| panic!("{e}"));
        let tiles = preprocess(&decode(&bytes, &DecodeLimits::default()).unwrap_or_else(|e| panic!("{e}")), &config);
        let encoding = tokenizer.encode(case.prompt.as_str(), true).unwrap_or_else(|e| panic!("{e}"));
        let placeholders = encoding.get_ids().iter().filter(|&&t| t == ids.image).count();
        assert_eq!(placeholders, 1, "{}: the prompt holds one image", case.image);
        let expanded: Vec<u32> = encoding
            .get_ids()
            .iter()
            .flat_map(|&t| if t == ids.image { expand(&tiles, tokens_per_tile, &ids) } else { vec![t] })
            .collect();
        assert_eq!(expanded, case.input_ids, "{} ({}x{} tiles)", case.image, tiles.rows, tiles.cols);
    }
}

#[test]
fn pixel_values_match_transformers() {
    check_pixel_values(&fixtures::dir(fixtures::TINY_LLAMA4));
}

#[test]
fn pixel_values_match_the_independent_copy() {
    match fixtures::independent_copy(fixtures::TINY_LLAMA4) {
        Some(dir) => check_pixel_values(&dir),
        None => println!("skipped: no independent copy of {} beside the checkout", fixtures::TINY_LLAMA4),
    }
}

#[test]
fn prompt_expansion_matches_transformers() {
    check_prompt_expansion(&fixtures::dir(fixtures::TINY_LLAMA4));
}

#[test]
fn prompt_expansion_matches_the_independent_copy() {
    match fixtures::independent_copy(fixtures::TINY_LLAMA4) {
        Some(dir) => check_prompt_expansion(&dir),
        None => println!("skipped: no independent copy of {} beside the checkout", fixtures::TINY_LLAMA4),
    }
}

/// Both golden images, one tile and a grid: the layouts the expansion test covers.
#[test]
fn golden_images_cover_both_layouts() {
    let dir = fixtures::dir(fixtures::TINY_LLAMA4);
    let config = ProcessorConfig::from_checkpoint(&dir).unwrap_or_else(|e| panic!("{e}"));
    let grid_of = |name: &str| {
        let bytes = std::fs::read(dir.join("golden").join(name)).unwrap_or_else(|e| panic!("{e}"));
        let tiles = preprocess(&decode(&bytes, &DecodeLimits::default()).unwrap_or_else(|e| panic!("{e}")), &config);
        (tiles.rows, tiles.cols, tiles.count())
    };
    assert_eq!(grid_of("wide.png"), (1, 3, 4));
    assert_eq!(grid_of("small.png"), (1, 1, 1));
}
