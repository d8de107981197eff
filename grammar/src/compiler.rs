//! Compiling grammars once per distinct text. Compiling a JSON schema into llguidance's parser costs
//! from a fraction of a millisecond to tens of milliseconds; a service sees the same few schemas
//! (one per application, one per tool set) over and over, so the compiled parser is kept and every
//! request starts from a deep copy of it.

use std::collections::{HashMap, VecDeque};

use llguidance::{Matcher, ParserFactory};
use parking_lot::Mutex;

use crate::constraint::TokenConstraint;
use crate::errors::GrammarError;
use crate::spec::GrammarSpec;
use crate::vocabulary::Vocabulary;

/// Distinct grammars kept compiled; the oldest is dropped past this (a bound on memory that a
/// client sending a new schema with every request cannot push).
pub const CACHE_CAPACITY: usize = 256;

pub struct GrammarCompiler {
    factory: ParserFactory,
    vocabulary: Vocabulary,
    cache: Mutex<Cache>,
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarCompiler")
            .field("vocabulary", &self.vocabulary)
            .field("cached", &self.cache.lock().compiled.len())
            .finish()
    }
}

#[derive(Default)]
struct Cache {
    compiled: HashMap<GrammarSpec, Matcher>,
    /// Insertion order, oldest first.
    order: VecDeque<GrammarSpec>,
}

impl GrammarCompiler {
    pub fn new(vocabulary: Vocabulary) -> Result<Self, GrammarError> {
        let mut factory = ParserFactory::new_simple(vocabulary.env())
            .map_err(|e| GrammarError::Vocabulary { path: "tokenizer.json".into(), reason: format!("{e:#}") })?;
        // llguidance's warnings go to stderr by default; ours are the caller's errors instead.
        factory.quiet();
        Ok(GrammarCompiler { factory, vocabulary, cache: Mutex::new(Cache::default()) })
    }

    pub fn vocabulary(&self) -> &Vocabulary {
        &self.vocabulary
    }

    /// A fresh constraint for `spec`, compiled now or taken from the cache. Blocking (compiling is
    /// CPU work): call it off the async IO threads.
    pub fn compile(&self, spec: &GrammarSpec) -> Result<TokenConstraint, GrammarError> {
        if let Some(compiled) = self.cache.lock().compiled.get(spec) {
            return Ok(TokenConstraint::new(compiled.deep_clone(), spec.kind, self.vocabulary.env().clone()));
        }
        let grammar = spec.to_llguidance()?;
        let matcher = Matcher::new(self.factory.create_parser(grammar));
        if let Some(error) = matcher.get_error() {
            return Err(GrammarError::Invalid(error));
        }
        let constraint = TokenConstraint::new(matcher.deep_clone(), spec.kind, self.vocabulary.env().clone());
        let mut cache = self.cache.lock();
        if !cache.compiled.contains_key(spec) {
            if cache.order.len() >= CACHE_CAPACITY
                && let Some(oldest) = cache.order.pop_front()
            {
                cache.compiled.remove(&oldest);
            }
            cache.order.push_back(spec.clone());
            cache.compiled.insert(spec.clone(), matcher);
        }
        Ok(constraint)
    }

    /// Grammars compiled and kept.
    pub fn cached(&self) -> usize {
        self.cache.lock().compiled.len()
    }
}
