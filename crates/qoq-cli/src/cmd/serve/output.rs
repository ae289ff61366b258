//! One choice's text as its tokens arrive: incremental detokenisation, stop strings matched
//! across token boundaries (the text from the first match on is dropped, the finish reason is
//! `stop`), text held back while it could still be the start of a stop string or ends in an
//! incomplete UTF-8 sequence, and the OpenAI log-probability entries.

use qoq_core::FinishReason;
use qoq_engine::TokenEvent;
use qoq_processor::tokenizer::QoqTokenizer;
use serde_json::{Value, json};

/// What one token released: text, log-probability entries, and the finish reason when the
/// choice ended.
#[derive(Debug, Default)]
pub struct Delta {
    pub text: String,
    pub logprobs: Vec<Value>,
    pub finish: Option<&'static str>,
}

/// The state of one choice.
#[derive(Debug, Default)]
pub struct Choice {
    /// Tokens that count (up to the one completing a stop string).
    pub tokens: Vec<u32>,
    /// The decoded text kept so far (after a stop: up to the match).
    pub text: String,
    /// Bytes of `text` released.
    sent: usize,
    pub finish: Option<&'static str>,
}

fn entry(tok: &QoqTokenizer, id: u32, logprob: f32, as_id: bool) -> Value {
    let s = if as_id {
        format!("token_id:{id}")
    } else {
        tok.decode(&[id], false).unwrap_or_default()
    };
    json!({"token": s, "logprob": logprob, "bytes": s.as_bytes()})
}

/// The OpenAI `logprobs.content` entry of a token, with its `top_logprobs`; with `as_id`
/// (vLLM's `return_tokens_as_token_ids`) each `token` is `"token_id:<id>"`.
pub fn logprob_entry(tok: &QoqTokenizer, e: &TokenEvent, as_id: bool) -> Value {
    let mut v = entry(tok, e.token, e.logprob, as_id);
    v["top_logprobs"] = Value::Array(
        e.top_logprobs
            .iter()
            .map(|&(t, lp)| entry(tok, t, lp, as_id))
            .collect(),
    );
    v
}

/// The length of the longest suffix of `text` that is a proper prefix of a stop string.
fn held_prefix(text: &str, stops: &[String]) -> usize {
    let mut best = 0;
    for s in stops {
        for (k, _) in s.char_indices().skip(1) {
            if k > best && text.ends_with(&s[..k]) {
                best = k;
            }
        }
    }
    best
}

impl Choice {
    /// Take one token; `None` when the choice has already finished (a token sampled before
    /// the scheduler saw the stop).
    pub fn push(
        &mut self,
        tok: &QoqTokenizer,
        e: &TokenEvent,
        stops: &[String],
        logprobs: bool,
        token_ids: bool,
    ) -> Option<Delta> {
        if self.finish.is_some() {
            return None;
        }
        self.tokens.push(e.token);
        let mut d = Delta::default();
        if logprobs {
            d.logprobs.push(logprob_entry(tok, e, token_ids));
        }
        let full = tok.decode(&self.tokens, true).unwrap_or_default();
        // Search for a stop string from where a match could start that was not seen before.
        let from = self
            .text
            .len()
            .saturating_sub(stops.iter().map(String::len).max().unwrap_or(0));
        let from = (0..=from)
            .rev()
            .find(|&i| full.is_char_boundary(i))
            .unwrap_or(0);
        let hit = stops
            .iter()
            .filter_map(|s| full[from..].find(s.as_str()).map(|p| from + p))
            .min();
        if let Some(p) = hit {
            self.text = full[..p].to_string();
            self.finish = Some("stop");
        } else {
            self.text = full;
            if let Some(f) = e.finish {
                self.finish = Some(match f {
                    FinishReason::Stop => "stop",
                    FinishReason::Length => "length",
                });
            }
        }
        let end = if self.finish.is_some() {
            self.text.len()
        } else if self.text.ends_with('\u{FFFD}') {
            self.sent
        } else {
            self.text.len() - held_prefix(&self.text, stops)
        };
        if end > self.sent
            && self.text.is_char_boundary(self.sent)
            && self.text.is_char_boundary(end)
        {
            d.text = self.text[self.sent..end].to_string();
            self.sent = end;
        }
        d.finish = self.finish;
        Some(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_prefix_is_the_longest_partial_stop() {
        let stops = vec!["END".to_string(), "xyz".to_string()];
        assert_eq!(held_prefix("abc EN", &stops), 2);
        assert_eq!(held_prefix("abc E", &stops), 1);
        assert_eq!(held_prefix("abc xy", &stops), 2);
        assert_eq!(held_prefix("abc", &stops), 0);
        // A whole stop string is not a proper prefix (it is a match, found elsewhere).
        assert_eq!(held_prefix("abc END", &stops), 0);
    }
}
