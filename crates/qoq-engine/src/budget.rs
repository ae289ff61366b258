//! Key/value memory budgets: how many rows of which length the engine's cache may hold.
//!
//! The engine keeps one left-padded cache for its running batch, and the cache's buffers grow in
//! steps ([`qoq_model::text::kv_capacity`]): a batch of `rows` rows whose longest row may reach
//! `len` positions holds at most `rows · kv_capacity(len)` positions of every layer's keys and
//! values. The server's admission ([`KvBudget::worst_case`]) and the rollout generator
//! ([`crate::generate`], `rollout.kv_cache_mib` / `rollout.gpu_memory_utilization`) both admit
//! rows against that bound.

use candle_core::DType;
use qoq_core::hf_config::TextConfig;
use qoq_model::ClinicalVlm;

/// A bound on the key/value bytes of the engine's batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvBudget {
    /// Bytes the batch's cache may hold.
    pub bytes: u64,
    /// Key and value bytes of one position of one row (all layers).
    pub bytes_per_position: u64,
    /// The setting the bound comes from, as a user wrote it (for messages), e.g.
    /// `rollout.kv_cache_mib = 64`.
    pub origin: String,
}

/// Key and value bytes of one position of one row of a decoder with `cfg`'s shape, cached in
/// `dtype`.
pub fn kv_bytes_per_position(cfg: &TextConfig, dtype: DType) -> u64 {
    let head_dim = cfg.hidden_size / cfg.num_attention_heads.max(1);
    (cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * dtype.size_in_bytes()) as u64
}

impl KvBudget {
    /// `bytes` of cache for `model` (its decoder's shape, its dtype).
    pub fn for_model(model: &ClinicalVlm, bytes: u64, origin: impl Into<String>) -> Self {
        KvBudget {
            bytes,
            bytes_per_position: kv_bytes_per_position(&model.config().text, model.dtype()),
            origin: origin.into(),
        }
    }

    /// The batch's key/value bytes at most: `rows` rows, the longest reaching `len` positions.
    pub fn worst_case(&self, rows: usize, len: usize) -> u64 {
        (rows as u64)
            .saturating_mul(qoq_model::text::kv_capacity(len) as u64)
            .saturating_mul(self.bytes_per_position)
    }

    /// Whether `rows` rows, the longest reaching `len` positions, fit.
    pub fn fits(&self, rows: usize, len: usize) -> bool {
        self.worst_case(rows, len) <= self.bytes
    }

    /// Rows of length up to `len` that fit in an empty batch (0: not even one).
    pub fn rows_alone(&self, len: usize) -> usize {
        match self.bytes.checked_div(self.worst_case(1, len)) {
            Some(rows) => usize::try_from(rows).unwrap_or(usize::MAX),
            None => usize::MAX,
        }
    }

    /// Bytes in MiB, for messages.
    pub fn mib(bytes: u64) -> f64 {
        bytes as f64 / (1024.0 * 1024.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(bytes: u64) -> KvBudget {
        KvBudget {
            bytes,
            bytes_per_position: 100,
            origin: "test".into(),
        }
    }

    #[test]
    fn the_bound_counts_the_cache_capacity_not_the_length() {
        let b = budget(100 * 64 * 3);
        // Lengths up to 42 live in a 64-position buffer (1.5x in blocks of 64).
        assert_eq!(qoq_model::text::kv_capacity(42), 64);
        assert_eq!(b.worst_case(3, 42), 3 * 64 * 100);
        assert!(b.fits(3, 42));
        assert!(!b.fits(4, 42));
        assert_eq!(b.rows_alone(42), 3);
        assert_eq!(b.rows_alone(100_000), 0);
    }

    #[test]
    fn bytes_per_position_are_layers_times_keys_and_values() {
        let cfg: TextConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 10, "hidden_size": 64, "intermediate_size": 8,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [2, 3, 3]}
        }))
        .unwrap();
        // 3 layers x (k, v) x 2 kv heads x head_dim 16 x 4 bytes.
        assert_eq!(kv_bytes_per_position(&cfg, DType::F32), 3 * 2 * 2 * 16 * 4);
        assert_eq!(kv_bytes_per_position(&cfg, DType::BF16), 3 * 2 * 2 * 16 * 2);
    }
}
