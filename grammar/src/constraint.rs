//! One request's grammar as it follows the output: the mask of tokens allowed next, and the state
//! after each sampled token.

use llguidance::Matcher;
use toktrie::SimpleVob;

use crate::errors::GrammarError;
use crate::spec::GrammarKind;

/// The grammar state of one request. Moved to a mask thread and back every step, so it is `Send`;
/// the parser state (over 1.5 KB) is boxed so that moving it is moving a pointer.
pub struct TokenConstraint {
    matcher: Box<Matcher>,
    kind: GrammarKind,
}

impl std::fmt::Debug for TokenConstraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenConstraint")
            .field("kind", &self.kind)
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

/// A copy at the same point of the output, following it independently from then on.
impl Clone for TokenConstraint {
    fn clone(&self) -> Self {
        TokenConstraint { matcher: Box::new(self.matcher.deep_clone()), kind: self.kind }
    }
}

/// What a sampled token did to the grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advance {
    /// More output is needed (or allowed).
    Continue,
    /// The grammar is complete and allows nothing more: the request ends here.
    Complete,
}

/// Which tokens may come next.
#[derive(Debug, Clone)]
pub struct TokenMask {
    allowed: SimpleVob,
}

impl TokenMask {
    /// Sets every disallowed token's score to −∞ (ids past the mask, padding of the logits row,
    /// included).
    pub fn apply(&self, scores: &mut [f32]) {
        let len = self.allowed.len();
        for (id, score) in scores.iter_mut().enumerate() {
            if id >= len || !self.allowed.is_allowed(id as u32) {
                *score = f32::NEG_INFINITY;
            }
        }
    }

    pub fn is_allowed(&self, token: u32) -> bool {
        (token as usize) < self.allowed.len() && self.allowed.is_allowed(token)
    }

    /// Tokens allowed.
    pub fn count(&self) -> usize {
        self.allowed.num_set()
    }
}

impl TokenConstraint {
    pub(crate) fn new(matcher: Matcher, kind: GrammarKind) -> Self {
        TokenConstraint { matcher: Box::new(matcher), kind }
    }

    pub fn kind(&self) -> GrammarKind {
        self.kind
    }

    /// The tokens allowed after the output so far: only the end-of-sequence ids once the grammar
    /// is complete, and those among others while it may end or go on.
    pub fn mask(&mut self) -> Result<TokenMask, GrammarError> {
        let allowed = self.matcher.compute_mask_or_eos().map_err(|e| GrammarError::Failed(format!("{e:#}")))?;
        if allowed.is_zero() {
            return Err(GrammarError::Failed("the grammar allows no token here".into()));
        }
        Ok(TokenMask { allowed })
    }

    /// Follows a sampled token that the last mask allowed (not an end-of-sequence id: the request
    /// ends on those without the grammar's help).
    pub fn advance(&mut self, token: u32) -> Result<Advance, GrammarError> {
        self.matcher.consume_token(token).map_err(|e| GrammarError::Failed(format!("{e:#}")))?;
        Ok(if self.matcher.is_stopped() { Advance::Complete } else { Advance::Continue })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{GrammarCompiler, GrammarSpec, Vocabulary};

    fn compiler() -> GrammarCompiler {
        let dir = epserve_testkit::fixtures::dir(epserve_testkit::fixtures::TINY_LLAMA4);
        GrammarCompiler::new(Vocabulary::from_checkpoint(&dir, 512, &[481, 487, 488]).expect("vocabulary"))
            .expect("compiler")
    }

    /// Walks the grammar by always taking the allowed token that spells the most of `text` next.
    fn follow(constraint: &mut TokenConstraint, compiler: &GrammarCompiler, text: &str) -> Advance {
        let trie = compiler.vocabulary().env().tok_trie();
        let mut rest = text.as_bytes();
        let mut last = Advance::Continue;
        while !rest.is_empty() {
            let mask = constraint.mask().expect("mask");
            let token = (0..rest.len())
                .rev()
                .filter_map(|n| trie.token_id(&rest[..=n]))
                .find(|&t| mask.is_allowed(t))
                .unwrap_or_else(|| panic!("no allowed token spells {:?}", String::from_utf8_lossy(rest)));
            rest = &rest[trie.token(token).len()..];
            last = constraint.advance(token).expect("advance");
        }
        last
    }

    #[test]
    fn a_schema_allows_exactly_its_documents() {
        let compiler = compiler();
        let schema = r#"{"type": "object", "properties": {"n": {"type": "integer"}, "tag": {"enum": ["a", "b"]}},
                         "required": ["n", "tag"], "additionalProperties": false}"#;
        let spec = GrammarSpec::json_schema(schema);
        let mut c = compiler.compile(&spec).expect("compiles");
        assert_eq!(follow(&mut c, &compiler, r#"{"n": 12, "tag": "b"}"#), Advance::Complete);
        assert_eq!(c.mask().expect("mask").count(), 3, "only the end-of-sequence ids after the object");
        // The layout is fixed: no space after '{', one after ':'.
        let mut c = compiler.compile(&spec).expect("cached");
        assert_eq!(compiler.cached(), 1);
        let mask = c.mask().expect("mask");
        let trie = compiler.vocabulary().env().tok_trie();
        assert!(mask.is_allowed(trie.token_id(b"{").expect("{")));
        assert!(!mask.is_allowed(trie.token_id(b" ").expect("space")));
        assert!(!mask.is_allowed(488), "no end of sequence before the document");
        let mut scores = vec![1.0; 512];
        mask.apply(&mut scores);
        assert_eq!(scores.iter().filter(|s| s.is_finite()).count(), mask.count());
    }

    #[test]
    fn bad_grammars_are_refused_with_a_reason() {
        let compiler = compiler();
        let e = compiler.compile(&GrammarSpec::json_schema("{not json")).expect_err("not JSON");
        assert!(e.to_string().contains("not JSON"), "{e}");
        let e = compiler.compile(&GrammarSpec::json_schema(r#"{"type": "wat"}"#)).expect_err("bad type");
        assert!(matches!(e, GrammarError::Invalid(_)), "{e:?}");
        let e = compiler
            .compile(&GrammarSpec::json_schema(r#"{"type": "array", "uniqueItems": true}"#))
            .expect_err("unsupported");
        assert!(e.to_string().contains("uniqueItems"), "the message names the feature: {e}");
        let e = compiler.compile(&GrammarSpec::lark("start: (")).expect_err("bad lark");
        assert!(matches!(e, GrammarError::Invalid(_)), "{e:?}");
        assert_eq!(compiler.cached(), 0, "failures are not cached");
    }

    #[test]
    fn lark_with_embedded_json() {
        let compiler = compiler();
        let params = crate::json_schema_for_lark(serde_json::json!({"type": "object", "properties": {"x": {"type": "boolean"}}, "required": ["x"], "additionalProperties": false})).expect("schema");
        let grammar = format!(
            "start: \"{{\\\"name\\\": \\\"f\\\", \\\"parameters\\\": \" params \"}}\"\nparams: %json {params}\n"
        );
        let mut c = compiler.compile(&GrammarSpec::lark(grammar)).expect("compiles");
        assert_eq!(follow(&mut c, &compiler, r#"{"name": "f", "parameters": {"x": true}}"#), Advance::Complete);
    }
}
