//! A checkpoint file as `Checkpoint::open` maps it: the 8-byte header length, the JSON header
//! (dtypes, shapes, data offsets), then every tensor it announces read back through `WeightSource`,
//! whole, by rows, and as a compressed-tensors matrix (fp8 or packed int4) when the checkpoint's
//! `config.json` declares one.
//!
//! Input: one byte choosing the `config.json` beside the file (none, the fp8 fixture's, the
//! w4a16 fixture's), then the bytes of `model.safetensors`.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device};
use epserve_model::{Checkpoint, WeightSource};
use libfuzzer_sys::fuzz_target;

const CONFIGS: [Option<&str>; 3] = [
    None,
    Some(include_str!("../../tests/fixtures/tiny-llama4-fp8/config.json")),
    Some(include_str!("../../tests/fixtures/tiny-llama4-w4a16/config.json")),
];

/// The choice whose `config.json` is in the directory (none yet: no file).
static LAST_CONFIG: AtomicUsize = AtomicUsize::new(0);

/// One directory per fuzzing process, rewritten for every input (the checkpoint API reads files).
fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("epserve-fuzz-safetensors-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        dir
    })
}

fuzz_target!(|input: &[u8]| {
    let Some((&choice, file)) = input.split_first() else { return };
    let dir = dir();
    std::fs::write(dir.join("model.safetensors"), file).expect("writing the input");
    let choice = usize::from(choice) % CONFIGS.len();
    // Rewritten only when it changes: most inputs keep their seed's choice.
    if LAST_CONFIG.swap(choice, Ordering::Relaxed) != choice {
        let config = dir.join("config.json");
        match CONFIGS[choice] {
            Some(text) => std::fs::write(&config, text).expect("writing config.json"),
            None => {
                let _ = std::fs::remove_file(&config);
            }
        }
    }
    let Ok(checkpoint) = Checkpoint::open(dir) else { return };
    let total = checkpoint.total_bytes().unwrap_or(0);
    assert!(total <= file.len() as u64, "tensors announce {total} bytes in a {}-byte file", file.len());
    let keys: Vec<String> = checkpoint.keys().map(str::to_owned).collect();
    for key in keys {
        let Some(shape) = checkpoint.shape(&key).map(<[usize]>::to_vec) else { continue };
        let _ = checkpoint.tensor(&key, &shape, DType::F32, &Device::Cpu);
        let _ = checkpoint.tensor(&key, &[1], DType::BF16, &Device::Cpu);
        if let Some(&first) = shape.first() {
            let _ = checkpoint.rows(&key, &shape, first / 2, first - first / 2, DType::F32, &Device::Cpu);
        }
        quantized(&checkpoint, &key, &shape);
    }
});

/// A matrix `[n, k]` stored as `{base}weight` (fp8) or `{base}weight_packed` (int32 words of 8 int4
/// or 4 int8 codes): read with the shapes a model could ask for.
fn quantized(checkpoint: &Checkpoint, key: &str, shape: &[usize]) {
    let (Some(base), &[n, cols]) = (key.strip_suffix("weight_packed").or(key.strip_suffix("weight")), shape) else {
        return;
    };
    for k in [cols, cols.saturating_mul(8), cols.saturating_mul(4), cols.saturating_mul(8).saturating_sub(1)] {
        if k <= 1 << 16 {
            let _ = checkpoint.quantized(&format!("{base}weight"), (n, k));
        }
    }
}
