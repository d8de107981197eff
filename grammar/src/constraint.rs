//! One request's grammar as it follows the output: the mask of tokens allowed next, and the state
//! after each sampled token.

use llguidance::Matcher;
use toktrie::{SimpleVob, TokEnv, TokenId};

use crate::closing::JsonScan;
use crate::errors::GrammarError;
use crate::spec::GrammarKind;

/// Budgets (tokens the request may still write) at or under which a JSON document is checked for
/// how it would close; above, [`TokenConstraint::mask_within`] is [`TokenConstraint::mask`].
pub const CLOSING_WINDOW: usize = 64;
/// Tokens kept in hand when closing starts: one free token can open a string and a container at once,
/// lengthening the shortest close by a few tokens.
const CLOSING_SLACK: usize = 8;
/// Candidate endings checked against the grammar per token, shortest first.
const CLOSING_CHECKS: usize = 6;

/// The grammar state of one request. Moved to a mask thread and back every step, so it is `Send`;
/// the parser state (over 1.5 KB) and the rest are boxed so that moving it is moving two pointers.
pub struct TokenConstraint {
    matcher: Box<Matcher>,
    state: Box<State>,
}

#[derive(Clone)]
struct State {
    kind: GrammarKind,
    env: TokEnv,
    /// The output's JSON structure (JSON schemas only: a lark grammar's output need not be JSON).
    scan: JsonScan,
    /// The budget ran short and the document is being closed (the request ends shortened).
    closing: bool,
}

impl std::fmt::Debug for TokenConstraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenConstraint")
            .field("kind", &self.state.kind)
            .field("stopped", &self.matcher.is_stopped())
            .field("closing", &self.state.closing)
            .finish()
    }
}

/// A copy at the same point of the output, following it independently from then on.
impl Clone for TokenConstraint {
    fn clone(&self) -> Self {
        TokenConstraint { matcher: Box::new(self.matcher.deep_clone()), state: self.state.clone() }
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

    /// A mask that allows `token` alone, over as many ids as `self`.
    fn only(&self, token: TokenId) -> TokenMask {
        let mut allowed = SimpleVob::alloc(self.allowed.len());
        allowed.allow_token(token);
        TokenMask { allowed }
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
    pub(crate) fn new(matcher: Matcher, kind: GrammarKind, env: TokEnv) -> Self {
        let state = State { kind, env, scan: JsonScan::default(), closing: false };
        TokenConstraint { matcher: Box::new(matcher), state: Box::new(state) }
    }

    pub fn kind(&self) -> GrammarKind {
        self.state.kind
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

    /// [`Self::mask`] for a request that may write `budget` more tokens, this one included. When a
    /// JSON document would not fit, the mask allows only the next token of the shortest text that
    /// ends it and that the grammar accepts (see `closing.rs`); from then on the request is
    /// [closing](Self::closed_for_budget). Where no such text exists (a schema still requires a
    /// property, an enum's string is half written) the mask is the grammar's, and the budget may cut
    /// the document.
    pub fn mask_within(&mut self, budget: usize) -> Result<TokenMask, GrammarError> {
        let mask = self.mask()?;
        if self.state.kind != GrammarKind::JsonSchema || budget > CLOSING_WINDOW || self.matcher.is_stopped() {
            return Ok(mask);
        }
        // Candidates first by length alone (cheap); the grammar checks them (a parser copy each) only
        // once the shortest could be near the budget, the only time the answer matters.
        let trie = self.state.env.tok_trie();
        let mut candidates: Vec<Vec<TokenId>> = self
            .state
            .scan
            .closers()
            .iter()
            .map(|text| trie.greedy_tokenize(text))
            .filter(|tokens| !tokens.is_empty())
            .collect();
        candidates.sort_by_key(Vec::len);
        let near = candidates.first().is_some_and(|c| self.state.closing || c.len() + CLOSING_SLACK >= budget);
        if !near {
            return Ok(mask);
        }
        // The shortest few only: the fillers of one length differ in what the grammar accepts, and
        // each check costs a parse of the candidate.
        let path = candidates
            .into_iter()
            .take(CLOSING_CHECKS)
            .find(|tokens| mask.is_allowed(tokens[0]) && self.accepts_after(tokens));
        match path {
            Some(path) if self.state.closing || path.len() + CLOSING_SLACK >= budget => {
                self.state.closing = true;
                Ok(mask.only(path[0]))
            }
            _ => Ok(mask),
        }
    }

    /// Whether the budget ran short and the document was closed early: the request ended shortened,
    /// its `finish_reason` is `length` even though the grammar is complete.
    pub fn closed_for_budget(&self) -> bool {
        self.state.closing
    }

    /// Whether the grammar accepts after `tokens`: the parser validates them followed by an
    /// end-of-sequence id (allowed only in an accepting state) without moving, and without a copy.
    fn accepts_after(&mut self, tokens: &[TokenId]) -> bool {
        let probe: Vec<TokenId> = tokens.iter().copied().chain([self.state.env.tok_trie().eos_token()]).collect();
        matches!(self.matcher.validate_tokens(&probe), Ok(n) if n == probe.len())
    }

    /// Follows a sampled token that the last mask allowed (not an end-of-sequence id: the request
    /// ends on those without the grammar's help).
    pub fn advance(&mut self, token: u32) -> Result<Advance, GrammarError> {
        self.matcher.consume_token(token).map_err(|e| GrammarError::Failed(format!("{e:#}")))?;
        if self.state.kind == GrammarKind::JsonSchema {
            self.state.scan.feed(self.state.env.tok_trie().token(token));
        }
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

    /// Walks `spec` with uniformly random allowed tokens (a random model's behaviour under a grammar)
    /// for at most `budget` tokens, asking for masks within what is left. Returns the text, whether
    /// the grammar completed, and whether it was closed for the budget.
    fn random_walk(compiler: &GrammarCompiler, spec: &GrammarSpec, budget: usize, seed: u64) -> (String, bool, bool) {
        let trie = compiler.vocabulary().env().tok_trie();
        let mut c = compiler.compile(spec).expect("compiles");
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let mut text = Vec::new();
        for used in 0..budget {
            let mask = c.mask_within(budget - used).expect("mask");
            let allowed: Vec<u32> = (0..512).filter(|&t| mask.is_allowed(t) && ![481, 487, 488].contains(&t)).collect();
            if allowed.is_empty() {
                break;
            }
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let token = allowed[(state >> 33) as usize % allowed.len()];
            text.extend_from_slice(trie.token(token));
            if c.advance(token).expect("advance") == Advance::Complete {
                return (String::from_utf8_lossy(&text).into_owned(), true, c.closed_for_budget());
            }
        }
        (String::from_utf8_lossy(&text).into_owned(), false, c.closed_for_budget())
    }

    #[test]
    fn a_json_document_closes_within_its_budget() {
        let compiler = compiler();
        let spec = GrammarSpec::json_schema(r#"{"type": "object"}"#);
        let mut closed = 0;
        for seed in 0..40 {
            let (text, complete, shortened) = random_walk(&compiler, &spec, 80, seed);
            assert!(complete, "seed {seed}: the budget cut the document: {text:?}");
            let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert!(value.is_object(), "{text}");
            closed += usize::from(shortened);
        }
        assert!(closed > 0, "random walks never needed closing: the test does not test it");
        // Far from the budget the mask is the grammar's own.
        let mut c = compiler.compile(&spec).expect("compiles");
        assert_eq!(c.mask_within(CLOSING_WINDOW + 1).expect("mask").count(), c.mask().expect("mask").count());
    }

    #[test]
    fn closing_keeps_to_the_schema() {
        let compiler = compiler();
        let schema = r#"{"type": "object", "properties": {"n": {"type": "integer"}, "tags": {"type": "array",
                         "items": {"type": "string"}}}, "required": ["n"], "additionalProperties": false}"#;
        let spec = GrammarSpec::json_schema(schema);
        let mut shortened = 0;
        for seed in 0..40 {
            let (text, complete, closed) = random_walk(&compiler, &spec, 60, seed);
            if complete {
                let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
                assert!(value["n"].as_f64().is_some_and(|n| n.fract() == 0.0), "{text}");
                let keys: Vec<&String> = value.as_object().expect("object").keys().collect();
                assert!(keys.iter().all(|k| *k == "n" || *k == "tags"), "{text}");
            }
            shortened += usize::from(closed && complete);
        }
        assert!(shortened > 0, "no walk was closed for its budget");
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
