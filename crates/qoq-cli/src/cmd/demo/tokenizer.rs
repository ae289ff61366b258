//! The demo's tokenizer corpus: the synthetic world's text the BPE
//! ([`qoq_processor::bpe::train_bpe`]) is trained on.

use anyhow::Context;
use qoq_core::ClinicalSample;
use qoq_processor::prompt::PromptBuilder;
use qoq_processor::tokenizer::{QWEN25_VL_ADDED_TOKENS, TIME_SERIES_TOKEN};

/// The training text: every sample's full prompt (chat template and QoQ format prompt, special
/// tokens and placeholders removed), its answer and its SFT target, plus the response pieces the
/// reward knows (`<think>`, a JSON box list, `\boxed{}`).
pub fn corpus(samples: &[ClinicalSample]) -> anyhow::Result<Vec<String>> {
    let prompts = PromptBuilder::with_defaults(true)?;
    let strip = |s: &str| {
        let mut s = s.replace("<image>", "").replace("<video>", "");
        for (t, _) in QWEN25_VL_ADDED_TOKENS {
            s = s.replace(t, "\n");
        }
        s.replace(TIME_SERIES_TOKEN, "\n")
    };
    let mut out = Vec::with_capacity(samples.len() * 3 + 16);
    for s in samples {
        let p = prompts
            .prompt(&s.problem, !s.time_series.is_empty())
            .with_context(|| format!("rendering the prompt of sample {}", s.id))?;
        out.push(strip(&p));
        out.push(s.answer.clone());
        out.push(qoq_rl::trainer::sft_target(&s.answer, s.bbox));
    }
    Ok(out)
}
