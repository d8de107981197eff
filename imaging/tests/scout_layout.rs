//! The reference's §5 table through the public API with Scout's defaults: a white image of each
//! size gives the listed canvas (tile grid), is resized to the listed size (the white region of the
//! canvas; the rest is the black padding), and costs 145·h·w + 147 prompt tokens for a grid, 147
//! for a single tile.

use epserve_imaging::{ImageTokenIds, ProcessorConfig, Tiles, expand, expanded_len, preprocess};
use image::{Rgb, RgbImage};

const SCOUT_IDS: ImageTokenIds = ImageTokenIds {
    image_start: 200_080,
    image_end: 200_081,
    image: 200_090,
    patch: 200_092,
    tile_x_separator: 200_084,
    tile_y_separator: 200_085,
};
const TOKENS_PER_TILE: usize = 144;

/// Height and width of the white (resized image) region of the canvas the local tiles form.
fn content_size(tiles: &Tiles) -> (usize, usize) {
    let s = tiles.tile_size;
    let canvas_w = tiles.cols * s;
    let value = |y: usize, x: usize| {
        let tile = (y / s) * tiles.cols + x / s;
        tiles.pixels[tile * 3 * s * s + (y % s) * s + x % s]
    };
    let height = (0..tiles.rows * s).take_while(|&y| value(y, 0) == 255).count();
    let width = (0..canvas_w).take_while(|&x| value(0, x) == 255).count();
    (height, width)
}

#[test]
fn reference_table() {
    let config = ProcessorConfig::scout();
    // (input H×W, canvas H×W, resized H×W, tiles incl. global, <|patch|> count)
    let cases = [
        ((200, 300), (336, 336), (224, 336), 1, 144),
        ((336, 336), (336, 336), (336, 336), 1, 144),
        ((480, 640), (672, 672), (480, 640), 5, 720),
        ((600, 800), (672, 1008), (600, 800), 7, 1008),
        ((768, 1024), (1008, 1344), (768, 1024), 13, 1872),
        ((1080, 1920), (1008, 1680), (945, 1680), 16, 2304),
        ((3000, 4000), (1008, 1344), (1008, 1344), 13, 1872),
    ];
    for ((h, w), canvas, resized, count, patches) in cases {
        let image = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
        let tiles = preprocess(&image, &config);
        assert_eq!((tiles.rows * 336, tiles.cols * 336), canvas, "{h}x{w}: canvas");
        assert_eq!(content_size(&tiles), resized, "{h}x{w}: resized size");
        assert_eq!(tiles.count(), count, "{h}x{w}: tiles");
        assert_eq!(tiles.pixels.len(), count * 3 * 336 * 336);

        let tokens = expand(&tiles, TOKENS_PER_TILE, &SCOUT_IDS);
        let local = tiles.rows * tiles.cols;
        let expected_len = if local > 1 { 145 * local + 147 } else { 147 };
        assert_eq!(tokens.len(), expected_len, "{h}x{w}: prompt tokens");
        assert_eq!(expanded_len(tiles.rows, tiles.cols, TOKENS_PER_TILE), expected_len);
        assert_eq!(tokens.iter().filter(|&&t| t == SCOUT_IDS.patch).count(), patches, "{h}x{w}: <|patch|> count");
        if local > 1 {
            let global = &tiles.pixels[local * 3 * 336 * 336..];
            assert!(global.iter().all(|&v| v == 255), "{h}x{w}: the global tile is the whole image, unpadded");
        }
    }
}
