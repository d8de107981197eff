//! Bytes to an RGB image, within limits, the way the HF processor sees a PIL image.
//!
//! Order of checks, cheapest first: byte count, format sniffed from the magic bytes, header
//! dimensions against the pixel limit, and only then the decode (with `image::Limits::max_alloc`
//! as a second fence for decoders that allocate more than the output, e.g. a GIF frame larger than
//! its screen). The RGB conversion reproduces transformers' `convert_to_rgb` on a PIL image
//! (`image_transforms.py`, 5.x): images with an alpha channel or a transparent colour are
//! composited onto white with `Image.alpha_composite`, the rest go through `Image.convert("RGB")`.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};

use crate::error::ImageError;

/// Bounds on an image a client sends. The defaults suit a public endpoint: 20 MiB (OpenAI's
/// per-image limit) and 50 megapixels (a full-resolution 50 MP phone photo, 8160×6120, fits;
/// decoding it takes ~200 MB for the RGBA buffer, and preprocessing never uses more than
/// `max_patches` tiles of it anyway).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Most encoded bytes accepted.
    pub max_bytes: usize,
    /// Most pixels (width · height, as the header announces them) accepted.
    pub max_pixels: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self { max_bytes: 20 << 20, max_pixels: 50_000_000 }
    }
}

/// Decodes PNG, JPEG, WebP or GIF (its first frame) into 8-bit RGB, applying the EXIF orientation
/// (as transformers' `load_image` does with `ImageOps.exif_transpose`).
///
/// # Errors
/// [`ImageError::TooLarge`], [`ImageError::TooManyPixels`] (before any pixel is decoded),
/// [`ImageError::UnsupportedFormat`] naming what the bytes look like, [`ImageError::Undecodable`]
/// for corrupt or truncated data.
pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage, ImageError> {
    if bytes.len() > limits.max_bytes {
        return Err(ImageError::TooLarge { bytes: bytes.len(), max: limits.max_bytes });
    }
    let format = sniff(bytes)?;
    let name = format_name(format);
    let undecodable = |e: image::ImageError| match e {
        image::ImageError::Unsupported(e) => ImageError::UnsupportedFormat { seen: format!("{name} ({e})") },
        e => ImageError::Undecodable { format: name, reason: e.to_string() },
    };

    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut decoder_limits = image::Limits::default();
    // The output buffer of the widest pixel format decoded here (RGBA, 16 bits per channel), plus
    // slack for the decoders' own state.
    decoder_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(decoder_limits);
    let mut decoder = reader.into_decoder().map_err(undecodable)?;

    let (width, height) = decoder.dimensions();
    if u64::from(width) * u64::from(height) > limits.max_pixels {
        return Err(ImageError::TooManyPixels { width, height, max: limits.max_pixels });
    }
    if width == 0 || height == 0 {
        return Err(ImageError::Undecodable { format: name, reason: format!("the image is {width}x{height}") });
    }
    // A malformed EXIF block is not worth refusing an image over: keep the stored orientation.
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let decoded = DynamicImage::from_decoder(decoder).map_err(undecodable)?;

    let mut rgb = DynamicImage::ImageRgb8(to_rgb(decoded));
    rgb.apply_orientation(orientation);
    Ok(rgb.into_rgb8())
}

/// The format from the magic bytes (never from a file name or a declared MIME type).
fn sniff(bytes: &[u8]) -> Result<ImageFormat, ImageError> {
    match image::guess_format(bytes) {
        Ok(format @ (ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP | ImageFormat::Gif)) => Ok(format),
        Ok(other) => Err(ImageError::UnsupportedFormat { seen: format_name(other).to_owned() }),
        Err(_) => Err(ImageError::UnsupportedFormat { seen: describe_unknown(bytes) }),
    }
}

fn format_name(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Png => "PNG",
        ImageFormat::Jpeg => "JPEG",
        ImageFormat::WebP => "WebP",
        ImageFormat::Gif => "GIF",
        ImageFormat::Bmp => "BMP",
        ImageFormat::Tiff => "TIFF",
        ImageFormat::Ico => "ICO",
        ImageFormat::Avif => "AVIF",
        ImageFormat::Hdr => "Radiance HDR",
        ImageFormat::OpenExr => "OpenEXR",
        ImageFormat::Pnm => "PNM",
        ImageFormat::Tga => "TGA",
        ImageFormat::Dds => "DDS",
        ImageFormat::Qoi => "QOI",
        ImageFormat::Farbfeld => "farbfeld",
        other => other.extensions_str().first().copied().unwrap_or("an unknown format"),
    }
}

/// Names data `image` does not know: empty, HEIC (what iPhones send), SVG or other text, or the
/// first bytes in hex. Never echoes more than a few bytes of what the client sent.
fn describe_unknown(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "empty data".to_owned();
    }
    if bytes.len() >= 12 && &bytes[4..8] == b"ftyp" {
        let brand = String::from_utf8_lossy(&bytes[8..12]).into_owned();
        if matches!(brand.as_str(), "heic" | "heix" | "heim" | "heis" | "hevc" | "hevx" | "mif1" | "msf1") {
            return format!("HEIC/HEIF (brand {brand})");
        }
        return format!("an ISO media file (brand {brand:?})");
    }
    let head = &bytes[..bytes.len().min(256)];
    let text = head.iter().all(|&b| b.is_ascii_graphic() || b.is_ascii_whitespace());
    if text {
        let trimmed = String::from_utf8_lossy(head);
        let trimmed = trimmed.trim_start();
        if trimmed.starts_with("<svg") || trimmed.starts_with("<?xml") {
            return "SVG/XML text".to_owned();
        }
        return "text, not image data".to_owned();
    }
    let hex: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("unrecognised data starting with {}", hex.join(" "))
}

/// 8-bit RGB as PIL gives it for the decoded image: alpha composited onto white, 16-bit channels
/// reduced to their high byte (PIL's `;16B` raw modes), 16-bit grayscale clipped at 255 (PIL opens
/// it as `I;16`, whose conversion to RGB clips rather than scales).
fn to_rgb(image: DynamicImage) -> RgbImage {
    let (width, height) = (image.width(), image.height());
    let pixels: Vec<u8> = match image {
        DynamicImage::ImageRgb8(rgb) => return rgb,
        DynamicImage::ImageLuma8(gray) => gray.into_raw().iter().flat_map(|&v| [v; 3]).collect(),
        DynamicImage::ImageLumaA8(gray) => gray
            .into_raw()
            .chunks_exact(2)
            .flat_map(|p| {
                let v = over_white(p[0], p[1]);
                [v; 3]
            })
            .collect(),
        DynamicImage::ImageRgba8(rgba) => {
            rgba.into_raw().chunks_exact(4).flat_map(|p| [0, 1, 2].map(|c| over_white(p[c], p[3]))).collect()
        }
        DynamicImage::ImageLuma16(gray) => gray.into_raw().iter().flat_map(|&v| [v.min(255) as u8; 3]).collect(),
        DynamicImage::ImageLumaA16(gray) => gray
            .into_raw()
            .chunks_exact(2)
            .flat_map(|p| {
                let v = over_white(high_byte(p[0]), high_byte(p[1]));
                [v; 3]
            })
            .collect(),
        DynamicImage::ImageRgb16(rgb) => rgb.into_raw().iter().map(|&v| high_byte(v)).collect(),
        DynamicImage::ImageRgba16(rgba) => rgba
            .into_raw()
            .chunks_exact(4)
            .flat_map(|p| [0, 1, 2].map(|c| over_white(high_byte(p[c]), high_byte(p[3]))))
            .collect(),
        // Float images come only from formats this crate does not decode.
        other => return other.to_rgb8(),
    };
    RgbImage::from_raw(width, height, pixels).unwrap_or_else(|| unreachable!("3 bytes per pixel by construction"))
}

fn high_byte(v: u16) -> u8 {
    (v >> 8) as u8
}

/// One channel of `Image.alpha_composite(white, pixel)`, in Pillow's integer arithmetic
/// (`libImaging/AlphaComposite.c`: 7 extra bits of precision, divisions by 255 done as two shifts,
/// rounded), with the destination fixed to opaque white.
pub(crate) fn over_white(value: u8, alpha: u8) -> u8 {
    const PRECISION_BITS: u32 = 7;
    const DST: u32 = 255;
    const DST_ALPHA: u32 = 255;
    let shift_div_255 = |a: u32| ((a >> 8) + a) >> 8;

    let (src, src_alpha) = (u32::from(value), u32::from(alpha));
    if src_alpha == 0 {
        return DST as u8;
    }
    let blend = DST_ALPHA * (255 - src_alpha);
    let out_alpha_255 = src_alpha * 255 + blend;
    let coef1 = src_alpha * 255 * 255 * (1 << PRECISION_BITS) / out_alpha_255;
    let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
    let blended = src * coef1 + DST * coef2;
    (shift_div_255(blended + (0x80 << PRECISION_BITS)) >> PRECISION_BITS) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compositing_matches_pillow() {
        // (value, alpha, Pillow 13's alpha_composite(white, ...) result), checked exhaustively
        // against Pillow when this was written; a sample is kept here.
        for (value, alpha, expected) in
            [(0, 0, 255), (0, 255, 0), (200, 255, 200), (0, 128, 127), (100, 128, 177), (10, 1, 254), (255, 7, 255)]
        {
            assert_eq!(over_white(value, alpha), expected, "value {value} alpha {alpha}");
        }
        for v in 0..=255u8 {
            assert_eq!(over_white(v, 255), v, "opaque pixels are unchanged");
        }
    }

    #[test]
    fn unknown_data_is_described_without_echoing_it() {
        assert_eq!(describe_unknown(b""), "empty data");
        assert_eq!(describe_unknown(b"hello world, this is not an image"), "text, not image data");
        assert_eq!(describe_unknown(b"<svg xmlns=\"http://www.w3.org/2000/svg\"/>"), "SVG/XML text");
        assert_eq!(describe_unknown(b"\0\0\0\x18ftypheic\0\0\0\0"), "HEIC/HEIF (brand heic)");
        assert_eq!(
            describe_unknown(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]),
            "unrecognised data starting with 01 02 03 04 05 06 07 08"
        );
    }
}
