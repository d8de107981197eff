//! `epserve logits`: JSON logits for given token ids.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use epserve_model::{LogitsFor, SequenceStep};

use crate::load::{ComputeDtype, ExpertArgs};

#[derive(Debug, clap::Args)]
pub struct LogitsArgs {
    /// Checkpoint directory (hub layout: config.json + safetensors).
    #[arg(long, env = "EPSERVE_MODEL")]
    pub model: PathBuf,
    /// Comma-separated token ids, e.g. `480,12,7`.
    #[arg(long, value_delimiter = ',', required = true)]
    pub tokens: Vec<u32>,
    /// Print only the last position's logits.
    #[arg(long)]
    pub last: bool,
    /// Compute dtype.
    #[arg(long, value_enum, default_value = "f32", env = "EPSERVE_DTYPE")]
    pub dtype: ComputeDtype,
    #[command(flatten)]
    pub experts: ExpertArgs,
}

pub fn run(args: LogitsArgs) -> Result<()> {
    let standalone = args.experts.standalone(&args.model, args.dtype)?;
    let mut cache = standalone.model.new_cache();
    let which = if args.last { LogitsFor::Last } else { LogitsFor::All };
    let logits = standalone.step(&mut [SequenceStep::new(&args.tokens, &mut cache)], which)?;
    let rows = logits.to_vec2::<f32>()?;
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, &serde_json::json!({ "logits": rows }))?;
    writeln!(out)?;
    Ok(())
}
