//! Decoding: every accepted format, PIL's RGB conversion, and each refusal a client can trigger.
//! Test images are made here with the `image` crate's encoders.

use epserve_imaging::{DecodeLimits, ImageError, decode};
use image::codecs::gif::GifEncoder;
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::codecs::webp::WebPEncoder;
use image::{ExtendedColorType, ImageEncoder, Rgb, RgbImage, Rgba, RgbaImage};

fn limits() -> DecodeLimits {
    DecodeLimits::default()
}

fn noise(width: u32, height: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        let v = (x * 7919 + y * 104_729) ^ (x * y);
        Rgb([v as u8, (v >> 8) as u8, (v >> 16) as u8])
    })
}

fn png(data: &[u8], width: u32, height: u32, color: ExtendedColorType) -> Vec<u8> {
    let mut out = Vec::new();
    PngEncoder::new(&mut out).write_image(data, width, height, color).unwrap_or_else(|e| panic!("png: {e}"));
    out
}

fn decoded(bytes: &[u8]) -> RgbImage {
    decode(bytes, &limits()).unwrap_or_else(|e| panic!("decode: {e}"))
}

/// PNG chunks carry a CRC-32 (ISO 3309) that decoders check; crafted headers need a valid one.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut chunk = (data.len() as u32).to_be_bytes().to_vec();
    chunk.extend_from_slice(kind);
    chunk.extend_from_slice(data);
    let mut crc_input = kind.to_vec();
    crc_input.extend_from_slice(data);
    chunk.extend_from_slice(&crc32(&crc_input).to_be_bytes());
    chunk
}

#[test]
fn png_rgb_is_exact() {
    let image = noise(31, 17);
    assert_eq!(decoded(&png(image.as_raw(), 31, 17, ExtendedColorType::Rgb8)), image);
}

#[test]
fn transparency_is_composited_on_white() {
    // Pillow's alpha_composite(white, ·): transparent → white, half-transparent black → 127,
    // opaque unchanged.
    let pixels = [Rgba([10, 200, 30, 0]), Rgba([0, 0, 0, 128]), Rgba([100, 150, 200, 255]), Rgba([0, 100, 255, 64])];
    let image = RgbaImage::from_fn(4, 1, |x, _| pixels[x as usize]);
    let rgb = decoded(&png(image.as_raw(), 4, 1, ExtendedColorType::Rgba8));
    let got: Vec<[u8; 3]> = rgb.pixels().map(|p| p.0).collect();
    assert_eq!(got, [[255, 255, 255], [127, 127, 127], [100, 150, 200], [191, 216, 255]]);
}

#[test]
fn grayscale_and_sixteen_bit_convert_as_pil() {
    let gray = decoded(&png(&[0, 77, 255], 3, 1, ExtendedColorType::L8));
    assert_eq!(gray.as_raw(), &[0, 0, 0, 77, 77, 77, 255, 255, 255]);
    // PIL opens 16-bit grayscale as I;16, whose conversion to RGB clips at 255.
    let values: Vec<u8> = [0u16, 100, 255, 256, 1000, 65535].iter().flat_map(|v| v.to_ne_bytes()).collect();
    let gray16 = decoded(&png(&values, 6, 1, ExtendedColorType::L16));
    let firsts: Vec<u8> = gray16.pixels().map(|p| p.0[0]).collect();
    assert_eq!(firsts, [0, 100, 255, 255, 255, 255]);
    // 16-bit colour keeps the high byte (PIL's RGB;16B raw mode).
    let values: Vec<u8> = [0x12FFu16, 0x1280, 0xFFFF].iter().flat_map(|v| v.to_ne_bytes()).collect();
    assert_eq!(decoded(&png(&values, 1, 1, ExtendedColorType::Rgb16)).as_raw(), &[0x12, 0x12, 0xFF]);
}

#[test]
fn gif_gives_its_first_frame() {
    let frame = |color: [u8; 4]| image::Frame::new(RgbaImage::from_pixel(8, 6, Rgba(color)));
    let mut bytes = Vec::new();
    {
        let mut encoder = GifEncoder::new(&mut bytes);
        encoder
            .encode_frames([frame([255, 0, 0, 255]), frame([0, 0, 255, 255])])
            .unwrap_or_else(|e| panic!("gif: {e}"));
    }
    let image = decoded(&bytes);
    assert_eq!(image.dimensions(), (8, 6));
    assert!(image.pixels().all(|p| p.0 == [255, 0, 0]), "the first (red) frame, not the second");
}

#[test]
fn webp_decodes() {
    let image = noise(19, 23);
    let mut bytes = Vec::new();
    WebPEncoder::new_lossless(&mut bytes)
        .write_image(image.as_raw(), 19, 23, ExtendedColorType::Rgb8)
        .unwrap_or_else(|e| panic!("webp: {e}"));
    assert_eq!(decoded(&bytes), image, "lossless WebP round-trips exactly");
}

fn smooth(width: u32, height: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| Rgb([(x * 3) as u8, (y * 4) as u8, ((x + y) * 2) as u8]))
}

fn jpeg(image: &RgbImage, exif: Option<Vec<u8>>) -> Vec<u8> {
    let mut bytes = Vec::new();
    let mut encoder = JpegEncoder::new_with_quality(&mut bytes, 95);
    if let Some(exif) = exif {
        encoder.set_exif_metadata(exif).unwrap_or_else(|e| panic!("exif: {e}"));
    }
    encoder
        .write_image(image.as_raw(), image.width(), image.height(), ExtendedColorType::Rgb8)
        .unwrap_or_else(|e| panic!("jpeg: {e}"));
    bytes
}

#[test]
fn jpeg_decodes() {
    let image = smooth(40, 30);
    let back = decoded(&jpeg(&image, None));
    assert_eq!(back.dimensions(), (40, 30));
    let max = back.as_raw().iter().zip(image.as_raw()).map(|(&a, &b)| a.abs_diff(b)).max().unwrap_or(0);
    assert!(max <= 16, "a quality-95 JPEG of a smooth image stays close, max difference {max}");
}

#[test]
fn exif_orientation_is_applied() {
    // A TIFF block (little endian) with one IFD entry: Orientation (0x0112), SHORT, 1, value 6 =
    // "rotate 90° clockwise to display".
    let exif = [
        b'I', b'I', 42, 0, 8, 0, 0, 0, // header, IFD at 8
        1, 0, // one entry
        0x12, 0x01, 3, 0, 1, 0, 0, 0, 6, 0, 0, 0, // orientation = 6
        0, 0, 0, 0, // no next IFD
    ];
    let image = smooth(40, 24);
    let upright = decoded(&jpeg(&image, Some(exif.to_vec())));
    assert_eq!(upright.dimensions(), (24, 40), "displayed as the camera meant it");
    // The stored top-left corner is now the top-right one.
    let near = |a: [u8; 3], b: [u8; 3]| a.iter().zip(b).all(|(&x, y)| x.abs_diff(y) <= 8);
    assert!(near(upright.get_pixel(23, 0).0, image.get_pixel(0, 0).0));
}

#[test]
fn too_many_bytes_is_refused_before_parsing() {
    let bytes = png(noise(64, 64).as_raw(), 64, 64, ExtendedColorType::Rgb8);
    let small = DecodeLimits { max_bytes: bytes.len() - 1, ..limits() };
    assert!(matches!(decode(&bytes, &small), Err(ImageError::TooLarge { max, .. }) if max == bytes.len() - 1));
    assert!(decode(&bytes, &DecodeLimits { max_bytes: bytes.len(), ..limits() }).is_ok());
    // Garbage is refused as too large too: the byte count comes first.
    assert!(matches!(
        decode(&[0u8; 100], &DecodeLimits { max_bytes: 10, ..limits() }),
        Err(ImageError::TooLarge { .. })
    ));
}

/// A PNG whose header claims 100000×100000 (10 gigapixels, 30 GB of RGB) with a tiny compressed
/// body: refused from the header, before any pixel buffer exists.
#[test]
fn decompression_bomb_fails_fast() {
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
    let mut bomb = b"\x89PNG\r\n\x1a\n".to_vec();
    bomb.extend(png_chunk(b"IHDR", &ihdr));
    bomb.extend(png_chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]));
    bomb.extend(png_chunk(b"IEND", &[]));
    match decode(&bomb, &limits()) {
        Err(ImageError::TooManyPixels { width: 100_000, height: 100_000, max }) => assert_eq!(max, limits().max_pixels),
        other => panic!("expected TooManyPixels, got {other:?}"),
    }
    let error = decode(&bomb, &limits()).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(error.contains("100000x100000"), "{error}");

    // The same check for a GIF whose logical screen is 65535×65535 and a JPEG whose frame header
    // claims 60000×60000: real small files with their headers rewritten.
    let mut gif = Vec::new();
    GifEncoder::new(&mut gif)
        .encode_frames([image::Frame::new(RgbaImage::from_pixel(2, 2, Rgba([1, 2, 3, 255])))])
        .unwrap_or_else(|e| panic!("gif: {e}"));
    gif[6..10].copy_from_slice(&[0xFF; 4]);
    assert!(matches!(decode(&gif, &limits()), Err(ImageError::TooManyPixels { width: 65535, height: 65535, .. })));

    let mut jpg = jpeg(&smooth(8, 8), None);
    let sof = jpg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap_or_else(|| panic!("baseline SOF0 marker"));
    jpg[sof + 5..sof + 9].copy_from_slice(&[0xEA, 0x60, 0xEA, 0x60]);
    assert!(matches!(decode(&jpg, &limits()), Err(ImageError::TooManyPixels { width: 60000, height: 60000, .. })));
}

#[test]
fn unsupported_formats_are_named() {
    let mut bmp = b"BM".to_vec();
    bmp.extend_from_slice(&[0u8; 60]);
    let tiff = b"II*\0\x08\0\0\0\0\0".to_vec();
    let cases: [(&[u8], &str); 5] = [
        (&bmp, "BMP"),
        (&tiff, "TIFF"),
        (b"this is certainly not an image", "text"),
        (b"", "empty"),
        (&[0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88], "00 11 22 33"),
    ];
    for (bytes, seen) in cases {
        match decode(bytes, &limits()) {
            Err(e @ ImageError::UnsupportedFormat { .. }) => {
                assert!(e.is_client_error());
                assert!(e.to_string().contains(seen), "{e}");
            }
            other => panic!("{seen}: expected UnsupportedFormat, got {other:?}"),
        }
    }
}

#[test]
fn corrupt_data_is_undecodable() {
    let full = png(noise(64, 64).as_raw(), 64, 64, ExtendedColorType::Rgb8);
    for cut in [full.len() / 2, 40, 12] {
        match decode(&full[..cut], &limits()) {
            Err(e @ ImageError::Undecodable { format: "PNG", .. }) => assert!(e.is_client_error()),
            other => panic!("PNG cut at {cut} bytes: expected Undecodable, got {other:?}"),
        }
    }
    let mut flipped = full.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0xFF;
    assert!(matches!(decode(&flipped, &limits()), Err(ImageError::Undecodable { format: "PNG", .. })));
    assert!(matches!(decode(&full[..3], &limits()), Err(ImageError::UnsupportedFormat { .. })), "too short to sniff");
}
