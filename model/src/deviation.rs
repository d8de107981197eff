//! Negative controls: deliberate departures from Llama 4 that the parity tests switch on one at a
//! time, to show that each detail is noticed. Only test builds (and the `testing` feature) carry
//! them, as neon's `failpoint_support` does: in a production build no layer holds a deviation and
//! every `deviates!` check is the constant `false`, so the forward pass pays nothing for them.
//!
//! The switch lives in the layers themselves (set by `TextModel::with_deviation`), not in a
//! parameter of every forward call: attention and MoE need nothing from `text_model` for it.

/// A detail of Llama 4 done the common (wrong for Llama 4) way.
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deviation {
    /// Half-split RoPE (`rotate_half`) instead of Llama 4's interleaved pairs.
    RotateHalfRope,
    /// The router score scales the expert's output instead of its input.
    ScaleExpertOutput,
    /// No attention temperature tuning on the NoPE layers.
    NoTemperatureTuning,
    /// Chunked layers attend to the whole causal prefix.
    NoChunkMask,
    /// No L2 norm of q and k on the RoPE layers.
    NoQkNorm,
    /// Vision 2-D RoPE with the row (y) angles in the first half of each head's pairs.
    VisionRopeRowFirst,
    /// The vision class token before the patches (as in CLIP) instead of after them.
    VisionClassTokenFirst,
    /// No GELU after the vision adapter's second layer.
    VisionNoSecondAdapterGelu,
}

/// `deviates!(self.deviation, NoQkNorm)`: whether a layer runs with that deviation. The first
/// argument (an `Option<Deviation>`) is not even compiled in production builds, where this is `false`.
macro_rules! deviates {
    ($active:expr, $deviation:ident) => {{
        #[cfg(any(test, feature = "testing"))]
        let on = $active == Some($crate::deviation::Deviation::$deviation);
        #[cfg(not(any(test, feature = "testing")))]
        let on = false;
        on
    }};
}

pub(crate) use deviates;
