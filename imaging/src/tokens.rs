//! The prompt tokens that stand for an image (`Llama4Processor._prompt_split_image`; Meta's
//! `chat_format._encode_image` is the same). The vision features later replace the `<|patch|>`
//! embeddings, in order; the other markers stay ordinary tokens.

use crate::error::ImageError;
use crate::tiles::Tiles;

/// Ids of the special tokens of the image layout (Scout: 200080, 200081, 200090, 200092, 200084,
/// 200085).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageTokenIds {
    pub image_start: u32,
    pub image_end: u32,
    /// `<|image|>`: the chat template's placeholder, and in the expansion the marker before the
    /// global tile's patches. Never replaced by features.
    pub image: u32,
    /// `<|patch|>`: one per vision feature row.
    pub patch: u32,
    pub tile_x_separator: u32,
    pub tile_y_separator: u32,
}

impl ImageTokenIds {
    /// Looks the tokens up by name through the tokenizer's `id_of`.
    ///
    /// # Errors
    /// [`ImageError::MissingToken`] naming the first token the tokenizer lacks.
    pub fn lookup(id_of: impl Fn(&str) -> Option<u32>) -> Result<Self, ImageError> {
        let get = |name: &'static str| id_of(name).ok_or(ImageError::MissingToken { name });
        Ok(Self {
            image_start: get("<|image_start|>")?,
            image_end: get("<|image_end|>")?,
            image: get("<|image|>")?,
            patch: get("<|patch|>")?,
            tile_x_separator: get("<|tile_x_separator|>")?,
            tile_y_separator: get("<|tile_y_separator|>")?,
        })
    }
}

/// The tokens that replace one `<|image|>` placeholder for `tiles`, with `tokens_per_tile`
/// `<|patch|>` per tile (the vision encoder's output rows per tile: 144 for Scout).
///
/// One tile: `<|image_start|> <|image|> <|patch|>×T <|image_end|>`. A grid of h×w tiles:
/// `<|image_start|>`, then per row the row's tiles' patches with `<|tile_x_separator|>` between
/// columns and `<|tile_y_separator|>` after every row (the last included), then `<|image|>` and
/// the global tile's patches, then `<|image_end|>`: (T+1)·h·w + T + 3 tokens.
pub fn expand(tiles: &Tiles, tokens_per_tile: usize, ids: &ImageTokenIds) -> Vec<u32> {
    let patches = std::iter::repeat_n(ids.patch, tokens_per_tile);
    let mut out = Vec::with_capacity(expanded_len(tiles.rows, tiles.cols, tokens_per_tile));
    out.push(ids.image_start);
    if tiles.rows * tiles.cols > 1 {
        for _ in 0..tiles.rows {
            for x in 0..tiles.cols {
                out.extend(patches.clone());
                if x + 1 < tiles.cols {
                    out.push(ids.tile_x_separator);
                }
            }
            out.push(ids.tile_y_separator);
        }
    }
    out.push(ids.image);
    out.extend(patches);
    out.push(ids.image_end);
    out
}

/// How many tokens [`expand`] gives for a `rows`×`cols` grid: what an image costs in the prompt,
/// without building it (for `usage` and admission).
pub fn expanded_len(rows: usize, cols: usize, tokens_per_tile: usize) -> usize {
    let local = rows * cols;
    if local > 1 { (tokens_per_tile + 1) * local + tokens_per_tile + 3 } else { tokens_per_tile + 3 }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDS: ImageTokenIds =
        ImageTokenIds { image_start: 1, image_end: 2, image: 3, patch: 9, tile_x_separator: 4, tile_y_separator: 5 };

    fn tiles(rows: usize, cols: usize) -> Tiles {
        Tiles { rows, cols, tile_size: 0, pixels: Vec::new() }
    }

    #[test]
    fn single_tile() {
        assert_eq!(expand(&tiles(1, 1), 2, &IDS), [1, 3, 9, 9, 2]);
        assert_eq!(expand(&tiles(1, 1), 144, &IDS).len(), 147);
    }

    #[test]
    fn grid_with_separators_and_global_tile() {
        assert_eq!(expand(&tiles(2, 2), 1, &IDS), [1, 9, 4, 9, 5, 9, 4, 9, 5, 3, 9, 2]);
        assert_eq!(expand(&tiles(1, 3), 2, &IDS), [1, 9, 9, 4, 9, 9, 4, 9, 9, 5, 3, 9, 9, 2]);
    }

    #[test]
    fn scout_token_counts() {
        for (rows, cols) in [(1, 1), (2, 2), (2, 3), (3, 4), (3, 5), (1, 16), (4, 4)] {
            let expected = if rows * cols > 1 { 145 * rows * cols + 147 } else { 147 };
            let tokens = expand(&tiles(rows, cols), 144, &IDS);
            assert_eq!(tokens.len(), expected, "{rows}x{cols}");
            assert_eq!(expanded_len(rows, cols, 144), expected);
            let patches = tokens.iter().filter(|&&t| t == IDS.patch).count();
            assert_eq!(patches, 144 * tiles(rows, cols).count(), "one <|patch|> per feature row");
        }
        assert_eq!(expanded_len(2, 3, 144), 1017);
    }

    #[test]
    fn lookup_names_the_missing_token() {
        let ids = ImageTokenIds::lookup(|name| match name {
            "<|image_start|>" => Some(1),
            "<|image_end|>" => Some(2),
            "<|image|>" => Some(3),
            "<|patch|>" => Some(9),
            "<|tile_x_separator|>" => Some(4),
            "<|tile_y_separator|>" => Some(5),
            _ => None,
        });
        assert_eq!(ids.ok(), Some(IDS));
        let missing = ImageTokenIds::lookup(|name| (name != "<|patch|>").then_some(0));
        assert!(matches!(missing, Err(ImageError::MissingToken { name: "<|patch|>" })));
    }
}
