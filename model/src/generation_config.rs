//! The one rule for which tokens end generation, shared by the server's engine and
//! `epserve generate`: `generation_config.json`'s `eos_token_id` when the checkpoint has that file
//! and it names any, else `config.json`'s. transformers' `generate()` and vLLM stop on the
//! generation config's ids; checkpoints put the full list there (Llama 4: `<|end_of_text|>`,
//! `<|eom|>`, `<|eot|>`), while `config.json` may name fewer.

use std::path::Path;

use serde::Deserialize;

use crate::config::TextConfig;
use crate::error::{Error, Result};

/// The fields of `generation_config.json` that serving follows. Sampling defaults (temperature,
/// top-p...) are not among them: a request's own parameters apply.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct GenerationConfig {
    /// One id or a list; `null` or absent leaves the choice to `config.json`.
    #[serde(default)]
    pub eos_token_id: Option<EosTokenIds>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum EosTokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl EosTokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            EosTokenIds::One(id) => vec![*id],
            EosTokenIds::Many(ids) => ids.clone(),
        }
    }
}

impl GenerationConfig {
    /// `dir/generation_config.json`, or the empty config when the checkpoint has none. A file that
    /// is there but unreadable or malformed is an error, not silently ignored.
    pub fn from_checkpoint(dir: &Path) -> Result<Self> {
        let path = dir.join("generation_config.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(GenerationConfig::default()),
            Err(source) => return Err(Error::Io { path, source }),
        };
        serde_json::from_str(&text).map_err(|e| Error::checkpoint(path, e.to_string()))
    }
}

/// The ids that end generation for the checkpoint in `dir`, whose `config.json` gave `text`.
pub fn eos_token_ids(dir: &Path, text: &TextConfig) -> Result<Vec<u32>> {
    let generation = GenerationConfig::from_checkpoint(dir)?;
    Ok(match generation.eos_token_id {
        Some(ids) => ids.to_vec(),
        None => text.eos_token_ids.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(json: &str) -> Result<GenerationConfig> {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("generation_config.json"), json).expect("write");
        GenerationConfig::from_checkpoint(dir.path())
    }

    #[test]
    fn one_id_a_list_or_nothing() {
        assert_eq!(read(r#"{"eos_token_id": 7}"#).expect("one").eos_token_id, Some(EosTokenIds::One(7)));
        let many = read(r#"{"eos_token_id": [1, 2], "bos_token_id": 0, "temperature": 0.6}"#).expect("list");
        assert_eq!(many.eos_token_id.expect("ids").to_vec(), vec![1, 2]);
        assert_eq!(read(r#"{"eos_token_id": null}"#).expect("null").eos_token_id, None);
        assert_eq!(read("{}").expect("absent").eos_token_id, None);
        let none = tempfile::tempdir().expect("tempdir");
        assert_eq!(GenerationConfig::from_checkpoint(none.path()).expect("no file"), GenerationConfig::default());
    }

    #[test]
    fn bad_ids_and_bad_json_are_errors_naming_the_file() {
        for bad in [r#"{"eos_token_id": -1}"#, r#"{"eos_token_id": 4294967296}"#, r#"{"eos_token_id": "x"}"#, "{"] {
            let e = read(bad).expect_err(bad).to_string();
            assert!(e.contains("generation_config.json"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_generation_config_wins_over_config_json() {
        let dir = crate::parity_tests::fixture_dir();
        let cfg = crate::ModelConfig::from_file(&dir.join("config.json")).expect("config");
        // The fixture's generation config names the same three ids as its config.json.
        assert_eq!(eos_token_ids(&dir, &cfg.text).expect("eos"), vec![481, 487, 488]);
        let copy = tempfile::tempdir().expect("tempdir");
        assert_eq!(eos_token_ids(copy.path(), &cfg.text).expect("no file"), cfg.text.eos_token_ids);
        std::fs::write(copy.path().join("generation_config.json"), r#"{"eos_token_id": [5, 6]}"#).expect("write");
        assert_eq!(eos_token_ids(copy.path(), &cfg.text).expect("file"), vec![5, 6]);
    }
}
