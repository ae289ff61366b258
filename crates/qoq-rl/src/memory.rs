//! The memory a run needs on its device, estimated from the run file and the model's
//! `config.json` alone (nothing loaded): `qoq train --dry-run` prints it and refuses a plan that
//! cannot fit, and `qoq bench train-step` prints it beside the measured peak.
//!
//! The parts, in bytes:
//! - **weights**: every parameter in `model.master_dtype`, and its copy in `model.compute_dtype`
//!   when that differs (mixed precision); with `[model.lora]` the frozen base once in the
//!   compute dtype and the adapters (rank × (in + out) per adapted projection) in the master one;
//! - **reference**: the frozen KL reference model in the compute dtype, when the run needs one
//!   (LoRA runs share the base);
//! - **optimiser**: AdamW's two moments per trained parameter (f32, or bf16 moments plus a bf16
//!   compensation buffer with `actor.strategy = "adamw_bf16"`);
//! - **gradients**: the trained parameters' gradients in the masters' dtype (f32, or bf16 with
//!   bf16 weights): the sum over an optimiser step's micro-batches, and beside it, at the end of
//!   each later micro-batch's backward, that micro-batch's own, except for the parameters whose
//!   gradients the backward adds to the sums as it goes: those inside checkpointed layers and,
//!   on the CPU, the projections' weights and the token embedding; once in all with one
//!   micro-batch per optimiser step;
//! - **activations**: what one update micro-batch keeps for its backward. The training forward
//!   is composed of candle ops, each of which keeps its output until the backward has passed it:
//!   per token and decoder layer about [`DECODER_VALUES_PER_TOKEN`] hidden-sized values, five
//!   MLP-sized ones and four attention rows of its length per head; the vision tower likewise
//!   per patch; the chosen-token log-probabilities keep [`LOGIT_COPIES`] copies of the response
//!   positions' logits. In the compute dtype (the logits in f32). With `model.gradient_checkpointing` a layer keeps only its
//!   input and one layer at a time is recomputed in full, and the logits of one chunk of
//!   response positions exist at a time; on the CPU in f32 from
//!   [`qoq_model::attention::CHUNKED_MIN_MACS`] score multiply-adds per sequence the attention keeps one
//!   log-sum-exp per head and query instead of its rows of scores.
//! - **frozen grads**: candle's backward computes the gradient of every matrix a tracked
//!   activation multiplies, frozen or not, and holds it until the backward ends: the frozen
//!   decoder weights (LoRA's base, a frozen LLM under a trained tower) in the compute dtype, on
//!   devices other than the CPU (there `qoq_model::linear::linear` avoids them);
//! - **kv cache**: the rollout batch's keys and values, `rows · kv_capacity(prompt + response)`
//!   positions, bounded by `rollout.kv_cache_mib` when set; it is freed before the update.
//!
//! The peak is the resident parts plus the larger of the rollout phase (kv cache) and the update
//! phase (activations and gradients), plus [`RUNTIME_BYTES`] for the program itself.

use crate::config::{DtypeName, OptimizerStrategy, RunConfig};
use qoq_core::hf_config::QwenVlConfig;

/// Hidden-sized f32 values a decoder layer's training forward keeps per token: norms (input,
/// normalised, scaled: 3, twice), q/k/v and their bias sums, the rotary embedding's products,
/// the attention output and its copies, the output projection, two residual sums.
pub const DECODER_VALUES_PER_TOKEN: usize = 20;
/// MLP-sized (intermediate) values per token and layer: gate, up, sigmoid, SiLU, product.
pub const MLP_VALUES_PER_TOKEN: usize = 5;
/// Attention rows (one per head, of the sequence's length) per token and layer of the composed
/// attention (off the CPU): the masked scores, their exponentials, the probabilities, and the
/// mask added.
pub const ATTENTION_ROWS_PER_TOKEN: usize = 4;
/// The same on the CPU, whose eager attention is one node keeping its probabilities
/// (`qoq_model::attention::eager_attention`).
pub const CPU_ATTENTION_ROWS_PER_TOKEN: usize = 1;
/// Copies of the response positions' logits the log-probability and its gradient hold.
pub const LOGIT_COPIES: usize = 3;
/// The program, its allocator and its tokenizer.
pub const RUNTIME_BYTES: u64 = 256 << 20;

/// One part of the estimate.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    /// `weights`, `reference`, ...
    pub name: &'static str,
    pub bytes: u64,
    /// How it was counted.
    pub detail: String,
}

/// The estimate of a run's memory on its device.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    /// Parameters of the model.
    pub parameters: u64,
    /// Of them, trained.
    pub trained: u64,
    /// The trained tensors (LoRA: an A and a B per adapted projection).
    pub trained_tensors: u64,
    /// Resident for the whole run.
    pub resident: Vec<Part>,
    /// The rollout phase's own memory.
    pub rollout: Vec<Part>,
    /// The update phase's own memory.
    pub update: Vec<Part>,
}

fn sum(parts: &[Part]) -> u64 {
    parts.iter().map(|p| p.bytes).sum()
}

fn bytes_of(d: DtypeName) -> u64 {
    d.dtype().size_in_bytes() as u64
}

/// `n` bytes in GiB.
pub fn gib(n: u64) -> f64 {
    n as f64 / (1u64 << 30) as f64
}

impl MemoryPlan {
    /// The estimate for `cfg` on a model of shape `model`, with prompts of `prompt_tokens`
    /// tokens at most (image and ECG placeholders included; `data.max_prompt_length` when
    /// nothing better is known) holding images of `image_patches` patches each (before the
    /// merger; none for text).
    pub fn estimate(
        cfg: &RunConfig,
        model: &QwenVlConfig,
        prompt_tokens: usize,
        image_patches: &[usize],
    ) -> Result<Self, String> {
        let shapes = qoq_model::loading::requested_parameters(model).map_err(|e| e.to_string())?;
        let (groups, freeze) = cfg.trainable()?;
        let trains =
            |name: &str| freeze.trains(name) && groups.as_ref().is_none_or(|g| g.trains(name));
        let count = |s: &Vec<usize>| s.iter().product::<usize>() as u64;
        let parameters: u64 = shapes.values().map(count).sum();
        let master = bytes_of(cfg.model.master_dtype);
        let compute = bytes_of(cfg.model.compute_dtype);
        let mut resident = Vec::new();
        let (trained, trained_tensors): (u64, u64) = match &cfg.model.lora {
            // The frozen base once, in the compute dtype (the KL reference shares it); the
            // adapters, rank × (in + out) per adapted decoder projection, train.
            Some(l) => {
                resident.push(Part {
                    name: "weights",
                    bytes: parameters * compute,
                    detail: format!(
                        "{parameters} frozen parameters × {compute} B ({:?}), shared by the \
                         KL reference",
                        cfg.model.compute_dtype
                    ),
                });
                let adapted: Vec<&Vec<usize>> = shapes
                    .iter()
                    .filter(|(n, s)| {
                        n.starts_with("model.layers.")
                            && s.len() == 2
                            && l.target_modules
                                .iter()
                                .any(|t| n.ends_with(&format!(".{t}.weight")))
                    })
                    .map(|(_, s)| s)
                    .collect();
                let adapters: u64 = adapted
                    .iter()
                    .map(|s| (l.rank * (s[0] + s[1])) as u64)
                    .sum();
                resident.push(Part {
                    name: "adapters",
                    bytes: adapters * master,
                    detail: format!("{adapters} LoRA parameters (rank {}) × {master} B", l.rank),
                });
                (adapters, 2 * adapted.len() as u64)
            }
            None => {
                resident.push(Part {
                    name: "weights",
                    bytes: parameters * master,
                    detail: format!(
                        "{parameters} parameters × {master} B ({:?})",
                        cfg.model.master_dtype
                    ),
                });
                if compute != master {
                    resident.push(Part {
                        name: "compute copy",
                        bytes: parameters * compute,
                        detail: format!(
                            "the {:?} copies the forwards use",
                            cfg.model.compute_dtype
                        ),
                    });
                }
                if cfg.algorithm.needs_reference() {
                    resident.push(Part {
                        name: "reference",
                        bytes: parameters * compute,
                        detail: format!("the frozen KL reference, {:?}", cfg.model.compute_dtype),
                    });
                }
                let trained: Vec<&Vec<usize>> = shapes
                    .iter()
                    .filter(|(n, _)| trains(n))
                    .map(|(_, s)| s)
                    .collect();
                (trained.iter().map(|s| count(s)).sum(), trained.len() as u64)
            }
        };
        let (moments, what) = match cfg.actor.strategy {
            OptimizerStrategy::Adamw => (8, "two f32 moments"),
            OptimizerStrategy::AdamwBf16 => (6, "two bf16 moments + bf16 compensation"),
        };
        resident.push(Part {
            name: "optimiser",
            bytes: trained * moments,
            detail: format!("{trained} trained parameters × {what}"),
        });
        // Frozen decoder weights sit downstream of whatever trains (LoRA's base, a frozen LLM
        // under a trained tower): candle's matrix product computes their gradients too.
        // On the CPU the frozen projections back-propagate to their input only
        // (`qoq_model::linear::linear`).
        let on_cpu = matches!(cfg.device(), Ok(qoq_model::DeviceSpec::Cpu));
        let frozen_decoder: u64 = match &cfg.model.lora {
            _ if on_cpu => 0,
            Some(_) => shapes
                .iter()
                .filter(|(n, _)| n.starts_with("model.") || n.starts_with("lm_head."))
                .map(|(_, s)| count(s))
                .sum(),
            None => shapes
                .iter()
                .filter(|(n, _)| {
                    (n.starts_with("model.") || n.starts_with("lm_head.")) && !trains(n)
                })
                .map(|(_, s)| count(s))
                .sum(),
        };
        let t = &model.text;
        let response = cfg.data.max_response_length;
        let seq = prompt_tokens + response;
        let rows = cfg.rollouts_per_step();
        let bpp = qoq_engine::kv_bytes_per_position(t, cfg.model.compute_dtype.dtype());
        let kv_rows = rows as u64 * qoq_model::text::kv_capacity(seq) as u64 * bpp;
        let (kv, kv_detail) = match cfg.rollout.kv_cache_mib {
            0 => (
                kv_rows,
                format!("{rows} rows × {seq} positions × {bpp} B (buffers grown by 1.5×)"),
            ),
            mib => (
                kv_rows.min(mib << 20),
                format!("bounded by rollout.kv_cache_mib = {mib}"),
            ),
        };
        let rollout = vec![Part {
            name: "kv cache",
            bytes: kv,
            detail: kv_detail,
        }];
        let micro = cfg.actor.micro_batch_size_per_device_for_update as u64;
        let (h, i, heads, layers) = (
            t.hidden_size as u64,
            t.intermediate_size as u64,
            t.num_attention_heads as u64,
            t.num_hidden_layers as u64,
        );
        // `actor.pack_rollouts`: a micro-batch's rollouts of one prompt are one row, the prompt
        // once and then each response, where that pays (as the trainer decides it,
        // `qoq_model::batch::packing_pays`). Micro-batches that straddle two groups hold one
        // row more.
        let group = cfg.rollout.n.max(1);
        let k = (micro as usize).min(group);
        let packed = cfg.actor.pack_rollouts
            && k > 1
            && qoq_model::batch::packing_pays(&[(prompt_tokens, k)], response, t.hidden_size);
        let (rows_u, seq_u) = if packed {
            let m = micro as usize;
            let aligned = group.is_multiple_of(m) || m.is_multiple_of(group);
            let r = if aligned {
                m / k
            } else {
                ((m - 1).div_ceil(k) + 1).min(m)
            };
            (r as u64, prompt_tokens + k * response)
        } else {
            (micro, seq)
        };
        let s = seq_u as u64;
        let checkpointing = cfg.model.gradient_checkpointing;
        // Per token and layer; from `CHUNKED_MIN_MACS` score multiply-adds per sequence the
        // training attention keeps one log-sum-exp per head instead of its rows of scores (the
        // chunked op: CPU, f32).
        let chunked_attention = on_cpu && cfg.model.compute_dtype == DtypeName::F32;
        let attention = |heads: u64, keys: u64, head_dim: u64| {
            if chunked_attention
                && heads * keys * keys * head_dim >= qoq_model::attention::CHUNKED_MIN_MACS as u64
            {
                heads
            } else if on_cpu {
                CPU_ATTENTION_ROWS_PER_TOKEN as u64 * heads * keys
            } else {
                ATTENTION_ROWS_PER_TOKEN as u64 * heads * keys
            }
        };
        // With checkpointing a layer keeps its input only, and one layer at a time is
        // recomputed in full.
        let kept = |layers: u64, hidden: u64, per_token: u64| {
            if checkpointing {
                layers * hidden + per_token
            } else {
                layers * per_token
            }
        };
        let per_token = DECODER_VALUES_PER_TOKEN as u64 * h
            + MLP_VALUES_PER_TOKEN as u64 * i
            + attention(heads, s, h / heads.max(1));
        let decoder = rows_u * s * kept(layers, h, per_token) * compute;
        let v = &model.vision;
        let p: u64 = image_patches.iter().map(|&n| n as u64).sum();
        // Each image attends within itself.
        let vision: u64 = image_patches
            .iter()
            .map(|&n| {
                let n = n as u64;
                let vh = v.hidden_size as u64;
                let per_patch = DECODER_VALUES_PER_TOKEN as u64 * vh
                    + MLP_VALUES_PER_TOKEN as u64 * v.intermediate_size as u64
                    + attention(v.num_heads as u64, n, vh / (v.num_heads as u64).max(1));
                rows_u * n * kept(v.depth as u64, vh, per_patch) * compute
            })
            .sum();
        // Under checkpointing the log-probs run in checkpointed chunks of positions
        // (`trainer::LOGITS_CHUNK` logits each): one chunk's logits exist at a time.
        let positions = if checkpointing {
            let rows = micro as usize;
            response.min(crate::trainer::positions_per_chunk(
                crate::trainer::LOGITS_CHUNK,
                rows,
                t.vocab_size,
            ))
        } else {
            response
        };
        let logits = micro * positions as u64 * t.vocab_size as u64 * 4 * LOGIT_COPIES as u64;
        // The gradients of the trained parameters in the masters' dtype: the sum over the
        // optimiser step's micro-batches, and at the end of each later micro-batch's backward its
        // own gradients beside it, except those the backward adds to the sums as it goes
        // (`checkpoint::backward_onto`, `backward_onto_copies` for bf16 compute copies): the
        // parameters inside checkpointed layers and, on the CPU, the projections' weights and
        // the token embedding (`qoq_model::linear`, `qoq_model::embedding`; the matrices outside
        // the ECG encoder).
        let micro_batches = cfg
            .rollouts_per_optimizer_step()
            .div_ceil(micro.max(1) as usize);
        let in_segment =
            |n: &str| n.starts_with("model.layers.") || n.starts_with("visual.blocks.");
        let delivered = |n: &str, shape: &[usize]| {
            (checkpointing && in_segment(n))
                || (on_cpu && shape.len() == 2 && !n.starts_with("time_series_embedding."))
        };
        let grad_bytes = bytes_of(cfg.model.master_dtype);
        let grad_dtype = cfg.model.master_dtype.dtype().as_str();
        let held_beside: u64 = match &cfg.model.lora {
            // The adapters sit inside the layers and are plain products.
            Some(_) if checkpointing => 0,
            Some(_) => trained,
            None => shapes
                .iter()
                .filter(|(n, s)| trains(n) && !delivered(n, s))
                .map(|(_, s)| count(s))
                .sum(),
        };
        let (held_twice, grads_detail) = if micro_batches <= 1 {
            (
                0,
                format!("{grad_dtype}, one micro-batch per optimiser step"),
            )
        } else if held_beside < trained {
            (
                held_beside,
                format!(
                    "{grad_dtype}, the sum over {micro_batches} micro-batches, and a \
                     micro-batch's for the {held_beside} trained parameters whose backward does \
                     not add to it"
                ),
            )
        } else {
            (
                trained,
                format!(
                    "{grad_dtype}, a micro-batch's and the sum over {micro_batches} micro-batches"
                ),
            )
        };
        let update = vec![
            Part {
                name: "activations",
                bytes: decoder + vision,
                detail: format!(
                    "{rows_u} rows × {seq_u} tokens{} × {layers} layers{}, {:?}{}",
                    if packed {
                        format!(" (a prompt and {k} responses per row)")
                    } else {
                        String::new()
                    },
                    if p > 0 {
                        format!(" + {p} image patches × {} vision blocks", v.depth)
                    } else {
                        String::new()
                    },
                    cfg.model.compute_dtype,
                    if checkpointing {
                        ", checkpointed (layer inputs + one layer)"
                    } else {
                        ""
                    }
                ),
            },
            Part {
                name: "logits",
                bytes: logits,
                detail: format!(
                    "{micro} rows × {positions} response tokens{} × {} vocabulary × {LOGIT_COPIES}",
                    if positions < response {
                        format!(" (a checkpointed chunk of {response})")
                    } else {
                        String::new()
                    },
                    t.vocab_size
                ),
            },
            Part {
                name: "gradients",
                bytes: (trained + held_twice) * grad_bytes,
                detail: grads_detail,
            },
            Part {
                name: "frozen grads",
                bytes: frozen_decoder * compute,
                detail: if on_cpu {
                    "none: on the CPU a frozen projection back-propagates to its input only".into()
                } else {
                    format!(
                        "{frozen_decoder} frozen decoder parameters: candle's backward also \
                         computes and holds the gradient of a frozen matrix a trained path \
                         multiplies"
                    )
                },
            },
        ];
        Ok(MemoryPlan {
            parameters,
            trained,
            trained_tensors,
            resident,
            rollout,
            update,
        })
    }

    /// What one optimiser step all-reduces per rank when `world_size` ranks train data-parallel
    /// (the actor's trained parameters; a GAE run's value model adds its own, not counted here).
    pub fn traffic(&self, world_size: usize) -> crate::dist::StepTraffic {
        crate::dist::StepTraffic {
            world_size,
            gradients: self.trained,
            tensors: self.trained_tensors,
        }
    }

    /// The peak: resident + the larger phase + the program.
    pub fn peak(&self) -> u64 {
        sum(&self.resident) + sum(&self.rollout).max(sum(&self.update)) + RUNTIME_BYTES
    }

    /// A table of the parts (GiB) and the peak.
    pub fn table(&self) -> String {
        let mut out = format!(
            "parameters {} ({} trained)\n",
            self.parameters, self.trained
        );
        for (phase, parts) in [
            ("resident", &self.resident),
            ("rollout", &self.rollout),
            ("update", &self.update),
        ] {
            for p in parts.iter() {
                out += &format!(
                    "  {phase:<9} {:<12} {:>9.2} GiB  {}\n",
                    p.name,
                    gib(p.bytes),
                    p.detail
                );
            }
        }
        out += &format!(
            "  peak (resident + larger phase + {:.2} GiB program) {:.2} GiB\n",
            gib(RUNTIME_BYTES),
            gib(self.peak())
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RunConfig;

    fn tiny() -> QwenVlConfig {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../qoq-processor/tests/fixtures/tiny_model/config.json");
        QwenVlConfig::from_file(&p).unwrap()
    }

    fn part(parts: &[Part], name: &str) -> u64 {
        parts.iter().find(|p| p.name == name).map_or(0, |p| p.bytes)
    }

    /// The gradients are held twice only where a later micro-batch's backward runs beside the
    /// sums, and then only for the parameters that backward does not add to them as it goes:
    /// on the CPU with f32 masters (f32 or bf16 compute) the matrices (projections, embedding)
    /// are added, with checkpointing everything inside the checkpointed layers too; on a GPU
    /// only the latter.
    #[test]
    fn gradients_are_held_twice_only_beside_a_running_sum() {
        let m = tiny();
        let shapes = qoq_model::loading::requested_parameters(&m).unwrap();
        let sum_of = |f: &dyn Fn(&str, &[usize]) -> bool| -> u64 {
            shapes
                .iter()
                .filter(|(n, s)| f(n, s))
                .map(|(_, s)| s.iter().product::<usize>() as u64)
                .sum()
        };
        let in_segment =
            |n: &str| n.starts_with("model.layers.") || n.starts_with("visual.blocks.");
        let matrix = |n: &str, s: &[usize]| s.len() == 2 && !n.starts_with("time_series");
        let inside = sum_of(&|n, _| in_segment(n));
        let matrices = sum_of(&|n, s| matrix(n, s));
        // The ECG encoder's position table is a fixed buffer.
        let neither = sum_of(&|n, s| !in_segment(n) && !matrix(n, s) && !n.ends_with("pos_embed"));
        let mut c = RunConfig::default();
        let plain = MemoryPlan::estimate(&c, &m, 100, &[64]).unwrap();
        // Every layer and block trains by default; the embeddings, norms and merger too.
        assert!(inside > 0 && matrices > 0 && neither > 0);

        assert_eq!(
            part(&plain.update, "gradients"),
            (2 * plain.trained - matrices) * 4
        );
        c.model.gradient_checkpointing = true;
        let ckpt = MemoryPlan::estimate(&c, &m, 100, &[64]).unwrap();
        assert_eq!(
            part(&ckpt.update, "gradients"),
            (plain.trained + neither) * 4
        );
        c.model.device = "cuda:0".into();
        let gpu = MemoryPlan::estimate(&c, &m, 100, &[64]).unwrap();
        assert_eq!(
            part(&gpu.update, "gradients"),
            (2 * plain.trained - inside) * 4
        );
        c.model.gradient_checkpointing = false;
        let gpu = MemoryPlan::estimate(&c, &m, 100, &[64]).unwrap();
        assert_eq!(part(&gpu.update, "gradients"), plain.trained * 8);
        c.model.device = "cpu".into();
        c.model.gradient_checkpointing = true;
        // bf16 compute over f32 masters: the copies' matrices are added to the masters' sums
        // as with f32 compute.
        c.model.compute_dtype = DtypeName::Bf16;
        let mixed = MemoryPlan::estimate(&c, &m, 100, &[64]).unwrap();
        assert_eq!(
            part(&mixed.update, "gradients"),
            (plain.trained + neither) * 4
        );
        c.model.gradient_checkpointing = false;
        let mixed = MemoryPlan::estimate(&c, &m, 100, &[64]).unwrap();
        assert_eq!(
            part(&mixed.update, "gradients"),
            (2 * plain.trained - matrices) * 4
        );
        c.model.gradient_checkpointing = true;
        // bf16 masters accumulate in bf16, the backward adding to the sums as with f32.
        c.model.master_dtype = DtypeName::Bf16;
        c.model.compute_dtype = DtypeName::Bf16;
        let bf = MemoryPlan::estimate(&c, &m, 100, &[64]).unwrap();
        assert_eq!(part(&bf.update, "gradients"), (plain.trained + neither) * 2);
        // One micro-batch per optimiser step: no sum besides it.
        c.actor.global_batch_size = 1;
        c.rollout.n = 2;
        c.actor.micro_batch_size_per_device_for_update = 2;
        let one = MemoryPlan::estimate(&c, &m, 100, &[64]).unwrap();
        assert_eq!(part(&one.update, "gradients"), one.trained * 2);
    }

    /// The logits part prices every response position's logits, and under checkpointing one
    /// chunk of positions (`trainer::LOGITS_CHUNK` logits) when the response is longer.
    #[test]
    fn checkpointing_prices_one_chunk_of_logits() {
        let mut m = tiny();
        m.text.vocab_size = 151_936;
        let mut c = RunConfig::default();
        c.data.max_response_length = 256;
        let micro = c.actor.micro_batch_size_per_device_for_update as u64;
        let per_position = micro * 151_936 * 4 * LOGIT_COPIES as u64;
        let plain = MemoryPlan::estimate(&c, &m, 100, &[64]).unwrap();
        assert_eq!(part(&plain.update, "logits"), 256 * per_position);
        c.model.gradient_checkpointing = true;
        let ckpt = MemoryPlan::estimate(&c, &m, 100, &[64]).unwrap();
        let positions = crate::trainer::LOGITS_CHUNK as u64 / (micro * 151_936);
        assert!((1..256).contains(&positions), "{positions}");
        assert_eq!(part(&ckpt.update, "logits"), positions * per_position);
        c.data.max_response_length = 1;
        let short = MemoryPlan::estimate(&c, &m, 100, &[64]).unwrap();
        assert_eq!(part(&short.update, "logits"), per_position);
    }

    /// The parts follow the settings they count: parameters from the model's shapes, the
    /// reference only with a KL term, bf16 moments at 6 bytes, the kv cache capped by
    /// `rollout.kv_cache_mib`, frozen components without optimiser state.
    #[test]
    fn packed_rollouts_price_a_prompt_once_per_micro_batch() {
        let m = tiny();
        let mut c = RunConfig::default();
        c.rollout.n = 4;
        c.actor.micro_batch_size_per_device_for_update = 2;
        c.data.max_response_length = 32;
        let detail = |p: &MemoryPlan| {
            p.update
                .iter()
                .find(|x| x.name == "activations")
                .unwrap()
                .detail
                .clone()
        };
        let packed = MemoryPlan::estimate(&c, &m, 300, &[64]).unwrap();
        assert!(
            detail(&packed).starts_with("1 rows × 364 tokens (a prompt and 2 responses per row)"),
            "{}",
            detail(&packed)
        );
        c.actor.pack_rollouts = false;
        let apart = MemoryPlan::estimate(&c, &m, 300, &[64]).unwrap();
        assert!(
            detail(&apart).starts_with("2 rows × 332 tokens × "),
            "{}",
            detail(&apart)
        );
        assert!(part(&packed.update, "activations") < part(&apart.update, "activations"));
        // Micro-batches of 3 over groups of 2 straddle groups: two rows of a prompt and 2.
        c.actor.pack_rollouts = true;
        c.rollout.n = 2;
        c.actor.micro_batch_size_per_device_for_update = 3;
        let straddling = MemoryPlan::estimate(&c, &m, 300, &[64]).unwrap();
        assert!(
            detail(&straddling).starts_with("2 rows × 364 tokens"),
            "{}",
            detail(&straddling)
        );
    }

    #[test]
    fn the_parts_follow_the_run_file() {
        let m = tiny();
        let shapes = qoq_model::loading::requested_parameters(&m).unwrap();
        let total: u64 = shapes
            .values()
            .map(|s| s.iter().product::<usize>() as u64)
            .sum();
        let mut c = RunConfig::default();
        let p = MemoryPlan::estimate(&c, &m, 100, &[64]).unwrap();
        assert_eq!(p.parameters, total);
        assert_eq!(part(&p.resident, "weights"), total * 4);
        assert_eq!(part(&p.resident, "reference"), total * 4);
        assert_eq!(part(&p.resident, "optimiser"), p.trained * 8);
        assert_eq!(
            p.peak(),
            p.resident.iter().map(|x| x.bytes).sum::<u64>()
                + p.rollout
                    .iter()
                    .map(|x| x.bytes)
                    .sum::<u64>()
                    .max(p.update.iter().map(|x| x.bytes).sum::<u64>())
                + RUNTIME_BYTES
        );
        c.actor.strategy = OptimizerStrategy::AdamwBf16;
        c.algorithm.kl.use_kl_loss = false;
        c.algorithm.kl.disable_kl = true;
        let q = MemoryPlan::estimate(&c, &m, 100, &[64]).unwrap();
        assert_eq!(part(&q.resident, "optimiser"), q.trained * 6);
        assert_eq!(part(&q.resident, "reference"), 0);
        c.rollout.kv_cache_mib = 1;
        let uncapped = part(&q.rollout, "kv cache");
        let capped = MemoryPlan::estimate(&c, &m, 100, &[64]).unwrap();
        assert_eq!(part(&capped.rollout, "kv cache"), uncapped.min(1 << 20));
        c.model.freeze_vision_tower = true;
        let frozen = MemoryPlan::estimate(&c, &m, 100, &[64]).unwrap();
        let vision: u64 = shapes
            .iter()
            .filter(|(n, _)| n.starts_with("visual."))
            .map(|(_, s)| s.iter().product::<usize>() as u64)
            .sum();
        assert_eq!(frozen.trained, q.trained - vision);
        // Longer prompts and more image patches need more activation memory; checkpointing
        // needs less.
        let longer = MemoryPlan::estimate(&c, &m, 400, &[256]).unwrap();
        assert!(part(&longer.update, "activations") > part(&frozen.update, "activations"));
        c.model.gradient_checkpointing = true;
        let ckpt = MemoryPlan::estimate(&c, &m, 400, &[256]).unwrap();
        assert!(part(&ckpt.update, "activations") < part(&longer.update, "activations"));
        // bf16 compute over f32 masters: a bf16 copy and a bf16 reference, bf16 activations.
        let mut b = RunConfig::default();
        b.model.compute_dtype = DtypeName::Bf16;
        let bf = MemoryPlan::estimate(&b, &m, 100, &[64]).unwrap();
        assert_eq!(part(&bf.resident, "weights"), total * 4);
        assert_eq!(part(&bf.resident, "compute copy"), total * 2);
        assert_eq!(part(&bf.resident, "reference"), total * 2);
        // Half the bytes per value, but the eager attention's rows of scores (the chunked op is
        // f32 only).
        let (bf_act, f32_act) = (
            part(&bf.update, "activations"),
            part(&p.update, "activations"),
        );
        assert!(2 * bf_act > f32_act, "{bf_act} {f32_act}");
        // LoRA: the base once in the compute dtype, the adapters alone trained.
        b.model.lora = Some(crate::config::LoraSection {
            rank: 2,
            alpha: 4.0,
            dropout: 0.0,
            target_modules: vec!["q_proj".into()],
        });
        let lora = MemoryPlan::estimate(&b, &m, 100, &[64]).unwrap();
        let q: u64 = shapes
            .iter()
            .filter(|(n, _)| n.starts_with("model.layers.") && n.ends_with(".q_proj.weight"))
            .map(|(_, s)| 2 * (s[0] + s[1]) as u64)
            .sum();
        assert!(q > 0);
        assert_eq!(lora.trained, q);
        assert_eq!(part(&lora.resident, "weights"), total * 2);
        assert_eq!(part(&lora.resident, "adapters"), q * 4);
        assert_eq!(part(&lora.resident, "reference"), 0);
        assert_eq!(part(&lora.resident, "optimiser"), q * 8);
        let decoder: u64 = shapes
            .iter()
            .filter(|(n, _)| n.starts_with("model.") || n.starts_with("lm_head."))
            .map(|(_, s)| s.iter().product::<usize>() as u64)
            .sum();
        // On the CPU the frozen projections compute no weight gradient; elsewhere they do.
        assert_eq!(part(&lora.update, "frozen grads"), 0);
        b.model.device = "cuda:0".into();
        let gpu = MemoryPlan::estimate(&b, &m, 100, &[64]).unwrap();
        assert_eq!(part(&gpu.update, "frozen grads"), decoder * 2);
        assert_eq!(part(&bf.update, "frozen grads"), 0);
    }
    /// The bytes a data-parallel optimiser step all-reduces, against values counted by hand on
    /// the tiny model (hidden 64, 4 query heads and 2 key/value heads of 16, MLP 128, 2 layers,
    /// vocabulary 3023, untied head).
    #[test]
    fn the_all_reduce_traffic_is_the_trained_gradients_in_f32() {
        let m = tiny();
        // The language model alone trains. Per layer: q 64·64 + 64, k and v 32·64 + 32 each,
        // o 64·64, gate and up 128·64, down 64·128, two norms of 64: 37 120 values in 12
        // tensors; the embedding and the head 3023·64 each, the final norm 64.
        let mut c = RunConfig::default();
        c.model.freeze_vision_tower = true;
        c.model.freeze_time_series_encoder = true;
        let p = MemoryPlan::estimate(&c, &m, 100, &[]).unwrap();
        let llm = 2 * 37_120 + 2 * 3023 * 64 + 64;
        assert_eq!(llm, 461_248);
        assert_eq!((p.trained, p.trained_tensors), (llm, 2 * 12 + 3));
        let one = p.traffic(1);
        assert_eq!(one.payload(), 461_248 * 4 + 27 * 8);
        assert_eq!(one.per_rank(), 0);
        // 2 nodes × 4 devices: each rank sends (and receives) 2·7/8 of each buffer.
        let eight = p.traffic(8);
        assert_eq!(eight.payload(), 1_845_208);
        assert_eq!(eight.per_rank(), 1_844_992 * 14 / 8 + 216 * 14 / 8);
        assert_eq!(eight.per_rank(), 3_228_736 + 378);
        let report = eight.report(2, 4, 3);
        for line in [
            "data-parallel world size 8 (trainer.nnodes 2 × trainer.n_gpus_per_node 4)",
            "payload per optimiser step 1845208 B",
            "461248 f32 gradients + 27 f64 presence flags",
            "per-rank traffic per optimiser step 3229114 B",
            "3 optimiser step(s) per training step: 9687342 B",
        ] {
            assert!(report.contains(line), "{line}: {report}");
        }
        assert!(
            one.report(1, 1, 1)
                .contains("one rank: nothing is all-reduced")
        );

        // LoRA of rank 2 on q_proj (64 → 64) and v_proj (64 → 32): A and B per projection
        // and layer, 2·(64 + 64) + 2·(64 + 32) = 448 values per layer in 4 tensors.
        c.model.lora = Some(crate::config::LoraSection {
            rank: 2,
            alpha: 4.0,
            dropout: 0.0,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
        });
        let lora = MemoryPlan::estimate(&c, &m, 100, &[]).unwrap();
        assert_eq!((lora.trained, lora.trained_tensors), (896, 8));
        let t = lora.traffic(4);
        assert_eq!(t.payload(), 896 * 4 + 8 * 8);
        // 2·3/4 of 3584 B and of 64 B.
        assert_eq!(t.per_rank(), 5376 + 96);
    }

    #[test]
    fn a_ring_sends_two_n_minus_one_over_n_and_big_buffers_split_into_messages() {
        use crate::dist::{message_chunks, ring_all_reduce_bytes};
        assert_eq!(ring_all_reduce_bytes(1000, 1), 0);
        assert_eq!(ring_all_reduce_bytes(1000, 2), 1000);
        assert_eq!(ring_all_reduce_bytes(1000, 4), 1500);
        assert_eq!(ring_all_reduce_bytes(1600, 16), 3000);
        // 7B's 8.29e9 f32 gradients over 16 ranks: no overflow.
        assert_eq!(
            ring_all_reduce_bytes(33_165_502_464, 16),
            33_165_502_464 / 16 * 30
        );
        let c: Vec<_> = message_chunks(10, 4).collect();
        assert_eq!(c, vec![0..4, 4..8, 8..10]);
        assert_eq!(message_chunks(8, 4).count(), 2);
        assert_eq!(message_chunks(0, 4).count(), 0);
        assert_eq!(message_chunks(3, 4).collect::<Vec<_>>(), vec![0..3]);
    }
}
