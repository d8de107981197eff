//! Loading a checkpoint directory for the offline commands, with progress on the log.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use epserve_model::{Checkpoint, ExpertShard, ModelConfig, TextModel, WeightSource};

/// Compute dtype on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ComputeDtype {
    F32,
    Bf16,
}

impl From<ComputeDtype> for DType {
    fn from(d: ComputeDtype) -> Self {
        match d {
            ComputeDtype::F32 => DType::F32,
            ComputeDtype::Bf16 => DType::BF16,
        }
    }
}

pub struct Loaded {
    pub config: ModelConfig,
    pub model: TextModel,
    pub experts: ExpertShard,
}

/// Logs every 10% of the bytes read, with the rate at the end.
pub struct LoadProgress<'a> {
    src: &'a dyn WeightSource,
    what: &'static str,
    total: u64,
    last_decile: u64,
    started: Instant,
}

impl<'a> LoadProgress<'a> {
    pub fn new(src: &'a dyn WeightSource, what: &'static str) -> Self {
        LoadProgress { src, what, total: src.total_bytes().unwrap_or(0), last_decile: 0, started: Instant::now() }
    }

    pub fn tick(&mut self) {
        // Small checkpoints load in milliseconds: only the final line is worth printing.
        if self.total < 256 << 20 {
            return;
        }
        let read = self.src.bytes_read();
        let decile = read * 10 / self.total;
        if decile > self.last_decile {
            self.last_decile = decile;
            tracing::info!(
                "loading {}: {:.1} of {:.1} MiB read ({}%)",
                self.what,
                read as f64 / 1048576.0,
                self.total as f64 / 1048576.0,
                read * 100 / self.total
            );
        }
    }

    pub fn finish(&self) {
        let secs = self.started.elapsed().as_secs_f64();
        let read = self.src.bytes_read() as f64 / 1048576.0;
        tracing::info!("loaded {}: {read:.1} MiB in {secs:.2} s ({:.0} MiB/s)", self.what, read / secs.max(1e-9));
    }
}

pub fn load(dir: &Path, dtype: ComputeDtype) -> Result<Loaded> {
    let config = ModelConfig::from_file(&dir.join("config.json"))
        .with_context(|| format!("reading {}", dir.join("config.json").display()))?;
    let ckpt = Checkpoint::open(dir)?;
    let device = Device::Cpu;
    let mut progress = LoadProgress::new(&ckpt, "weights");
    let model = TextModel::load(&config, &ckpt, dtype.into(), &device, &mut |_, _| progress.tick())?;
    let all: Vec<u32> = (0..config.text.num_local_experts as u32).collect();
    let experts = ExpertShard::load(&config, &ckpt, &all, dtype.into(), &device, &mut || progress.tick())?;
    progress.finish();
    Ok(Loaded { config, model, experts })
}
