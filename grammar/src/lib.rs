//! Constrained decoding, shared by the two processes that need it: the coordinator enforces a
//! grammar token by token (a mask over the vocabulary applied before sampling), and the gateway
//! compiles the same grammar before it sends a request, so that a schema the engine cannot follow is
//! a 400 at the edge rather than a failure in the engine.
//!
//! Built on llguidance (the engine vLLM, SGLang and llama.cpp use for structured outputs) over the
//! checkpoint's own tokenizer ([`Vocabulary`]). A [`GrammarSpec`] is the wire form (a JSON schema or
//! a lark grammar, as text); a [`GrammarCompiler`] compiles each distinct one once and hands every
//! request a fresh [`TokenConstraint`] cloned from the compiled grammar.
//!
//! Boundaries: no sampling (the coordinator applies the mask), no HTTP, no model code.

mod closing;
pub mod compiler;
pub mod constraint;
pub mod errors;
pub mod spec;
pub mod vocabulary;

pub use compiler::GrammarCompiler;
pub use constraint::{Advance, CLOSING_WINDOW, TokenConstraint, TokenMask};
pub use errors::GrammarError;
pub use spec::{GrammarKind, GrammarSpec, json_schema_for_lark};
pub use vocabulary::Vocabulary;
