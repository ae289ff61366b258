//! Answer parsing for the metrics: which condition set a response predicts and which one the gold
//! answer names (spec §8.9, `evaluation.py::extract_boxed_content` and `parse_conditions`).
//!
//! The validation metrics use their **own** extractor, not the reward's: the *first*
//! `\boxed{...}` without nesting, else the first `[...]` on one line, else the whole text. It
//! never fails; an extracted answer equal to the 4-character string `None` predicts nothing.
//! Both the prediction and the gold answer are split into conditions by the reward's
//! `parse_conditions` (spec §8.2), which this crate takes from `qoq-reward`.

use regex::Regex;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::sync::LazyLock;

/// How the predicted answer is taken out of a response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Extraction {
    /// The validation metrics' extractor (spec §8.9): first non-nested `\boxed{..}`, else the
    /// first one-line `[..]`, else the whole text. What the reference's logged metrics use.
    #[default]
    Evaluation,
    /// The reward's extractor (spec §8.1, MathRuler's `extract_boxed_content`): the *last*
    /// `\boxed{..}` with nested braces; no box predicts nothing.
    Reward,
}

static BOXED: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\\boxed\{([^}]*)\}").expect("valid regex"));
static BRACKETED: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\[(.*?)\]").expect("valid regex"));

/// `evaluation.py::extract_boxed_content`: the content of the first `\boxed{...}` (no nested
/// braces: it stops at the first `}`), else of the first `[...]` that does not span a newline,
/// else the whole text.
pub fn extract_answer(text: &str) -> &str {
    if let Some(c) = BOXED.captures(text) {
        return c.get(1).map_or("", |m| m.as_str());
    }
    if let Some(c) = BRACKETED.captures(text) {
        return c.get(1).map_or("", |m| m.as_str());
    }
    text
}

/// The reference's answer-absent sentinel: an extracted answer equal to it predicts no condition.
pub const NONE_ANSWER: &str = "None";

/// The set of conditions a response predicts under `extraction` (empty when the extracted answer
/// is `None`, or, for [`Extraction::Reward`], when there is no box).
pub fn predicted_conditions(response: &str, extraction: Extraction) -> BTreeSet<String> {
    let answer = match extraction {
        Extraction::Evaluation => Some(extract_answer(response).to_string()),
        Extraction::Reward => qoq_reward::extract_boxed(response),
    };
    match answer {
        Some(a) if a != NONE_ANSWER => conditions(&a),
        _ => BTreeSet::new(),
    }
}

/// The set of conditions of a gold answer (no extraction: the answer is parsed as is, so a gold
/// answer `None` is the class `"None"`).
pub fn gold_conditions(answer: &str) -> BTreeSet<String> {
    conditions(answer)
}

/// `parse_conditions` as a set (the reference returns a Python set).
fn conditions(text: &str) -> BTreeSet<String> {
    qoq_reward::parse_conditions(text).into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn evaluation_extractor_takes_the_first_box_without_nesting() {
        assert_eq!(extract_answer(r"\boxed{A} then \boxed{B}"), "A");
        assert_eq!(extract_answer(r"\boxed{a{b}c}"), "a{b");
        assert_eq!(extract_answer(r"\boxed{}"), "");
        assert_eq!(extract_answer("\\boxed{x\ny}"), "x\ny");
    }

    #[test]
    fn evaluation_extractor_falls_back_to_brackets_then_to_the_text() {
        assert_eq!(
            extract_answer(r"box [1, 2, 3, 4] \boxed{unclosed"),
            "1, 2, 3, 4"
        );
        assert_eq!(extract_answer("[a\nb] [c]"), "c");
        assert_eq!(extract_answer("[]"), "");
        assert_eq!(extract_answer("just text"), "just text");
        assert_eq!(extract_answer(r"\boxed{open and ]["), r"\boxed{open and ][");
    }

    #[test]
    fn none_predicts_nothing_but_a_gold_none_is_a_class() {
        assert!(predicted_conditions(r"\boxed{None}", Extraction::Evaluation).is_empty());
        assert!(predicted_conditions("None", Extraction::Evaluation).is_empty());
        assert_eq!(
            predicted_conditions(" None", Extraction::Evaluation),
            set(&["None"])
        );
        assert_eq!(gold_conditions("None"), set(&["None"]));
    }

    #[test]
    fn conditions_use_the_first_separator_present() {
        assert_eq!(
            predicted_conditions(
                r"\boxed{Edema, Pneumonia and Fracture}",
                Extraction::Evaluation
            ),
            set(&["Edema", "Pneumonia and Fracture"])
        );
        assert_eq!(gold_conditions("A & B"), set(&["A", "B"]));
        assert_eq!(gold_conditions("A,A"), set(&["A"]));
    }

    #[test]
    fn reward_extraction_takes_the_last_nested_box() {
        let r = r"\boxed{A} and later \boxed{B, {C}}";
        assert_eq!(predicted_conditions(r, Extraction::Evaluation), set(&["A"]));
        assert_eq!(
            predicted_conditions(r, Extraction::Reward),
            set(&["B", "{C"])
        );
        assert!(predicted_conditions("no box", Extraction::Reward).is_empty());
    }
}
