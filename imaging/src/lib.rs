//! Image input for Llama 4, as pure computation: encoded bytes are decoded within limits
//! ([`decode`]), turned into uint8 tiles exactly as transformers' `Llama4ImageProcessor` does
//! ([`preprocess`]: best-fit canvas, torchvision's antialiased bilinear resize, black padding,
//! row-major tiles plus the global tile), normalised to the encoder's bf16-exact input
//! ([`Tiles::pixel_values`]), and represented in the prompt by the token layout of
//! `Llama4Processor` ([`expand`]).
//!
//! The gateway and the CLI decode, preprocess and expand; the tiles travel as bytes to the
//! coordinator, which calls [`Tiles::from_parts`] and [`Tiles::pixel_values`] before running the
//! vision encoder. Boundaries: no networking, no async, no tensors (the model crate owns those); the
//! only file this crate reads is the processor configuration. Decisions and limits are in
//! `docs/images.md`.

pub mod canvas;
pub mod config;
pub mod decode;
pub mod error;
pub mod resample;
pub mod tiles;
pub mod tokens;

pub use config::ProcessorConfig;
pub use decode::{DecodeLimits, decode};
pub use error::ImageError;
/// The decoded image type in this API, re-exported so that callers need not name the `image` crate.
pub use image::RgbImage;
pub use tiles::{Tiles, preprocess};
pub use tokens::{ImageTokenIds, expand, expanded_len};
