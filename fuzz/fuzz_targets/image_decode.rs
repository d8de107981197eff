//! Image bytes as a client sends them (after base64): sniffed, decoded within limits into RGB
//! (`imaging::decode`), then cut into tiles and expanded into prompt tokens as the gateway does.
#![no_main]

use epserve_imaging::{DecodeLimits, ImageTokenIds, ProcessorConfig, decode, expand, preprocess};
use libfuzzer_sys::fuzz_target;

/// Smaller than the server's defaults, so that one input cannot take seconds: the limits
/// themselves are what is checked, not their values.
const LIMITS: DecodeLimits = DecodeLimits { max_bytes: 1 << 20, max_pixels: 1 << 20 };

fuzz_target!(|bytes: &[u8]| {
    let Ok(image) = decode(bytes, &LIMITS) else { return };
    assert!(u64::from(image.width()) * u64::from(image.height()) <= LIMITS.max_pixels);
    // Small tiles keep preprocessing cheap; the grid choice and resize paths are the same.
    let cfg = ProcessorConfig { tile_size: 16, max_patches: 4, ..ProcessorConfig::scout() };
    let tiles = preprocess(&image, &cfg);
    let ids =
        ImageTokenIds { image_start: 1, image_end: 2, image: 3, patch: 4, tile_x_separator: 5, tile_y_separator: 6 };
    let _ = expand(&tiles, 4, &ids);
});
