//! The training attention's forward + backward, the eager composed path against the chunked op
//! ([`qoq_model::attention::chunked_attention`]), which decides
//! [`qoq_model::attention::CHUNKED_MIN_MACS`].
//!
//! Shapes: 2 rows, causal, f32, at 64 to 700 tokens, for Qwen2.5-0.5B's decoder (14 query heads
//! over 2 key-value heads, head size 64: the 0.5B `qoq bench train-step`, whose sequences are
//! 351 tokens) and the tiny test model's (4 over 2, head size 16). The eager path is the
//! model's (`qoq_model::text`): [`qoq_model::attention::eager_attention`], one graph node that
//! keeps the probabilities. Prints milliseconds per call, each the mean of `QOQ_BENCH_RUNS`
//! (default 10) after a warm-up.
//!
//! Run: `cargo bench -p qoq-model --bench attention` on a quiet machine.

use candle_core::{DType, Device, Result, Tensor, Var};
use qoq_model::attention::{AttentionMask, chunked_attention, eager_attention, with_min_macs};
use qoq_model::ops::ForwardMode;
use std::time::Instant;

const ROWS: usize = 2;

/// Mean forward and backward milliseconds of `f` over `runs` calls after one warm-up.
fn time(f: &dyn Fn() -> Result<Tensor>, up: &Tensor, runs: usize) -> Result<(f64, f64)> {
    let once = || -> Result<(f64, f64)> {
        let t0 = Instant::now();
        let y = f()?;
        let fwd = t0.elapsed().as_secs_f64();
        qoq_model::checkpoint::backward(&(y * up)?.sum_all()?)?;
        Ok((fwd, t0.elapsed().as_secs_f64() - fwd))
    };
    once()?;
    let (mut fwd, mut bwd) = (0.0, 0.0);
    for _ in 0..runs {
        let (a, b) = once()?;
        fwd += a;
        bwd += b;
    }
    Ok((fwd * 1e3 / runs as f64, bwd * 1e3 / runs as f64))
}

fn main() -> Result<()> {
    let runs: usize = std::env::var("QOQ_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let dev = Device::Cpu;
    println!(
        "training attention, forward + backward, {ROWS} rows, causal, f32, {} threads",
        rayon::current_num_threads()
    );
    for (model, heads, kv_heads, head_dim) in [("0.5b", 14, 2, 64), ("tiny", 4, 2, 16)] {
        for s in [64usize, 128, 351, 700] {
            let var = |h: usize| {
                Var::from_tensor(&Tensor::randn(0f32, 1., (ROWS, h, s, head_dim), &dev)?)
            };
            let (q, k, v) = (var(heads)?, var(kv_heads)?, var(kv_heads)?);
            let up = Tensor::randn(0f32, 1., (ROWS, heads, s, head_dim), &dev)?;
            let scale = 1.0 / (head_dim as f64).sqrt();
            let causal: Vec<u8> = (0..s * s).map(|i| u8::from(i % s <= i / s)).collect();
            let allowed = Tensor::from_vec(causal, (1, 1, s, s), &dev)?;
            // The text model's eager path (`text::Attention`).
            let eager = || -> Result<Tensor> {
                let n_rep = heads / kv_heads;
                let qq = q
                    .as_tensor()
                    .reshape((ROWS, kv_heads, n_rep * s, head_dim))?;
                let mode = ForwardMode::Train;
                eager_attention(
                    &qq,
                    k.as_tensor(),
                    v.as_tensor(),
                    scale,
                    Some(&allowed),
                    mode,
                )?
                .reshape((ROWS, heads, s, head_dim))
            };
            let mask = AttentionMask {
                causal: true,
                key_keep: Some(Tensor::ones((ROWS, s), DType::U8, &dev)?),
                segments: None,
            };
            let chunked = || {
                with_min_macs(0, || {
                    chunked_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale, &mask)
                })
            };
            let (ef, eb) = time(&eager, &up, runs)?;
            let (cf, cb) = time(&chunked, &up, runs)?;
            println!(
                "{model} {s:>4} tokens: eager {ef:7.2} + {eb:7.2} ms, chunked {cf:7.2} + {cb:7.2} ms \
                 (forward + backward); chunked/eager speed {:.2}x",
                (ef + eb) / (cf + cb)
            );
        }
    }
    Ok(())
}
