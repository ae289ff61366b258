//! Text parsing of the reference reward: `mathruler.grader.extract_boxed_content` (spec §8.1),
//! `medical.py::parse_conditions` (§8.2), the set F1 (§8.3) and Python's `str.strip` /
//! `str.splitlines` semantics that these depend on.

use std::collections::BTreeSet;

/// Python's `str.isspace` (Unicode White_Space plus the ASCII separators U+001C..U+001F).
pub fn py_is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.strip()` with no argument.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(py_is_space)
}

/// Python's `str.splitlines()` (no `keepends`): splits on `\n`, `\r`, `\r\n`, `\v`, `\f`,
/// U+001C..U+001E, U+0085, U+2028, U+2029; a trailing line break adds no empty line.
pub fn py_splitlines(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut it = s.char_indices().peekable();
    while let Some((i, c)) = it.next() {
        let is_break = matches!(
            c,
            '\n' | '\r'
                | '\u{0b}'
                | '\u{0c}'
                | '\u{1c}'
                | '\u{1d}'
                | '\u{1e}'
                | '\u{85}'
                | '\u{2028}'
                | '\u{2029}'
        );
        if is_break {
            out.push(&s[start..i]);
            let mut end = i + c.len_utf8();
            if c == '\r' && matches!(it.peek(), Some(&(_, '\n'))) {
                it.next();
                end += 1;
            }
            start = end;
        }
    }
    if start < s.len() {
        out.push(&s[start..]);
    }
    out
}

const BOXED: &str = "\\boxed{";

/// Prebuilt substring finders (building a searcher per call costs more than the search).
pub(crate) mod finders {
    use memchr::memmem::Finder;
    use std::sync::LazyLock;

    /// "```".
    pub static FENCE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"```"));
    /// "```json".
    pub static FENCE_JSON: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"```json"));
}

/// The content of the **last** `\boxed{...}` with nested braces balanced, stripped, or `None`
/// when there is no `\boxed{` or it is never closed (the reference returns the string `"None"`
/// then). Same rule as `mathruler.grader.extract_boxed_content` (spec §8.1).
pub fn extract_boxed(text: &str) -> Option<String> {
    extract_boxed_str(text).map(str::to_string)
}

/// Borrowing form of [`extract_boxed`].
pub fn extract_boxed_str(text: &str) -> Option<&str> {
    // the last "\\boxed{": walk back over the (rare) '{' bytes with SIMD memrchr
    let bytes = text.as_bytes();
    let start = memchr::memrchr_iter(b'{', bytes)
        .find(|&k| k + 1 >= BOXED.len() && &bytes[k + 1 - BOXED.len()..=k] == BOXED.as_bytes())
        .map(|k| k + 1 - BOXED.len())?;
    let content = &text[start + BOXED.len()..];
    let mut depth: i64 = 0;
    for (i, b) in content.bytes().enumerate() {
        match b {
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == -1 {
                    return Some(py_strip(&content[..i]));
                }
            }
            _ => {}
        }
    }
    None
}

/// The reference's condition set (spec §8.2): every `\boxed{` and every `}` removed, then split
/// on the **first** separator present among `", "`, `" and "`, `" & "`, `","`, `"&"`, each part
/// stripped. Returned sorted and de-duplicated (the reference's `set`); empty parts are kept.
/// Example: `"A, B and C"` gives `["A", "B and C"]`.
pub fn parse_conditions(text: &str) -> Vec<String> {
    parse_condition_set(text).into_iter().collect()
}

/// [`parse_conditions`] as a set.
pub fn parse_condition_set(text: &str) -> BTreeSet<String> {
    let cleaned = text.replace(BOXED, "").replace('}', "");
    for sep in [", ", " and ", " & ", ",", "&"] {
        if cleaned.contains(sep) {
            return cleaned
                .split(sep)
                .map(|c| py_strip(c).to_string())
                .collect();
        }
    }
    BTreeSet::from([py_strip(&cleaned).to_string()])
}

/// Set F1 of predicted vs gold conditions with the reference's zero-denominator rules and
/// operation order (spec §8.3).
pub fn set_f1(pred: &BTreeSet<String>, gold: &BTreeSet<String>) -> f64 {
    let tp = pred.intersection(gold).count();
    f1_from_counts(tp, pred.len() - tp, gold.len() - tp)
}

/// The reference's `standard_score`: 0 when the extracted answer is missing (or literally
/// `"None"`), otherwise the set F1 of [`parse_conditions`] of the answer vs the ground truth.
pub fn standard_score(response: &str, ground_truth: &str) -> f64 {
    match extract_boxed_str(response) {
        None | Some("None") => 0.0,
        Some(ans) => {
            let (pc, gc) = (clean(ans), clean(ground_truth));
            let (p, g) = (condition_slices(&pc), condition_slices(&gc));
            // sorted, unique: count the intersection by merging
            let (mut i, mut j, mut tp) = (0, 0, 0);
            while i < p.len() && j < g.len() {
                match p[i].cmp(g[j]) {
                    std::cmp::Ordering::Less => i += 1,
                    std::cmp::Ordering::Greater => j += 1,
                    std::cmp::Ordering::Equal => {
                        tp += 1;
                        i += 1;
                        j += 1;
                    }
                }
            }
            f1_from_counts(tp, p.len() - tp, g.len() - tp)
        }
    }
}

/// `text.replace("\\boxed{", "").replace("}", "")`, borrowing when nothing changes.
fn clean(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('}') || text.contains(BOXED) {
        text.replace(BOXED, "").replace('}', "").into()
    } else {
        text.into()
    }
}

/// The condition set of an already cleaned text as sorted unique slices.
fn condition_slices(cleaned: &str) -> Vec<&str> {
    let mut v: Vec<&str> = match [", ", " and ", " & ", ",", "&"]
        .into_iter()
        .find(|sep| cleaned.contains(sep))
    {
        Some(sep) => cleaned.split(sep).map(py_strip).collect(),
        None => vec![py_strip(cleaned)],
    };
    v.sort_unstable();
    v.dedup();
    v
}

fn f1_from_counts(tp: usize, fp: usize, fn_: usize) -> f64 {
    let precision = if tp + fp > 0 {
        tp as f64 / (tp + fp) as f64
    } else {
        0.0
    };
    let recall = if tp + fn_ > 0 {
        tp as f64 / (tp + fn_) as f64
    } else {
        0.0
    };
    if precision + recall > 0.0 {
        2.0 * (precision * recall) / (precision + recall)
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxed_takes_the_last_and_balances_nested_braces() {
        assert_eq!(
            extract_boxed("\\boxed{a} \\boxed{ b{c}d }"),
            Some("b{c}d".into())
        );
        assert_eq!(extract_boxed("no box"), None);
        assert_eq!(extract_boxed("\\boxed{open {"), None);
        assert_eq!(extract_boxed("\\boxed{}"), Some(String::new()));
        assert_eq!(extract_boxed("\\boxed{\u{1c}x\u{a0}}"), Some("x".into()));
    }

    #[test]
    fn conditions_use_only_the_first_separator_present() {
        assert_eq!(parse_conditions("A, B and C"), vec!["A", "B and C"]);
        assert_eq!(parse_conditions("B & A & B"), vec!["A", "B"]);
        assert_eq!(parse_conditions("A,B,"), vec!["", "A", "B"]);
        assert_eq!(parse_conditions("\\boxed{X}"), vec!["X"]);
        assert_eq!(parse_conditions(" solo "), vec!["solo"]);
    }

    #[test]
    fn f1_matches_golden_cases() {
        assert!(
            (standard_score("\\boxed{Edema, Pneumonia, Fracture}", "Pneumonia, Edema") - 0.8).abs()
                < 1e-15
        );
        assert_eq!(
            standard_score("\\boxed{Edema, Pneumonia and Fracture}", "Edema, Pneumonia"),
            0.5
        );
        assert_eq!(standard_score("\\boxed{None}", "None"), 0.0);
        assert_eq!(standard_score("I think", "x"), 0.0);
    }

    #[test]
    fn splitlines_follows_python() {
        assert_eq!(py_splitlines("a\r\nb\rc\n"), vec!["a", "b", "c"]);
        assert_eq!(py_splitlines("a\n\nb\u{2028}"), vec!["a", "", "b"]);
        assert_eq!(py_splitlines(""), Vec::<&str>::new());
        assert_eq!(py_splitlines("\n"), vec![""]);
    }
}
