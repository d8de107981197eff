//! Closing a JSON document before `max_tokens` cuts it.
//!
//! A grammar guarantees that what a request writes can become a valid document, not that it becomes
//! one before the token budget runs out: a model that writes a long string value (a random-weight
//! model almost never picks `"` out of a large vocabulary) would be cut mid-document, and the client
//! that asked for JSON would get text that does not parse. So, for JSON grammars, [`JsonScan`] follows
//! the output's structure (open containers, an open string or scalar, what the syntax expects next)
//! and proposes the shortest texts that would end the document from there; the constraint checks
//! each against the grammar itself (so a schema's rules still hold) and, once the budget left is
//! close to the shortest valid one, allows only its tokens. The request then ends on a complete
//! document and still reports `finish_reason: "length"`: the answer was shortened.

/// The structure of the JSON text written so far.
#[derive(Debug, Clone, Default)]
pub(crate) struct JsonScan {
    stack: Vec<Container>,
    string: Option<OpenString>,
    /// The number or literal being written (its first bytes; enough to complete it).
    scalar: Vec<u8>,
    expect: Expect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Container {
    Object,
    Array,
}

#[derive(Debug, Clone, Copy)]
struct OpenString {
    key: bool,
    escape: Escape,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escape {
    None,
    Backslash,
    /// Hex digits still due after `\u`.
    Unicode(u8),
}

/// What the syntax expects next (outside strings and scalars).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Expect {
    /// A value: the document itself, after `:` or after `,` in an array.
    #[default]
    Value,
    /// After `{`: a key or `}`.
    KeyOrEnd,
    /// After `,` in an object.
    Key,
    /// After a key.
    Colon,
    /// After `[`: a value or `]`.
    ValueOrEnd,
    /// After a value inside a container.
    CommaOrEnd,
    /// The document is complete.
    Done,
}

/// Values that fill a slot where the syntax needs one, shortest first.
const FILLERS: [&str; 6] = ["0", "\"\"", "null", "false", "{}", "[]"];
/// Separators between a key and its value (grammars fix the layout one way or the other).
const COLONS: [&str; 2] = [": ", ":"];
const LITERALS: [&str; 3] = ["true", "false", "null"];
/// A scalar longer than this is a number whose first bytes are enough to complete it.
const SCALAR_KEPT: usize = 8;

impl JsonScan {
    pub(crate) fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.byte(b);
        }
    }

    fn byte(&mut self, b: u8) {
        if let Some(string) = &mut self.string {
            match string.escape {
                Escape::Backslash => string.escape = if b == b'u' { Escape::Unicode(4) } else { Escape::None },
                Escape::Unicode(n) => string.escape = if n > 1 { Escape::Unicode(n - 1) } else { Escape::None },
                Escape::None if b == b'\\' => string.escape = Escape::Backslash,
                Escape::None if b == b'"' => {
                    let key = string.key;
                    self.string = None;
                    if key { self.expect = Expect::Colon } else { self.after_value() }
                }
                Escape::None => {}
            }
            return;
        }
        if !self.scalar.is_empty() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'+' | b'.') {
                if self.scalar.len() < SCALAR_KEPT {
                    self.scalar.push(b);
                }
                return;
            }
            self.scalar.clear();
            self.after_value();
        }
        match b {
            b' ' | b'\n' | b'\t' | b'\r' => {}
            b'{' => {
                self.stack.push(Container::Object);
                self.expect = Expect::KeyOrEnd;
            }
            b'[' => {
                self.stack.push(Container::Array);
                self.expect = Expect::ValueOrEnd;
            }
            b'"' => {
                let key = matches!(self.expect, Expect::KeyOrEnd | Expect::Key);
                self.string = Some(OpenString { key, escape: Escape::None });
            }
            b':' => self.expect = Expect::Value,
            b',' => {
                self.expect = if self.stack.last() == Some(&Container::Object) { Expect::Key } else { Expect::Value }
            }
            b'}' | b']' => {
                self.stack.pop();
                self.after_value();
            }
            _ => self.scalar.push(b),
        }
    }

    fn after_value(&mut self) {
        self.expect = if self.stack.is_empty() { Expect::Done } else { Expect::CommaOrEnd };
    }

    /// Texts that end the document from here, in the order they are worth trying. Empty when the
    /// document is complete. The caller checks each against the grammar.
    pub(crate) fn closers(&self) -> Vec<Vec<u8>> {
        let mut head = Vec::new();
        let mut expect = self.expect;
        if let Some(string) = self.string {
            match string.escape {
                Escape::Backslash => head.push(b'n'),
                Escape::Unicode(n) => head.extend(std::iter::repeat_n(b'0', n as usize)),
                Escape::None => {}
            }
            head.push(b'"');
            expect = if string.key { Expect::Colon } else { Expect::CommaOrEnd };
        } else if !self.scalar.is_empty() {
            match LITERALS.iter().find(|l| l.as_bytes().starts_with(&self.scalar)) {
                Some(literal) => head.extend_from_slice(&literal.as_bytes()[self.scalar.len()..]),
                None if matches!(self.scalar.last(), Some(b'-' | b'+' | b'.' | b'e' | b'E')) => head.push(b'0'),
                None => {}
            }
            expect = Expect::CommaOrEnd;
        }
        if expect == Expect::Done || (expect == Expect::CommaOrEnd && self.stack.is_empty()) {
            return if head.is_empty() { Vec::new() } else { vec![head] };
        }
        let tail: Vec<u8> = self
            .stack
            .iter()
            .rev()
            .map(|c| match c {
                Container::Object => b'}',
                Container::Array => b']',
            })
            .collect();
        let middles: Vec<String> = match expect {
            Expect::KeyOrEnd | Expect::ValueOrEnd | Expect::CommaOrEnd | Expect::Done => vec![String::new()],
            Expect::Value => FILLERS.iter().map(|f| f.to_string()).collect(),
            Expect::Colon => COLONS.iter().flat_map(|c| FILLERS.iter().map(move |f| format!("{c}{f}"))).collect(),
            Expect::Key => COLONS.iter().flat_map(|c| FILLERS.iter().map(move |f| format!("\"\"{c}{f}"))).collect(),
        };
        middles.into_iter().map(|middle| [head.as_slice(), middle.as_bytes(), tail.as_slice()].concat()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closers(text: &str) -> Vec<String> {
        let mut scan = JsonScan::default();
        scan.feed(text.as_bytes());
        scan.closers().into_iter().map(|c| String::from_utf8(c).expect("utf-8")).collect()
    }

    /// Every closer, appended to the text, parses as JSON; the first is the one expected.
    fn check(text: &str, first: &str) {
        let all = closers(text);
        assert_eq!(all.first().map(String::as_str), Some(first), "{text}");
        for closer in all {
            let whole = format!("{text}{closer}");
            serde_json::from_str::<serde_json::Value>(&whole).unwrap_or_else(|e| panic!("{whole}: {e}"));
        }
    }

    #[test]
    fn closes_from_every_kind_of_position() {
        check("", "0");
        check("{", "}");
        check(r#"{"a"#, r#"": 0}"#);
        check(r#"{"a""#, ": 0}");
        check(r#"{"a": "x\"#, r#"n"}"#);
        check(r#"{"a": "\u12"#, r#"00"}"#);
        check(r#"{"a": [1, {"b": tr"#, "ue}]}");
        check(r#"{"a": -"#, "0}");
        check(r#"{"a": 12.5e"#, "0}");
        check(r#"{"a": 12"#, "}");
        check(r#"{"a": [1,"#, "0]}");
        check(r#"{"a": 1, "#, r#""": 0}"#);
        check(r#"{"a": {"b": []}"#, "}");
        check(r#"{"s": "a } ] \" [ {"#, r#""}"#);
        assert!(closers(r#"{"a": 1}"#).is_empty(), "a complete document needs nothing");
    }
}
