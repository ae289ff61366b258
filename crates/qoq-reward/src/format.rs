//! The graded JSON-bbox format score, `medical.py::evaluate_bbox_format` (spec §8.4), and the
//! `parse_json` fence stripping it uses.

use crate::pyvalue::{JsonError, LiteralError, PyValue, json_loads, literal_eval};
use crate::text::finders::{FENCE, FENCE_JSON};
use crate::text::{py_is_space, py_splitlines, py_strip};
use std::borrow::Cow;

/// `parse_json`: the text after the first line that is exactly "```json" or strips to "```",
/// cut at the next "```"; the whole text when there is no such line.
pub fn parse_json_block(text: &str) -> Cow<'_, str> {
    let bytes = text.as_bytes();
    // only a line holding "```" can match: skip the line split when there is none
    let Some(first) = FENCE.find(bytes) else {
        return Cow::Borrowed(text);
    };
    let has_exotic = |b: &[u8]| {
        memchr::memchr3(b'\r', 0x0b, 0x0c, b).is_some()
            || memchr::memchr3(0x1c, 0x1d, 0x1e, b).is_some()
            || memchr::memchr2(0xc2, 0xe2, b).is_some()
    };
    // Only lines holding a fence can match. With '\n' as the only line break around them (a
    // break elsewhere in the text changes no such line) they are found between '\n's; any other
    // break nearby falls back to the full Python line split.
    let mut at = first;
    loop {
        let start = memchr::memrchr(b'\n', &bytes[..at]).map_or(0, |k| k + 1);
        let end = memchr::memchr(b'\n', &bytes[at..]).map_or(bytes.len(), |k| at + k);
        if has_exotic(&bytes[start..end]) {
            return parse_json_block_slow(text);
        }
        let line = &text[start..end];
        if line == "```json" || py_strip(line) == "```" {
            let rest = text.get(end + 1..).unwrap_or("");
            // the joined remainder is cut at its first fence: only that part must be plain
            let cut = FENCE.find(rest.as_bytes()).unwrap_or(rest.len());
            if has_exotic(&rest.as_bytes()[..cut]) {
                return parse_json_block_slow(text);
            }
            let joined = rest.strip_suffix('\n').unwrap_or(rest);
            return Cow::Borrowed(match FENCE.find(joined.as_bytes()) {
                Some(k) => &joined[..k],
                None => joined,
            });
        }
        match FENCE.find(bytes.get(end + 1..).unwrap_or(&[])) {
            Some(k) => at = end + 1 + k,
            None => return Cow::Borrowed(text),
        }
    }
}

/// [`parse_json_block`] for texts with line breaks other than '\n'.
fn parse_json_block_slow(text: &str) -> Cow<'_, str> {
    let mut lines = PyLines { s: text, pos: 0 };
    while let Some((line, next)) = lines.next_line() {
        if line == "```json" || py_strip(line) == "```" {
            let rest = &text[next..];
            let joined = py_splitlines(rest).join("\n");
            return Cow::Owned(match FENCE.find(joined.as_bytes()) {
                Some(k) => joined[..k].to_string(),
                None => joined,
            });
        }
    }
    Cow::Borrowed(text)
}

/// Bytes that can start a line break other than '\n' (`\r`, `\v`, `\f`, U+001C..U+001E, and
/// the lead bytes of U+0085, U+2028, U+2029).
fn is_exotic_break_byte(b: u8) -> bool {
    matches!(b, b'\r' | 0x0b | 0x0c | 0x1c..=0x1e | 0xc2 | 0xe2)
}

/// Python `str.splitlines()` as an iterator of `(line, index after its break)`.
struct PyLines<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> PyLines<'a> {
    fn next_line(&mut self) -> Option<(&'a str, usize)> {
        if self.pos >= self.s.len() {
            return None;
        }
        let rest = &self.s[self.pos..];
        let bytes = rest.as_bytes();
        let mut k = 0;
        while k < bytes.len() {
            let b = bytes[k];
            if b == b'\n' || is_exotic_break_byte(b) {
                let c = rest[k..].chars().next().unwrap_or('\0');
                let len = match c {
                    '\r' if bytes.get(k + 1) == Some(&b'\n') => 2,
                    '\n' | '\r' | '\u{0b}' | '\u{0c}' | '\u{1c}' | '\u{1d}' | '\u{1e}'
                    | '\u{85}' | '\u{2028}' | '\u{2029}' => c.len_utf8(),
                    _ => 0,
                };
                if len > 0 {
                    let line = &rest[..k];
                    self.pos += k + len;
                    return Some((line, self.pos));
                }
            }
            k += 1;
        }
        self.pos = self.s.len();
        Some((rest, self.pos))
    }
}

/// Whether one list item is `{"bbox_2d": [4 numbers], "label": ...}` (bools count as numbers,
/// as Python's `isinstance(True, int)`).
fn valid_item(item: &PyValue) -> bool {
    if !matches!(item, PyValue::Dict(_)) || !item.dict_has("label") {
        return false;
    }
    match item.dict_get_str("bbox_2d") {
        Some(PyValue::List(coords)) => {
            coords.len() == 4
                && coords
                    .iter()
                    .all(|c| matches!(c, PyValue::Int(_) | PyValue::Float(_) | PyValue::Bool(_)))
        }
        _ => false,
    }
}

/// The format score in [0, 1]: 0.2 for a fence, 0.1 more for "```json", 0.2 for JSON that
/// parses (0.1 when only the quote-swapped `ast.literal_eval` fallback parses), 0.1 for a list,
/// up to 0.4 for the share of valid `{"bbox_2d", "label"}` items. The additions happen in the
/// reference's order so the floating-point sum is identical.
pub fn format_score(text: &str) -> f64 {
    format_score_cached(text).0
}

/// What the format score parsed, handed to the IoU's extraction, which usually parses the same
/// block again.
#[derive(Debug, Default)]
pub struct ParseMemo<'a> {
    /// `json.loads` of a block, keyed by the block without JSON's own end whitespace
    /// (`json.loads(s)` equals `json.loads(s.trim_matches([' ', '\t', '\n', '\r']))`).
    json: Option<(Cow<'a, str>, Result<PyValue, JsonError>)>,
    /// `ast.literal_eval` of a quote-swapped block, keyed by that exact string.
    literal: Option<(String, Result<PyValue, LiteralError>)>,
}

impl ParseMemo<'_> {
    /// `json.loads(s)`, reusing the memo when it holds `s`'s result.
    pub fn json_loads(&mut self, s: &str) -> Result<PyValue, JsonError> {
        match self.json.take_if(|(k, _)| k == s) {
            Some((_, r)) => r,
            None => json_loads(s),
        }
    }

    /// `ast.literal_eval(s)` for an `s` without trailing whitespace, reusing the memo when it
    /// holds `s` or `s + "\n"` (one trailing newline after a non-blank last line changes
    /// nothing for CPython's tokenizer).
    pub fn literal_eval(&mut self, s: &str) -> Result<PyValue, LiteralError> {
        let hit = |k: &String| k == s || k.strip_suffix('\n') == Some(s);
        if s.ends_with(py_is_space) {
            return literal_eval(s);
        }
        match self.literal.take_if(|(k, _)| hit(k)) {
            Some((_, r)) => r,
            None => literal_eval(s),
        }
    }
}

/// [`format_score`], also returning what it parsed for reuse by the IoU's extraction.
pub fn format_score_cached(text: &str) -> (f64, ParseMemo<'_>) {
    let mut memo = ParseMemo::default();
    let mut s = 0.0;
    if let Some(k) = FENCE.find(text.as_bytes()) {
        s += 0.2;
        if FENCE_JSON.find(&text.as_bytes()[k..]).is_some() {
            s += 0.1;
        }
    }
    let js = parse_json_block(text);
    if js.is_empty() {
        return (s, memo);
    }
    let loaded = json_loads(&js);
    let key = match &js {
        Cow::Borrowed(b) => Cow::Borrowed(b.trim_matches([' ', '\t', '\n', '\r'])),
        Cow::Owned(o) => Cow::Owned(o.trim_matches([' ', '\t', '\n', '\r']).to_string()),
    };
    let parsed = match loaded {
        Ok(v) => {
            s += 0.2;
            memo.json = Some((key, Ok(v)));
            match &memo.json {
                Some((_, Ok(v))) => v,
                _ => return (s, memo),
            }
        }
        Err(e @ JsonError::Other) => {
            memo.json = Some((key, Err(e)));
            return (s, memo);
        }
        Err(e @ JsonError::Decode) => {
            memo.json = Some((key, Err(e)));
            let swapped = js.replace('\'', "\"");
            let lit = literal_eval(&swapped);
            let ok = lit.is_ok();
            memo.literal = Some((swapped, lit));
            if !ok {
                return (s, memo);
            }
            s += 0.1;
            match &memo.literal {
                Some((_, Ok(v))) => v,
                _ => return (s, memo),
            }
        }
    };
    if let PyValue::List(items) = parsed {
        s += 0.1;
        let valid = items.iter().filter(|it| valid_item(it)).count();
        if !items.is_empty() {
            s += 0.4 * (valid as f64 / items.len() as f64);
        }
    }
    (s, memo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_format_scores() {
        let a = "<think>The heart is enlarged.</think>\n```json\n[{\"bbox_2d\": [10, 10, 29, 29], \"label\": \"Cardiomegaly\"}]\n```\nFinal: \\boxed{Cardiomegaly}";
        assert_eq!(format_score(a), 1.0);
        let e = "```json\n[{'bbox_2d': [0, 0, 9, 9], 'label': 'x'}]\n```\\boxed{No Finding}";
        assert!((format_score(e) - 0.9).abs() < 1e-15);
        assert_eq!(format_score("I think it is Pneumonia."), 0.0);
        assert_eq!(format_score("\\boxed{Edema, Pneumonia and Fracture}"), 0.0);
    }

    #[test]
    fn fence_stripping_follows_parse_json() {
        assert_eq!(parse_json_block("a\n```json\n[1]\n```\nb"), "[1]\n");
        assert_eq!(parse_json_block("a\n  ```  \nx"), "x");
        assert_eq!(parse_json_block("no fence"), "no fence");
    }
}
