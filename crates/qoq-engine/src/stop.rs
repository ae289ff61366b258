//! When a sequence stops, and the response mask the trainer uses.

use qoq_core::FinishReason;

/// The Qwen2.5 end-of-sequence tokens: `<|im_end|>` (151645) and `<|endoftext|>` (151643), the
/// reference's EOS list for the response mask (spec §7).
pub const QWEN_EOS: [u32; 2] = [151_645, 151_643];

/// Stop rules of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopCondition {
    /// Tokens that end a sequence (kept in the output, as the reference's mask includes them).
    pub eos: Vec<u32>,
    /// Upper bound on generated tokens.
    pub max_new_tokens: usize,
}

impl StopCondition {
    /// Qwen's EOS list and a token budget.
    pub fn qwen(max_new_tokens: usize) -> Self {
        StopCondition {
            eos: QWEN_EOS.to_vec(),
            max_new_tokens,
        }
    }

    /// Whether the sequence `generated` (after appending its newest token) is finished, and why.
    pub fn check(&self, generated: &[u32]) -> Option<FinishReason> {
        match generated.last() {
            Some(t) if self.eos.contains(t) => Some(FinishReason::Stop),
            _ if generated.len() >= self.max_new_tokens => Some(FinishReason::Length),
            _ => None,
        }
    }
}

/// `get_response_mask`: 1 up to and including the first EOS, 0 after it (spec §7).
pub fn response_mask(tokens: &[u32], eos: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(tokens.len());
    let mut done = false;
    for t in tokens {
        out.push(u8::from(!done));
        if eos.contains(t) {
            done = true;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eos_stops_and_budget_limits() {
        let s = StopCondition::qwen(4);
        assert_eq!(s.check(&[1, 2]), None);
        assert_eq!(s.check(&[1, 151_645]), Some(FinishReason::Stop));
        assert_eq!(s.check(&[1, 2, 3, 4]), Some(FinishReason::Length));
        // An EOS on the last allowed token is a stop, not a length finish.
        assert_eq!(s.check(&[1, 2, 3, 151_643]), Some(FinishReason::Stop));
        assert_eq!(
            StopCondition::qwen(0).check(&[]),
            Some(FinishReason::Length)
        );
    }

    #[test]
    fn mask_includes_the_first_eos_only() {
        assert_eq!(
            response_mask(&[5, 6, 151_645, 151_643, 9], &QWEN_EOS),
            vec![1, 1, 1, 0, 0]
        );
        assert_eq!(response_mask(&[5, 6], &QWEN_EOS), vec![1, 1]);
        assert!(response_mask(&[], &QWEN_EOS).is_empty());
    }
}
