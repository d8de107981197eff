//! The goldens' typed form, read the same way by every test that checks against them.

use std::path::Path;

use serde::Deserialize;

/// One case of a fixture's `golden/vision.json`: an image, its chat prompt as transformers'
/// processor expanded and tokenized it, its `pixel_values` and the last position's logits.
#[derive(Debug, Clone, Deserialize)]
pub struct VisionCase {
    /// File name beside the golden (`wide.png`).
    pub image: String,
    /// The rendered chat prompt, with one `<|image|>` where the image goes.
    pub prompt: String,
    /// The processor's ids (BOS twice: it tokenizes the rendered template with special tokens).
    pub input_ids: Vec<u32>,
    /// `[tiles, 3, S, S]`.
    pub pixel_values_shape: Vec<usize>,
    /// Flattened, bf16 values rounded to 5 decimals.
    pub pixel_values: Vec<f32>,
    pub last_logits: Vec<f32>,
}

#[derive(Deserialize)]
struct VisionGolden {
    cases: Vec<VisionCase>,
}

/// The cases of `<fixture_dir>/golden/vision.json`.
///
/// # Panics
/// If the file is missing or does not parse: a test cannot run without it.
pub fn vision_cases(fixture_dir: &Path) -> Vec<VisionCase> {
    let path = fixture_dir.join("golden/vision.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str::<VisionGolden>(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display())).cases
}
