//! `qoq bench generate`: generation throughput of the engine ([`qoq_engine::generate`]) on a
//! model folder, prefill and decode separately, measured as the criterion bench
//! (`crates/qoq-engine/benches/generate.rs`) and `tools/bench/generate_ref.py` measure them, so
//! that `scripts/gpu-check.sh` can set it beside transformers' `generate` on a GPU machine (which
//! has no Rust toolchain, so no criterion).
//!
//! Text prompts of `--prompt-len` deterministic token ids below the vocabulary, `--n` rollouts
//! each, every sequence decoding exactly `--new` tokens (no EOS), temperature 1 and top-p 0.99 as
//! the reference's rollouts. One warm-up generation of 2 tokens, then `t1` = generation of 1 token
//! (the prefill and the first sample) and `tN` = generation of `--new` tokens:
//! prefill tokens/s = prompts · prompt-len / t1, decode tokens/s = rows · (new − 1) / (tN − t1).

use crate::cmd::logits::DtypeArg;
use anyhow::{Context, bail};
use candle_core::{DType, Tensor};
use clap::Args;
use qoq_engine::generate::text_positions;
use qoq_engine::{GenerateConfig, GroupRequest, SamplingParams, StopCondition, generate};
use qoq_model::ModelInputs;
use qoq_model::loading::load_model;
use serde_json::json;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

/// Arguments of `qoq bench generate`.
#[derive(Debug, Args)]
pub struct GenerateBenchArgs {
    /// Model directory: config.json plus model.safetensors or a sharded index (HF layout).
    #[arg(long)]
    pub model: PathBuf,
    /// Prompts (each its own group).
    #[arg(long, default_value_t = 1)]
    pub prompts: usize,
    /// Rollouts per prompt.
    #[arg(long, default_value_t = 1)]
    pub n: usize,
    /// Tokens per prompt.
    #[arg(long, default_value_t = 64)]
    pub prompt_len: usize,
    /// New tokens per sequence (EOS is ignored); at least 2.
    #[arg(long, default_value_t = 256)]
    pub new: usize,
    /// Weight and activation dtype.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DtypeArg,
    /// Write the result as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub device: crate::cmd::DeviceArgs,
}

/// Deterministic prompt ids below `vocab` (the criterion bench's rule, bounded by the model's
/// vocabulary).
pub(crate) fn prompt_ids(p: usize, len: usize, vocab: usize) -> Vec<u32> {
    let bound = vocab.clamp(1, 150_000);
    (0..len)
        .map(|i| ((p * 7919 + i * 104_729) % bound) as u32)
        .collect()
}

pub fn run(a: GenerateBenchArgs) -> anyhow::Result<ExitCode> {
    if a.prompts == 0 || a.n == 0 || a.prompt_len == 0 {
        bail!("--prompts, --n and --prompt-len must be at least 1");
    }
    if a.new < 2 {
        bail!("--new must be at least 2 (decode is timed as t(new) - t(1))");
    }
    let dev = a.device.open()?;
    let dtype = match a.dtype {
        DtypeArg::F32 => DType::F32,
        DtypeArg::Bf16 => DType::BF16,
    };
    let (cfg, model) = load_model(&a.model, dtype, &dev)
        .with_context(|| format!("loading model {}", a.model.display()))?;
    let reqs = (0..a.prompts)
        .map(|p| {
            let ids = prompt_ids(p, a.prompt_len, cfg.text.vocab_size);
            let t = Tensor::from_vec(ids, (1, a.prompt_len), &dev)?;
            Ok(GroupRequest {
                inputs: ModelInputs::text(t, None, text_positions(a.prompt_len, &dev)?),
                n: a.n,
                stream: p as u64,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let rows = a.prompts * a.n;
    let sampling = SamplingParams {
        temperature: 1.0,
        top_p: 0.99,
        logit_bias: vec![],
        ..SamplingParams::default()
    };
    let timed = |tokens: usize| -> anyhow::Result<f64> {
        let g = GenerateConfig {
            sampling: sampling.clone(),
            stop: StopCondition {
                eos: vec![],
                max_new_tokens: tokens,
            },
            max_batch_rows: rows,
            prefill_tokens: 0,
            kv_budget: None,
        };
        let t0 = Instant::now();
        let out = generate(&model, &reqs, &g, |_, _, _| {})?;
        let secs = t0.elapsed().as_secs_f64();
        let got = out
            .iter()
            .flatten()
            .filter(|s| s.tokens.len() == tokens)
            .count();
        if got != rows {
            bail!("{got} of {rows} sequences have {tokens} tokens");
        }
        Ok(secs)
    };
    timed(2).context("warm-up generation")?;
    let t1 = timed(1)?;
    let tn = timed(a.new)?;
    let prefill = (a.prompts * a.prompt_len) as f64 / t1;
    let decode = (rows * (a.new - 1)) as f64 / (tn - t1).max(1e-9);
    println!(
        "generate: {} prompts x {} rollouts, {} prompt + {} new tokens, {:?} on {}: prefill {prefill:.1} tokens/s ({t1:.3} s), decode {decode:.1} tokens/s ({tn:.3} s in all)",
        a.prompts, a.n, a.prompt_len, a.new, a.dtype, a.device.device
    );
    if let Some(p) = &a.json {
        let v = json!({
            "prompts": a.prompts, "n": a.n, "rows": rows, "prompt_len": a.prompt_len,
            "new": a.new, "dtype": format!("{:?}", a.dtype).to_lowercase(),
            "device": a.device.device.to_string(),
            "prefill_seconds": t1, "seconds": tn,
            "prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode,
        });
        std::fs::write(p, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}
