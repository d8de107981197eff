//! The image processor's settings, read from a checkpoint the way transformers reads them.

use std::path::Path;

use serde::Deserialize;

use crate::error::ImageError;

/// `Llama4ImageProcessor` settings. Values not in the checkpoint's file take the processor class's
/// defaults, which are Scout's ([`ProcessorConfig::scout`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessorConfig {
    /// Side of a square tile in pixels (`size.height` = `size.width`; 336 for Scout).
    pub tile_size: usize,
    /// Most local tiles per image; the global tile comes on top (16 for Scout).
    pub max_patches: usize,
    /// Upscale to the largest canvas that fits instead of the smallest (false for Scout).
    pub resize_to_max_canvas: bool,
    /// Multiplies the uint8 values (1/255).
    pub rescale_factor: f32,
    /// Per-channel mean subtracted after rescaling.
    pub mean: [f32; 3],
    /// Per-channel standard deviation divided by after subtracting the mean.
    pub std: [f32; 3],
}

impl ProcessorConfig {
    /// `Llama4ImageProcessor`'s class defaults, which Scout's `preprocessor_config.json` repeats.
    pub fn scout() -> Self {
        Self {
            tile_size: 336,
            max_patches: 16,
            resize_to_max_canvas: false,
            // transformers' default `1 / 255`, a Python float, as torch uses it on a bf16 tensor (f32).
            rescale_factor: (1.0f64 / 255.0) as f32,
            mean: [0.5; 3],
            std: [0.5; 3],
        }
    }

    /// Reads `dir/preprocessor_config.json`, else the `image_processor` part of
    /// `dir/processor_config.json` (transformers 5 nests it there; a flat file is read as the image
    /// processor itself), else returns [`ProcessorConfig::scout`].
    ///
    /// # Errors
    /// [`ImageError::BadConfig`] naming the file and the field when a file exists but cannot be
    /// read, is not valid JSON, has a field of the wrong type, or asks for something this crate
    /// does not implement (another resampling filter, disabled rescaling, a non-square tile).
    pub fn from_checkpoint(dir: &Path) -> Result<Self, ImageError> {
        let preprocessor = dir.join("preprocessor_config.json");
        if preprocessor.is_file() {
            return Self::from_file(&preprocessor, false);
        }
        let processor = dir.join("processor_config.json");
        if processor.is_file() {
            return Self::from_file(&processor, true);
        }
        Ok(Self::scout())
    }

    fn from_file(file: &Path, may_be_nested: bool) -> Result<Self, ImageError> {
        let bad = |reason: String| ImageError::BadConfig { file: file.to_path_buf(), reason };
        let text = std::fs::read_to_string(file).map_err(|e| bad(format!("cannot read it: {e}")))?;
        let parse = |json: serde_json::Value| -> Result<RawImageProcessor, String> {
            serde_path_to_error::deserialize(json).map_err(|e| {
                let path = e.path().to_string();
                if path == "." { e.inner().to_string() } else { format!("field `{path}`: {}", e.inner()) }
            })
        };
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
        // transformers 5 writes `processor_config.json` with the image processor's settings under
        // `image_processor`, beside the processor's own (`patch_size`, ...), not needed here.
        let raw = match json {
            serde_json::Value::Object(mut fields) if may_be_nested && fields.contains_key("image_processor") => {
                let inner = fields.remove("image_processor").unwrap_or_default();
                parse(inner).map_err(|e| bad(format!("in `image_processor`, {e}")))?
            }
            json => parse(json).map_err(bad)?,
        };
        raw.into_config().map_err(|e| ImageError::BadConfig { file: file.to_path_buf(), reason: e })
    }

    /// Checks the invariants [`crate::preprocess`] relies on.
    ///
    /// # Errors
    /// A sentence naming the offending field.
    pub fn validate(&self) -> Result<(), String> {
        if self.tile_size == 0 {
            return Err("`size` must be positive".into());
        }
        if self.max_patches == 0 {
            return Err("`max_patches` must be at least 1".into());
        }
        if !self.rescale_factor.is_finite() || self.rescale_factor <= 0.0 {
            return Err(format!("`rescale_factor` {} must be a positive number", self.rescale_factor));
        }
        if self.mean.iter().any(|m| !m.is_finite()) {
            return Err(format!("`image_mean` {:?} must be finite", self.mean));
        }
        if self.std.iter().any(|s| !s.is_finite() || *s == 0.0) {
            return Err(format!("`image_std` {:?} must be finite and non-zero", self.std));
        }
        Ok(())
    }
}

/// The fields of a saved `Llama4ImageProcessor` that change its output; others
/// (`image_processor_type`, `processor_class`, `data_format`, ...) are ignored.
#[derive(Deserialize)]
struct RawImageProcessor {
    size: Option<TileSize>,
    max_patches: Option<usize>,
    resize_to_max_canvas: Option<bool>,
    rescale_factor: Option<f64>,
    image_mean: Option<PerChannel>,
    image_std: Option<PerChannel>,
    /// PIL's resampling enum: 2 = bilinear, the only one implemented.
    resample: Option<u32>,
    do_resize: Option<bool>,
    do_rescale: Option<bool>,
    do_normalize: Option<bool>,
    do_convert_rgb: Option<bool>,
}

#[derive(Deserialize)]
struct TileSize {
    height: usize,
    width: usize,
}

/// transformers accepts one value for all channels or one per channel.
#[derive(Deserialize)]
#[serde(untagged)]
enum PerChannel {
    One(f32),
    Three([f32; 3]),
}

impl PerChannel {
    fn values(&self) -> [f32; 3] {
        match *self {
            Self::One(v) => [v; 3],
            Self::Three(v) => v,
        }
    }
}

impl RawImageProcessor {
    fn into_config(self) -> Result<ProcessorConfig, String> {
        const BILINEAR: u32 = 2;
        if let Some(resample) = self.resample.filter(|&r| r != BILINEAR) {
            return Err(format!("field `resample`: {resample} is not supported, only 2 (bilinear, Llama 4's)"));
        }
        for (field, value) in [
            ("do_resize", self.do_resize),
            ("do_rescale", self.do_rescale),
            ("do_normalize", self.do_normalize),
            ("do_convert_rgb", self.do_convert_rgb),
        ] {
            if value == Some(false) {
                return Err(format!("field `{field}`: false is not supported (Llama 4 always does this step)"));
            }
        }
        let defaults = ProcessorConfig::scout();
        let tile_size = match self.size {
            Some(TileSize { height, width }) if height != width => {
                return Err(format!("field `size`: {height}x{width} is not square"));
            }
            Some(size) => size.height,
            None => defaults.tile_size,
        };
        let config = ProcessorConfig {
            tile_size,
            max_patches: self.max_patches.unwrap_or(defaults.max_patches),
            resize_to_max_canvas: self.resize_to_max_canvas.unwrap_or(defaults.resize_to_max_canvas),
            rescale_factor: self.rescale_factor.map_or(defaults.rescale_factor, |f| f as f32),
            mean: self.image_mean.map_or(defaults.mean, |m| m.values()),
            std: self.image_std.map_or(defaults.std, |s| s.values()),
        };
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap_or_else(|e| panic!("writing {name}: {e}"));
    }

    fn temp() -> tempfile::TempDir {
        tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"))
    }

    #[test]
    fn no_file_means_scout() {
        let dir = temp();
        assert_eq!(ProcessorConfig::from_checkpoint(dir.path()).ok(), Some(ProcessorConfig::scout()));
    }

    #[test]
    fn preprocessor_config_is_read_and_wins() {
        let dir = temp();
        write(
            dir.path(),
            "preprocessor_config.json",
            r#"{"size": {"height": 56, "width": 56}, "max_patches": 4,
            "image_mean": [0.1, 0.2, 0.3], "image_std": 0.25, "resample": 2, "image_processor_type": "Llama4ImageProcessor"}"#,
        );
        write(dir.path(), "processor_config.json", r#"{"image_processor": {"max_patches": 9}}"#);
        let config = ProcessorConfig::from_checkpoint(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.tile_size, 56);
        assert_eq!(config.max_patches, 4);
        assert_eq!(config.mean, [0.1, 0.2, 0.3]);
        assert_eq!(config.std, [0.25; 3]);
        assert_eq!(config.rescale_factor, ProcessorConfig::scout().rescale_factor);
    }

    #[test]
    fn processor_config_nested_or_flat() {
        let dir = temp();
        write(dir.path(), "processor_config.json", r#"{"patch_size": 14, "image_processor": {"max_patches": 9}}"#);
        assert_eq!(ProcessorConfig::from_checkpoint(dir.path()).map(|c| c.max_patches).ok(), Some(9));
        write(dir.path(), "processor_config.json", r#"{"processor_class": "Llama4Processor", "max_patches": 5}"#);
        assert_eq!(ProcessorConfig::from_checkpoint(dir.path()).map(|c| c.max_patches).ok(), Some(5));
    }

    #[test]
    fn malformed_files_name_file_and_field() {
        let dir = temp();
        let cases = [
            (r#"{"max_patches": "many"}"#, "field `max_patches`"),
            (r#"{"size": {"height": 56}}"#, "field `size`"),
            (r#"{"size": {"height": 56, "width": 28}}"#, "not square"),
            (r#"{"image_std": [0.5, 0.5]}"#, "field `image_std`"),
            (r#"{"image_std": [0.5, 0.0, 0.5]}"#, "`image_std`"),
            (r#"{"resample": 3}"#, "field `resample`"),
            (r#"{"do_normalize": false}"#, "field `do_normalize`"),
            (r#"{"max_patches": 0}"#, "`max_patches`"),
            ("{not json", "key must be a string"),
        ];
        for (text, expected) in cases {
            write(dir.path(), "preprocessor_config.json", text);
            let message = match ProcessorConfig::from_checkpoint(dir.path()) {
                Err(e @ ImageError::BadConfig { .. }) => e.to_string(),
                other => panic!("{text}: expected BadConfig, got {other:?}"),
            };
            assert!(message.contains("preprocessor_config.json"), "{message}");
            assert!(message.contains(expected), "{text}: {message}");
        }
        std::fs::remove_file(dir.path().join("preprocessor_config.json")).unwrap_or_else(|e| panic!("{e}"));
        write(dir.path(), "processor_config.json", r#"{"image_processor": {"max_patches": -1}}"#);
        let message = ProcessorConfig::from_checkpoint(dir.path()).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("processor_config.json") && message.contains("`max_patches`"), "{message}");
    }
}
