//! qoq-engine: turning logits into rollouts.
//!
//! [`sampling`] is the per-sequence sampler (the vLLM `SamplingParams` the reference uses, spec §7,
//! plus greedy, top-k, min-p and repetition penalty), seeded per sequence so that the same seed gives
//! the same tokens whatever else shares the batch. [`stop`] decides when a sequence ends and builds
//! the response mask the trainer uses (1 up to and including the first EOS). [`engine`] runs the
//! model with a key/value cache, requests joining and leaving one decode batch at token
//! boundaries (the server's scheduler drives it); [`generate`] feeds it a list: n rollouts per
//! prompt, continuous batching across prompts; [`budget`] bounds the key/value memory both admit
//! rows against.

pub mod budget;
pub mod engine;
pub mod generate;
pub mod sampling;
pub mod stop;

pub use budget::{KvBudget, kv_bytes_per_position};
pub use engine::{Engine, SeqRequest, TokenEvent};
pub use generate::{GenerateConfig, Generated, GroupRequest, generate};
pub use sampling::{Sampled, Sampler, SamplingParams};
pub use stop::{StopCondition, response_mask};
