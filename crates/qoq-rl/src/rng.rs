//! Saved random-number-generator positions for exact resume (spec §11: the reference seeds its
//! `RandomSampler` with `generator seed=1` and vLLM with a per-request `seed=1`, but never saves
//! the generators, so a resumed run re-draws; we checkpoint every stream instead).
//!
//! Every random stream of the trainer is a [`ChaCha8Rng`]; its full state is the 32-byte seed,
//! the stream id and the word position, which [`RngState`] records. A checkpoint keeps one
//! [`RngStates`] map (`rng.json`) from stream name (`"sampler"`, `"rollout"`, ...) to state.

use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Errors restoring a generator.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// The seed is not 64 hex digits, or the word position is not a decimal `u128`.
    #[error("rng state {name:?}: {reason}")]
    Malformed {
        /// The stream's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A stream the caller needs is absent from the saved map.
    #[error("rng state {0:?} is not in the checkpoint")]
    Missing(String),
}

/// The position of one ChaCha8 stream: enough to continue it bit for bit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngState {
    /// The 32-byte key as 64 lowercase hex digits.
    pub seed: String,
    /// The ChaCha stream id.
    pub stream: u64,
    /// The word (u32) position in the stream, as a decimal string (a `u128` does not survive a
    /// JSON reader that parses numbers as doubles).
    pub word_pos: String,
}

impl RngState {
    /// Records the position of `rng`.
    pub fn capture(rng: &ChaCha8Rng) -> Self {
        let seed = rng.get_seed();
        Self {
            seed: seed.iter().map(|b| format!("{b:02x}")).collect(),
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos().to_string(),
        }
    }

    /// A generator at the recorded position. `name` only labels errors.
    pub fn restore(&self, name: &str) -> Result<ChaCha8Rng, RngError> {
        use rand::SeedableRng;
        let bad = |reason: String| RngError::Malformed {
            name: name.to_string(),
            reason,
        };
        if self.seed.len() != 64 || !self.seed.is_ascii() {
            return Err(bad(format!(
                "seed must be 64 hex digits, got {} characters",
                self.seed.len()
            )));
        }
        let mut seed = [0u8; 32];
        for (i, b) in seed.iter_mut().enumerate() {
            *b = u8::from_str_radix(&self.seed[2 * i..2 * i + 2], 16)
                .map_err(|e| bad(format!("seed byte {i}: {e}")))?;
        }
        let word_pos: u128 = self
            .word_pos
            .parse()
            .map_err(|e| bad(format!("word_pos {:?}: {e}", self.word_pos)))?;
        let mut rng = ChaCha8Rng::from_seed(seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(word_pos);
        Ok(rng)
    }
}

/// Named generator states (`rng.json` of a checkpoint).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RngStates(pub BTreeMap<String, RngState>);

impl RngStates {
    /// Records `rng` under `name` (replacing an earlier entry).
    pub fn insert(&mut self, name: &str, rng: &ChaCha8Rng) {
        self.0.insert(name.to_string(), RngState::capture(rng));
    }

    /// The generator saved under `name`.
    pub fn restore(&self, name: &str) -> Result<ChaCha8Rng, RngError> {
        self.0
            .get(name)
            .ok_or_else(|| RngError::Missing(name.to_string()))?
            .restore(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngCore, SeedableRng};

    #[test]
    fn restored_stream_continues_where_the_saved_one_stopped() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        rng.set_stream(7);
        for _ in 0..13 {
            rng.next_u32();
        }
        let mut states = RngStates::default();
        states.insert("sampler", &rng);
        let json = serde_json::to_string(&states).unwrap();
        let back: RngStates = serde_json::from_str(&json).unwrap();
        let mut restored = back.restore("sampler").unwrap();
        let expected: Vec<u64> = (0..5).map(|_| rng.next_u64()).collect();
        let got: Vec<u64> = (0..5).map(|_| restored.next_u64()).collect();
        assert_eq!(got, expected);
        assert!(matches!(back.restore("rollout"), Err(RngError::Missing(_))));
    }

    #[test]
    fn malformed_seed_is_an_error_naming_the_stream() {
        let s = RngState {
            seed: "zz".repeat(32),
            stream: 0,
            word_pos: "0".into(),
        };
        let e = s.restore("sampler").unwrap_err().to_string();
        assert!(e.contains("sampler") && e.contains("seed byte 0"), "{e}");
    }
}
