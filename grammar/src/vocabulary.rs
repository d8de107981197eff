//! The checkpoint's vocabulary as llguidance reads it: every token id with its bytes (special
//! tokens marked, so that no grammar can spell them out of text), the end-of-sequence ids, and the
//! checkpoint's own tokenizer for the few places llguidance tokenizes text itself.
//!
//! Why not `toktrie_hf_tokenizers`: its 1.9.1 requires `tokenizers` 0.21, and the workspace reads
//! tokenizers with 0.23; the bytes of each token come from llguidance's own reader of
//! `tokenizer.json` (`token_bytes_from_tokenizer_json`, the one its C API uses) instead, and
//! tokenization from the workspace's `tokenizers`.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::errors::GrammarError;

/// What a [`crate::GrammarCompiler`] compiles against; cheap to clone.
#[derive(Clone)]
pub struct Vocabulary {
    env: TokEnv,
}

impl std::fmt::Debug for Vocabulary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let trie = self.env.tok_trie();
        f.debug_struct("Vocabulary").field("size", &trie.vocab_size()).field("eos", &trie.eos_token()).finish()
    }
}

impl Vocabulary {
    /// Reads `dir/tokenizer.json`. `model_vocab` is the size of the model's logits rows (it may pad
    /// beyond the tokenizer's ids: those ids get no bytes and are never allowed); `eos` the ids that
    /// end a generation (the checkpoint's `eos_token_ids`), allowed once the grammar is complete.
    pub fn from_checkpoint(dir: &Path, model_vocab: usize, eos: &[u32]) -> Result<Self, GrammarError> {
        let path = dir.join("tokenizer.json");
        let failed = |reason: String| GrammarError::Vocabulary { path: path.clone(), reason };
        let text = std::fs::read_to_string(&path).map_err(|e| failed(e.to_string()))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| failed(e.to_string()))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| failed(format!("{e:#}")))?;
        if words.len() > model_vocab {
            return Err(failed(format!("the tokenizer has {} ids, the model's vocabulary {model_vocab}", words.len())));
        }
        words.resize(model_vocab, Vec::new());
        let tokenizer = tokenizers::Tokenizer::from_str(&text).map_err(|e| failed(e.to_string()))?;
        let (&first, _) =
            eos.split_first().ok_or_else(|| failed("the checkpoint names no end-of-sequence id".into()))?;
        if let Some(bad) = eos.iter().find(|&&t| t as usize >= model_vocab) {
            return Err(failed(format!("end-of-sequence id {bad} is outside the vocabulary")));
        }
        let info = TokRxInfo::new(model_vocab as u32, first);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(eos);
        Ok(Vocabulary { env: Arc::new(CheckpointTokenizer { trie, tokenizer }) })
    }

    pub(crate) fn env(&self) -> &TokEnv {
        &self.env
    }

    /// Size of the logits rows the masks cover.
    pub fn size(&self) -> usize {
        self.env.tok_trie().vocab_size()
    }
}

struct CheckpointTokenizer {
    trie: TokTrie,
    tokenizer: tokenizers::Tokenizer,
}

impl TokenizerEnv for CheckpointTokenizer {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    /// llguidance tokenizes only text that a grammar forces (literals it may emit ahead); bytes
    /// that are not UTF-8 fall back to the trie's greedy tokenization.
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        match std::str::from_utf8(s) {
            Ok(text) => match self.tokenizer.encode_fast(text, false) {
                Ok(encoding) => encoding.get_ids().to_vec(),
                Err(_) => self.trie.greedy_tokenize(s),
            },
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_fixture_vocabulary() {
        let dir = epserve_testkit::fixtures::dir(epserve_testkit::fixtures::TINY_LLAMA4);
        let v = Vocabulary::from_checkpoint(&dir, 512, &[481, 487, 488]).expect("vocabulary");
        assert_eq!(v.size(), 512);
        let trie = v.env().tok_trie();
        let brace = trie.token_id(b"{").expect("a token for {");
        assert_eq!(trie.token(brace), b"{");
        // Special tokens carry llguidance's marker, so that no text spells them.
        assert_eq!(trie.token(488)[0], TokTrie::SPECIAL_TOKEN_MARKER);
        assert!(Vocabulary::from_checkpoint(&dir, 100, &[481]).is_err(), "the tokenizer is larger");
        assert!(Vocabulary::from_checkpoint(&dir, 512, &[]).is_err(), "no EOS");
    }
}
