//! Errors of constrained decoding. A grammar that does not compile is the caller's (a 400 / an
//! `invalid_argument`); a grammar that fails mid-generation ends that request only.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum GrammarError {
    /// The checkpoint's `tokenizer.json` could not be read as a vocabulary llguidance understands.
    #[error("reading the vocabulary from {}: {reason}", path.display())]
    Vocabulary { path: PathBuf, reason: String },

    /// The grammar or schema does not compile (bad syntax, unsupported JSON-schema feature, a
    /// schema no value satisfies). The message is llguidance's and names the feature.
    #[error("{0}")]
    Invalid(String),

    /// The grammar failed while following the output (a bug, or a limit of the parser reached).
    #[error("the grammar could not follow the output: {0}")]
    Failed(String),
}
