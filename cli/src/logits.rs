//! `epserve logits`: JSON logits for a prompt (token ids, or text with images in a chat turn).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Result, anyhow};
use epserve_model::{ImageRows, LogitsFor, SequenceStep};

use crate::load::{ComputeDtype, ExpertArgs};
use crate::prompt::{PromptArgs, load_tokenizer};

#[derive(Debug, clap::Args)]
pub struct LogitsArgs {
    /// Checkpoint directory (hub layout: config.json + safetensors).
    #[arg(long, env = "EPSERVE_MODEL")]
    pub model: PathBuf,
    #[command(flatten)]
    pub prompt: PromptArgs,
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
    let tokenizer = if args.prompt.prompt.is_some() { Some(load_tokenizer(&args.model)?) } else { None };
    let prompt = args.prompt.build(&args.model, tokenizer.as_ref())?;
    prompt.check_not_empty()?;
    let standalone = args.experts.standalone(&args.model, args.dtype)?;
    let images = standalone.image_features(&prompt.ids, &prompt.images).map_err(|e| anyhow!(e))?;
    let mut cache = standalone.model.new_cache();
    let which = if args.last { LogitsFor::Last } else { LogitsFor::All };
    let step = SequenceStep::new(&prompt.ids, &mut cache)
        .with_images(images.as_ref().map(|(positions, features)| ImageRows { positions, features: features.clone() }));
    let logits = standalone.step(&mut [step], which)?;
    let rows = logits.to_vec2::<f32>()?;
    let mut out = std::io::stdout().lock();
    let json = if prompt.from_text {
        serde_json::json!({ "prompt_tokens": prompt.ids, "logits": rows })
    } else {
        serde_json::json!({ "logits": rows })
    };
    serde_json::to_writer(&mut out, &json)?;
    writeln!(out)?;
    Ok(())
}
