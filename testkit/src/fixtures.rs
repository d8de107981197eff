//! Where tests find the fixtures: the checkpoints and goldens committed under `tests/fixtures/`
//! (see its README), and the optional independent copy beside the checkout used as a cross-check.
//! Every test reaches them through here, so that no test depends on where it is compiled from.

use std::path::PathBuf;

use crate::repository_root;

/// Text + vision, top-1 routing over 16 experts in every layer, config in the hub's spelling.
pub const TINY_LLAMA4: &str = "tiny-llama4";
/// Text only, top-2 routing, dense layers between MoE layers, config as transformers 5 writes it.
pub const TINY_LLAMA4_TOP2: &str = "tiny-llama4-top2";
/// `tiny-llama4` as compressed-tensors writes it W4A16 (pack-quantized int4, group 32; per-expert
/// tensors), with goldens from the dequantised weights.
pub const TINY_LLAMA4_W4A16: &str = "tiny-llama4-w4a16";
/// `tiny-llama4` as compressed-tensors writes it FP8 (float-quantized, per-channel scales).
pub const TINY_LLAMA4_FP8: &str = "tiny-llama4-fp8";
/// The published Llama-4-Scout config (no weights).
pub const SCOUT_CONFIG: &str = "scout-config";

/// `<repository>/tests/fixtures`.
pub fn root() -> PathBuf {
    repository_root().join("tests/fixtures")
}

/// `<repository>/tests/fixtures/<name>`, e.g. `dir(TINY_LLAMA4)`.
///
/// # Panics
/// If the directory does not exist: a test cannot run without it, and the message says how to get it.
pub fn dir(name: &str) -> PathBuf {
    let dir = root().join(name);
    assert!(
        dir.is_dir(),
        "fixture {} is missing: it is committed with the repository (regenerate it with scripts/make-fixtures)",
        dir.display()
    );
    dir
}

/// Where an independently produced copy of the fixtures may sit: `../shared/fixtures` beside the
/// checkout.
pub fn independent_root() -> PathBuf {
    repository_root().join("../shared/fixtures")
}

/// The independent copy of fixture `name`, if present. Tests that use it skip (and say so) without it:
/// the repository does not depend on it.
pub fn independent_copy(name: &str) -> Option<PathBuf> {
    let dir = independent_root().join(name);
    dir.join("config.json").is_file().then_some(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_fixtures_are_found() {
        for name in [TINY_LLAMA4, TINY_LLAMA4_TOP2, TINY_LLAMA4_W4A16, TINY_LLAMA4_FP8, SCOUT_CONFIG] {
            assert!(dir(name).join("config.json").is_file(), "{name}/config.json");
        }
        assert!(dir(TINY_LLAMA4).join("golden/text.json").is_file());
    }

    #[test]
    #[should_panic(expected = "scripts/make-fixtures")]
    fn a_missing_fixture_says_how_to_get_it() {
        dir("no-such-fixture");
    }
}
