//! What can go wrong with an image or the processor's configuration.

use std::path::PathBuf;

/// Every failure of this crate. The first four are the client's fault (a gateway answers them with
/// 400); the others are deployment or programming errors.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// More encoded bytes than the deployment accepts; checked before anything is parsed.
    #[error("image is {bytes} bytes, more than the limit of {max} bytes")]
    TooLarge { bytes: usize, max: usize },
    /// The header announces more pixels than the deployment accepts; checked before decoding, so a
    /// decompression bomb never allocates its pixels.
    #[error("image is {width}x{height} = {} pixels, more than the limit of {max} pixels", *width as u64 * *height as u64)]
    TooManyPixels { width: u32, height: u32, max: u64 },
    /// Not PNG, JPEG, WebP or GIF. `seen` names what the bytes look like instead.
    #[error("unsupported image format: {seen} (supported: PNG, JPEG, WebP, GIF)")]
    UnsupportedFormat { seen: String },
    /// The format was recognised but the data is corrupt, truncated, or empty.
    #[error("undecodable {format} image: {reason}")]
    Undecodable { format: &'static str, reason: String },
    /// A processor configuration file that exists but cannot be used.
    #[error("bad image processor configuration {}: {reason}", file.display())]
    BadConfig { file: PathBuf, reason: String },
    /// Tiles whose pixel buffer does not have the size their grid implies (or an empty grid).
    #[error("bad image tiles: {0}")]
    BadTiles(String),
    /// The tokenizer lacks one of the special tokens the image prompt layout needs.
    #[error("the tokenizer has no {name} token, needed to place image tokens in the prompt")]
    MissingToken { name: &'static str },
}

impl ImageError {
    /// Whether the error is about the image a client sent (as opposed to the deployment): the ones a
    /// server answers with 400 Bad Request.
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            Self::TooLarge { .. }
                | Self::TooManyPixels { .. }
                | Self::UnsupportedFormat { .. }
                | Self::Undecodable { .. }
        )
    }
}
