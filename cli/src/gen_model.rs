//! `epserve gen-model`: a random-weight Llama-4 checkpoint in hub layout, for demos, tests and
//! benchmarks (written by `epserve-synthetic`): multimodal with the preset's vision tower, or text
//! only with `--no-vision`; `--router-skew zipf:S` makes its routers prefer some experts.

use std::path::PathBuf;

use anyhow::Result;
use epserve_synthetic::{CheckpointOptions, Preset, RouterSkew, StoredDtype};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoredDtypeArg {
    Bf16,
    F32,
}

impl From<StoredDtypeArg> for StoredDtype {
    fn from(d: StoredDtypeArg) -> Self {
        match d {
            StoredDtypeArg::Bf16 => StoredDtype::Bf16,
            StoredDtypeArg::F32 => StoredDtype::F32,
        }
    }
}

/// Model shape on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PresetArg {
    /// The fixture's geometry.
    Tiny,
    /// The benchmark shape.
    Mini,
    /// Scout's hidden size with tiny experts, for exchange benchmarks.
    ScoutWire,
}

impl From<PresetArg> for Preset {
    fn from(p: PresetArg) -> Self {
        match p {
            PresetArg::Tiny => Preset::Tiny,
            PresetArg::Mini => Preset::Mini,
            PresetArg::ScoutWire => Preset::ScoutWire,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct GenModelArgs {
    /// Model shape.
    #[arg(long, value_enum, default_value = "mini")]
    pub preset: PresetArg,
    /// Seed of the weights (same seed, same checkpoint).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory (created; must not already hold a checkpoint unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Dtype the weights are stored in.
    #[arg(long, value_enum, default_value = "bf16")]
    pub dtype: StoredDtypeArg,
    /// Overwrite an existing checkpoint in --out.
    #[arg(long)]
    pub force: bool,
    /// Split the weights into shards of about this many MiB, with model.safetensors.index.json.
    #[arg(long)]
    pub shard_mib: Option<usize>,
    /// Write a text-only `Llama4ForCausalLM` checkpoint (no vision tower, no
    /// preprocessor_config.json) with the same text weights as the multimodal one.
    #[arg(long)]
    pub no_vision: bool,
    /// Bias each MoE layer's router so that expert popularity follows Zipf(S), under a per-layer
    /// permutation drawn from SEED (default 0): `zipf:S[,SEED]`, or `none` for the random routers
    /// (docs/load-balancing.md, "Skewed test models").
    #[arg(long, default_value = "none", value_parser = parse_router_skew)]
    pub router_skew: Skew,
}

/// `--router-skew` as parsed (clap needs a type of its own for an optional value with a default).
#[derive(Debug, Clone, Copy)]
pub struct Skew(pub Option<RouterSkew>);

fn parse_router_skew(text: &str) -> Result<Skew, String> {
    RouterSkew::parse(text).map(Skew).map_err(|e| e.to_string())
}

pub fn run(args: GenModelArgs) -> Result<()> {
    let options = CheckpointOptions {
        dtype: args.dtype.into(),
        vision: !args.no_vision,
        force: args.force,
        shard_mib: args.shard_mib,
        router_skew: args.router_skew.0,
    };
    epserve_synthetic::write_checkpoint(args.preset.into(), args.seed, &args.out, &options)?;
    println!("{}", args.out.display());
    Ok(())
}
