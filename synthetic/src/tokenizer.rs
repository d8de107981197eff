//! The tokenizer `gen-model` ships with a random checkpoint: byte-level BPE in the same
//! `tokenizer.json` layout as Llama 4's (learned tokens first, then the named special tokens, then
//! reserved special tokens up to the vocabulary size), with merges learned from a small embedded
//! English text so that prompts cost a realistic number of tokens.

use std::collections::HashMap;

use crate::preset::NAMED_SPECIAL_TOKENS;
use serde_json::{Value, json};

const CORPUS: &str = include_str!("../assets/corpus.txt");

/// A generated tokenizer: its `tokenizer.json` and the id of its first named special token.
#[derive(Debug)]
pub struct SyntheticTokenizer {
    pub json: Value,
    pub first_special: u32,
}

/// GPT-2's reversible byte → printable character map (`bytes_to_unicode`), which byte-level BPE
/// vocabularies are written in.
pub fn byte_to_char() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        map[b as usize] = if printable {
            char::from(b)
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap_or('?')
        };
    }
    map
}

/// Splits text roughly as GPT-2's pre-tokenizer does: an optional leading space, then a run of
/// letters, of digits, or of other non-space characters; or a run of spaces.
fn pre_tokens(text: &str) -> Vec<String> {
    #[derive(PartialEq, Clone, Copy)]
    enum Class {
        Letter,
        Digit,
        Space,
        Other,
    }
    let class = |c: char| {
        if c.is_alphabetic() {
            Class::Letter
        } else if c.is_numeric() {
            Class::Digit
        } else if c.is_whitespace() {
            Class::Space
        } else {
            Class::Other
        }
    };
    let mut out: Vec<String> = Vec::new();
    let mut current = String::new();
    let mut current_class: Option<Class> = None;
    for c in text.chars() {
        let k = class(c);
        match current_class {
            Some(prev) if prev == k => current.push(c),
            // A single space sticks to the word after it (" the").
            Some(Class::Space) if current == " " => {
                current.push(c);
                current_class = Some(k);
            }
            _ => {
                if !current.is_empty() {
                    out.push(std::mem::take(&mut current));
                }
                current.push(c);
                current_class = Some(k);
            }
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Learns up to `max_merges` byte-level BPE merges from the embedded corpus and lays out a vocabulary
/// of exactly `vocab_size` ids.
pub fn build(vocab_size: usize, max_merges: usize) -> SyntheticTokenizer {
    let chars = byte_to_char();
    let mut words: HashMap<Vec<String>, usize> = HashMap::new();
    for piece in pre_tokens(CORPUS) {
        let symbols: Vec<String> = piece.bytes().map(|b| chars[b as usize].to_string()).collect();
        *words.entry(symbols).or_default() += 1;
    }
    let mut words: Vec<(Vec<String>, usize)> = words.into_iter().collect();
    words.sort();

    let mut vocab: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
    let learned_budget = vocab_size.saturating_sub(256 + NAMED_SPECIAL_TOKENS.len()).min(max_merges);
    let mut merges: Vec<(String, String)> = Vec::new();
    while merges.len() < learned_budget {
        let mut counts: HashMap<(&str, &str), usize> = HashMap::new();
        for (symbols, n) in &words {
            for pair in symbols.windows(2) {
                *counts.entry((pair[0].as_str(), pair[1].as_str())).or_default() += n;
            }
        }
        // Most frequent pair; ties broken lexicographically so the result is deterministic.
        // Pairs seen once are merged too, so that whole corpus words become tokens.
        let Some(((a, b), _)) = counts.into_iter().max_by(|x, y| x.1.cmp(&y.1).then(y.0.cmp(&x.0))) else { break };
        let (a, b) = (a.to_owned(), b.to_owned());
        let merged = format!("{a}{b}");
        for (symbols, _) in &mut words {
            let mut i = 0;
            while i + 1 < symbols.len() {
                if symbols[i] == a && symbols[i + 1] == b {
                    symbols[i] = merged.clone();
                    symbols.remove(i + 1);
                }
                i += 1;
            }
        }
        vocab.push(merged);
        merges.push((a, b));
    }

    let first_special = vocab.len() as u32;
    let mut added = Vec::new();
    let mut specials: Vec<String> = NAMED_SPECIAL_TOKENS.iter().map(|s| (*s).to_owned()).collect();
    let reserved = vocab_size - vocab.len() - specials.len();
    specials.extend((0..reserved).map(|i| format!("<|reserved_special_token_{i}|>")));
    for (i, content) in specials.iter().enumerate() {
        added.push(json!({
            "id": first_special as usize + i, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }));
    }
    let vocab_map: serde_json::Map<String, Value> =
        vocab.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    let bos = NAMED_SPECIAL_TOKENS[0];
    let json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": { "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true },
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{ "SpecialToken": { "id": bos, "type_id": 0 } }, { "Sequence": { "id": "A", "type_id": 0 } }],
            "pair": [
                { "SpecialToken": { "id": bos, "type_id": 0 } },
                { "Sequence": { "id": "A", "type_id": 0 } },
                { "Sequence": { "id": "B", "type_id": 0 } }
            ],
            "special_tokens": { bos: { "id": bos, "ids": [first_special], "tokens": [bos] } }
        },
        "decoder": { "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true },
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab_map,
            "merges": merges.iter().map(|(a, b)| json!([a, b])).collect::<Vec<_>>()
        }
    });
    SyntheticTokenizer { json, first_special }
}

/// The embedded English text as this tokenizer encodes it (byte-level BPE: each pre-token's merges
/// applied in the order they were learned), for traffic that looks like text to the model.
pub(crate) fn corpus_ids(tokenizer: &SyntheticTokenizer) -> Vec<u32> {
    let chars = byte_to_char();
    let model = &tokenizer.json["model"];
    let vocab: HashMap<&str, u32> = model["vocab"]
        .as_object()
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.as_str(), u32::try_from(v.as_u64()?).ok()?))).collect())
        .unwrap_or_default();
    let ranks: HashMap<(&str, &str), usize> = model["merges"]
        .as_array()
        .map(|m| m.iter().enumerate().filter_map(|(i, p)| Some(((p[0].as_str()?, p[1].as_str()?), i))).collect())
        .unwrap_or_default();
    let mut ids = Vec::new();
    for piece in pre_tokens(CORPUS) {
        let mut symbols: Vec<String> = piece.bytes().map(|b| chars[b as usize].to_string()).collect();
        loop {
            let best = symbols
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| ranks.get(&(w[0].as_str(), w[1].as_str())).map(|&r| (r, i)))
                .min();
            let Some((_, i)) = best else { break };
            let merged = format!("{}{}", symbols[i], symbols[i + 1]);
            symbols[i] = merged;
            symbols.remove(i + 1);
        }
        ids.extend(symbols.iter().filter_map(|s| vocab.get(s.as_str()).copied()));
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_round_trips_and_has_llama4_specials() {
        let t = build(4096, 1500);
        let tok = tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&t.json).expect("json")).expect("loads");
        assert_eq!(tok.get_vocab_size(true), 4096);
        assert_eq!(tok.token_to_id("<|begin_of_text|>"), Some(t.first_special));
        assert_eq!(tok.token_to_id("<|eot|>"), Some(t.first_special + 8));
        let text = "The experts compute the rows — naïve café, 42 tokens!";
        let enc = tok.encode(text, true).expect("encode");
        assert_eq!(enc.get_ids()[0], t.first_special, "BOS first");
        assert!(enc.get_ids().len() < text.len(), "merges shorten common text");
        assert_eq!(tok.decode(enc.get_ids(), true).expect("decode"), text);
        let tiny = build(512, 224);
        assert_eq!(tiny.first_special, 480, "tiny lays out ids like the fixture");
    }

    #[test]
    fn corpus_ids_are_what_the_tokenizer_encodes() {
        for (vocab, merges) in [(4096, 1500), (512, 224)] {
            let t = build(vocab, merges);
            let tok = tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&t.json).expect("json")).expect("loads");
            let expected = tok.encode(CORPUS, false).expect("encode").get_ids().to_vec();
            assert_eq!(corpus_ids(&t), expected);
        }
    }
}
