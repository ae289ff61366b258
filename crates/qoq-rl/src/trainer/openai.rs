//! The external rollout backend (`rollout.backend = "openai"`): an OpenAI-compatible server at
//! `rollout.endpoint` (`qoq serve`, vLLM, SGLang) samples the rollouts, and the trainer syncs its
//! weights to it before every generation that follows an optimiser step.
//!
//! Requests: one `POST {endpoint}/chat/completions` per prompt with `n`, `seed`, `temperature`,
//! `top_p`, `max_tokens`, `logit_bias` (the placeholder bias the engine applies), `ignore_eos`,
//! `logprobs: true` and vLLM's `return_tokens_as_token_ids: true` (each `logprobs.content`
//! entry's `token` is `"token_id:<id>"`), so the sampled token ids come back exactly; images go as
//! PNG data URIs in `image_url` parts, the ECG as `qoq serve`'s `input_ecg` part.
//!
//! With `qoq serve` (its `/v1/models` says `owned_by: "qoq-med-rs"`) the request carries the
//! question with its `<image>` placeholders (the server's rule: a text that places every image
//! part's placeholder itself gets none added), the format prompt switch
//! (`qoq_format_prompt`) and the engine's random stream (`seed = rollout.seed`, extension
//! `qoq_stream` = the prompt's stream id), so the server samples the tokens the in-process engine
//! would; the server's prompt length (`usage.prompt_tokens`) is checked against the trainer's.
//! Other servers get the question after the format prompt with the image parts where its
//! placeholders stand, and a per-prompt seed mixed from `rollout.seed` and the stream id; an ECG
//! row is refused there (no ECG part in their API).
//!
//! Weight sync: full-weight runs export the weights ([`Trainer::export`]) to
//! `<out_dir>/rollout_sync/weights` and `POST {endpoint}/reload_weights {"model_path"}`
//! (`qoq serve`'s endpoint); LoRA runs write the PEFT adapter to
//! `<out_dir>/rollout_sync/adapter_<k>` and `POST {endpoint}/load_lora_adapter {"lora_name",
//! "lora_path"}` (vLLM's endpoint), then name the adapter as the requests' `model` and unload the
//! previous one (`/unload_lora_adapter {"lora_name"}`).

use super::rollout::Prompt;
use super::{Result, Trainer, TrainerError};
use crate::config::{
    FORMAT_PROMPT_MEDICAL, FORMAT_PROMPT_NONE, RolloutBackend, RolloutConfig, RunConfig,
};
use base64::Engine as _;
use qoq_core::{FinishReason, Rollout, RolloutGroup};
use qoq_engine::{GenerateConfig, Generated};
use serde_json::{Value, json};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What the server owns (`/v1/models`' `owned_by`) when it is `qoq serve`.
const QOQ_SERVE_OWNER: &str = "qoq-med-rs";

/// The client of one OpenAI-compatible server.
pub(crate) struct OpenAiClient {
    /// The endpoint without a trailing `/`.
    base: String,
    agent: ureq::Agent,
    /// Whether the server is `qoq serve` (its extensions are sent).
    qoq_serve: bool,
    state: RefCell<SyncState>,
}

struct SyncState {
    /// The `model` of requests: `rollout.served_model`, the server's first model, or the LoRA
    /// adapter loaded last.
    model: String,
    /// The optimiser steps of the weights the server has (`None`: not synced yet).
    synced: Option<u64>,
    /// The LoRA adapter loaded last.
    adapter: Option<String>,
}

impl std::fmt::Debug for OpenAiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiClient")
            .field("base", &self.base)
            .field("qoq_serve", &self.qoq_serve)
            .finish()
    }
}

/// The rollout source of a run.
pub(crate) enum Backend {
    /// [`qoq_engine::generate`] in this process.
    Engine,
    /// An OpenAI-compatible server.
    OpenAi(Box<OpenAiClient>),
}

impl Backend {
    /// The backend `rollout.backend` names; the server is asked for its models first.
    pub(crate) fn connect(cfg: &RunConfig) -> Result<Self> {
        if cfg.rollout.backend != RolloutBackend::Openai {
            return Ok(Self::Engine);
        }
        let client = OpenAiClient::connect(&cfg.rollout)?;
        // `qoq serve` renders the question itself, with the reference's format prompt or none
        // (`qoq_format_prompt`); it has no way to receive a template of the run's own.
        let own_template = !matches!(
            cfg.data.format_prompt.as_str(),
            FORMAT_PROMPT_MEDICAL | FORMAT_PROMPT_NONE
        );
        if client.qoq_serve && own_template {
            return Err(cfg_err(format!(
                "data.format_prompt = {:?}: `qoq serve` (rollout.endpoint) renders only the \"medical\" format prompt or \"none\"; use rollout.backend = \"engine\" for a template file",
                cfg.data.format_prompt
            )));
        }
        Ok(Self::OpenAi(Box::new(client)))
    }
}

fn cfg_err(m: String) -> TrainerError {
    TrainerError::Config(m)
}

impl OpenAiClient {
    fn connect(r: &RolloutConfig) -> Result<Self> {
        let Some(endpoint) = &r.endpoint else {
            return Err(cfg_err(
                "rollout.backend = \"openai\" needs rollout.endpoint".into(),
            ));
        };
        let base = endpoint.trim_end_matches('/').to_string();
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(r.request_timeout_s.max(1)))
            .build();
        let url = format!("{base}/models");
        let models: Value = agent
            .get(&url)
            .call()
            .map_err(|e| cfg_err(format!("rollout.endpoint: GET {url}: {}", describe(e))))
            .and_then(|resp| read_json(resp, &url).map_err(cfg_err))?;
        let first = models["data"]
            .as_array()
            .and_then(|d| d.first())
            .ok_or_else(|| cfg_err(format!("rollout.endpoint: GET {url}: no model listed")))?;
        let qoq_serve = first["owned_by"].as_str() == Some(QOQ_SERVE_OWNER);
        let model = match &r.served_model {
            Some(m) => m.clone(),
            None => first["id"]
                .as_str()
                .ok_or_else(|| cfg_err(format!("rollout.endpoint: GET {url}: a model without id")))?
                .to_string(),
        };
        tracing::info!(%base, %model, qoq_serve, "rollouts from an OpenAI-compatible server");
        Ok(Self {
            base,
            agent,
            qoq_serve,
            state: RefCell::new(SyncState {
                model,
                synced: None,
                adapter: None,
            }),
        })
    }

    /// `POST {base}{path}` with a JSON body; the answer (vLLM answers the adapter endpoints
    /// with plain text), or the server's error.
    fn post(&self, path: &str, body: &Value) -> std::result::Result<String, String> {
        let url = format!("{}{path}", self.base);
        let resp = self
            .agent
            .post(&url)
            .set("Content-Type", "application/json")
            .send_string(&body.to_string())
            .map_err(|e| format!("POST {url}: {}", describe(e)))?;
        read_text(resp, &url)
    }

    /// The body of one prompt's request (see the module documentation).
    fn request(
        &self,
        t: &Trainer,
        p: &Prompt,
        n: usize,
        cfg: &GenerateConfig,
    ) -> std::result::Result<Value, String> {
        let proc = &t.processor;
        let images = proc
            .load_sample_images(&p.sample)
            .map_err(|e| e.to_string())?;
        let question = qoq_data::manifest::normalise_placeholders(&p.sample.problem, images.len())?;
        let mut uris = Vec::with_capacity(images.len());
        for img in images {
            let mut png = Vec::new();
            image::DynamicImage::ImageRgb8(img)
                .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                .map_err(|e| format!("encoding an image as PNG: {e}"))?;
            uris.push(format!(
                "data:image/png;base64,{}",
                base64::engine::general_purpose::STANDARD.encode(png)
            ));
        }
        let mut parts = if self.qoq_serve {
            user_parts(&question, uris, true)
        } else {
            let formatted = proc.prompt.format(&question).map_err(|e| e.to_string())?;
            user_parts(&formatted, uris, false)
        };
        if let Some(ecg) = ecg_part(t, p)? {
            if !self.qoq_serve {
                return Err(
                    "the row has an ECG, which only qoq serve takes (the input_ecg part); this \
                     server is not qoq serve"
                        .into(),
                );
            }
            parts.push(ecg);
        }
        let mut messages = Vec::new();
        if let Some(s) = &p.sample.system {
            messages.push(json!({"role": "system", "content": s}));
        }
        messages.push(json!({"role": "user", "content": parts}));
        let s = &cfg.sampling;
        let mut bias = serde_json::Map::new();
        for &(tok, b) in &s.logit_bias {
            bias.insert(tok.to_string(), json!(b));
        }
        let mut body = json!({
            "model": self.state.borrow().model,
            "messages": messages,
            "n": n,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": cfg.stop.max_new_tokens,
            "logprobs": true,
            "return_tokens_as_token_ids": true,
        });
        if !bias.is_empty() {
            body["logit_bias"] = Value::Object(bias);
        }
        if cfg.stop.eos.is_empty() {
            body["ignore_eos"] = json!(true);
        }
        if self.qoq_serve {
            body["seed"] = json!(s.seed);
            body["qoq_stream"] = json!(p.stream);
            body["qoq_format_prompt"] = json!(proc.opts.format_prompt.is_some());
        } else {
            body["seed"] = json!(mixed_seed(s.seed, p.stream));
        }
        Ok(body)
    }

    /// Every prompt's `n[i]` rollouts from the server, in order.
    pub(crate) fn generate(
        &self,
        t: &Trainer,
        step: u64,
        prompts: &[Prompt],
        n: &[usize],
        cfg: &GenerateConfig,
    ) -> Result<Vec<Vec<Generated>>> {
        let max = cfg.stop.max_new_tokens;
        prompts
            .iter()
            .zip(n)
            .map(|(p, &n)| {
                let err = |m: String| TrainerError::Generate {
                    step,
                    message: format!(
                        "rollout.endpoint {}: row line {}: {m}",
                        self.base, p.sample.line
                    ),
                };
                let body = self.request(t, p, n, cfg).map_err(err)?;
                let resp: Value = self
                    .post("/chat/completions", &body)
                    .and_then(|t| {
                        serde_json::from_str(&t).map_err(|e| format!("the answer is not JSON: {e}"))
                    })
                    .map_err(err)?;
                if self.qoq_serve {
                    let theirs = resp["usage"]["prompt_tokens"].as_u64();
                    let ours = p.processed.input_ids.len() as u64;
                    if theirs != Some(ours) {
                        return Err(err(format!(
                            "the server made {theirs:?} prompt tokens of the row, the trainer \
                             {ours}: its processor settings (the model folder's \
                             qoq_processor.json) differ from the run's data.* settings"
                        )));
                    }
                }
                parse_choices(&resp, n, max).map_err(err)
            })
            .collect()
    }

    /// Brings the server's weights to the trainer's (after `steps` optimiser steps) unless it
    /// has them; in data-parallel training rank 0 writes and posts and every rank waits.
    pub(crate) fn sync(&self, t: &Trainer, step: u64) -> Result<()> {
        let steps = t.opt.steps();
        if self.state.borrow().synced == Some(steps) {
            return Ok(());
        }
        let err = |m: String| TrainerError::Generate {
            step,
            message: format!("weight sync to {}: {m}", self.base),
        };
        let dir = t.out_dir.join("rollout_sync");
        let adapter_name = format!("qoq-adapter-{steps}");
        if t.writes() {
            match &t.adapters {
                Some(a) => {
                    let path = dir.join(format!("adapter_{steps}"));
                    qoq_model::lora::write_peft(
                        &path,
                        &a.cfg,
                        a.dropout,
                        &t.lora_base_name(),
                        &a.tensors()?,
                    )
                    .map_err(|e| err(e.to_string()))?;
                    let path = absolute(&path);
                    self.post(
                        "/load_lora_adapter",
                        &json!({"lora_name": adapter_name, "lora_path": path}),
                    )
                    .map_err(&err)?;
                    let previous = self.state.borrow().adapter.clone();
                    if let Some(prev) = previous {
                        self.post("/unload_lora_adapter", &json!({"lora_name": prev}))
                            .map_err(&err)?;
                        let _ = std::fs::remove_dir_all(
                            dir.join(prev.replace("qoq-adapter-", "adapter_")),
                        );
                    }
                }
                None => {
                    let path = dir.join("weights");
                    t.export(&path)?;
                    self.post("/reload_weights", &json!({"model_path": absolute(&path)}))
                        .map_err(&err)?;
                }
            }
        }
        t.dist
            .barrier()
            .map_err(Trainer::dist_err(step, "barrier after the weight sync"))?;
        let mut s = self.state.borrow_mut();
        if t.adapters.is_some() {
            s.model = adapter_name.clone();
            s.adapter = Some(adapter_name);
        }
        s.synced = Some(steps);
        tracing::info!(
            step,
            optimizer_steps = steps,
            "weights synced to the rollout server"
        );
        Ok(())
    }
}

/// Metric: token-mean |server log-prob − policy log-prob| of the step's rollouts
/// (`rollout.backend = "openai"`; the server's numerics against the trainer's).
pub const SERVER_LOGPROB_DIFF: &str = "rollout/server_logprob_abs_diff";

impl Trainer {
    /// verl's rule for an external sampler: the old log-probs of the PPO ratio (and of the KL in
    /// the reward) are the policy's, recomputed with the update's forward and micro-batches;
    /// the server's are kept only for [`SERVER_LOGPROB_DIFF`].
    pub(super) fn with_policy_log_probs(
        &self,
        step: u64,
        prompts: &[Prompt],
        groups: Vec<RolloutGroup>,
        m: &mut BTreeMap<String, f64>,
    ) -> Result<Vec<RolloutGroup>> {
        let flat: Vec<(usize, &Rollout, ())> = groups
            .iter()
            .enumerate()
            .flat_map(|(gi, g)| g.rollouts().iter().map(move |r| (gi, r, ())))
            .collect();
        let policy = self.policy_log_probs(step, prompts, &flat)?;
        drop(flat);
        let (mut sum, mut count) = (0.0f64, 0.0f64);
        let mut policy = policy.into_iter();
        let mut out = Vec::with_capacity(groups.len());
        for g in groups {
            let (id, sample, domain) = (g.id.clone(), g.sample.clone(), g.domain.clone());
            let mut rollouts = g.into_rollouts();
            for r in &mut rollouts {
                let lp = policy.next().ok_or_else(|| TrainerError::Generate {
                    step,
                    message: "fewer recomputed log-probs than rollouts".into(),
                })?;
                for (a, b) in r.logprobs.iter().zip(&lp) {
                    sum += f64::from((a - b).abs());
                    count += 1.0;
                }
                r.logprobs = lp;
            }
            out.push(
                RolloutGroup::new(id, sample, domain, rollouts).map_err(|e| {
                    TrainerError::Generate {
                        step,
                        message: e.to_string(),
                    }
                })?,
            );
        }
        if self.dist.size() > 1 {
            let all = self
                .dist
                .all_gather_f64(&[sum, count])
                .map_err(Trainer::dist_err(step, "log-prob difference all-gather"))?;
            sum = all.iter().map(|v| v[0]).sum();
            count = all.iter().map(|v| v[1]).sum();
        }
        m.insert(SERVER_LOGPROB_DIFF.into(), sum / count.max(1.0));
        Ok(out)
    }
}

/// The `input_ecg` part of the row's ECG (none when the model has no ECG path, the row no ECG,
/// or its file is missing and read as zeros, as the server reads an absent ECG).
fn ecg_part(t: &Trainer, p: &Prompt) -> std::result::Result<Option<Value>, String> {
    let proc = &t.processor;
    let Some(path) = p.sample.time_series.first() else {
        return Ok(None);
    };
    if !proc.time_series || (!path.exists() && proc.opts.missing_files_as_placeholders) {
        return Ok(None);
    }
    let sig = qoq_data::ecg_io::load_ecg(path, &proc.opts.ecg_load).map_err(|e| e.to_string())?;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let standard = sig.leads.len() == qoq_data::ecg_io::STANDARD_LEADS.len()
        && sig
            .leads
            .iter()
            .zip(qoq_data::ecg_io::STANDARD_LEADS)
            .all(|(a, b)| a == b);
    let n = sig.data.first().map_or(0, Vec::len);
    let (data, format) = if standard {
        let values: Vec<f32> = sig.data.iter().flatten().copied().collect();
        let npy = qoq_data::npy::encode_f32(&[sig.leads.len(), n], &values);
        (b64(&npy), "npy")
    } else {
        let mut csv = sig.leads.join(",");
        csv.push('\n');
        for i in 0..n {
            let row: Vec<String> = sig.data.iter().map(|l| l[i].to_string()).collect();
            csv.push_str(&row.join(","));
            csv.push('\n');
        }
        (b64(csv.as_bytes()), "csv")
    };
    Ok(Some(json!({"type": "input_ecg",
        "input_ecg": {"data": data, "format": format, "fs": sig.fs}})))
}

/// The user message's content parts of a question with `<image>` placeholders and its images'
/// data URIs: for `qoq serve` (`placed_by_text`) the question as one text part, which places
/// the images, then the image parts; for other servers the image parts where the placeholders
/// stand, between the text around them.
fn user_parts(question: &str, uris: Vec<String>, placed_by_text: bool) -> Vec<Value> {
    let image_part = |u: String| json!({"type": "image_url", "image_url": {"url": u}});
    if placed_by_text {
        let mut parts = vec![json!({"type": "text", "text": question})];
        parts.extend(uris.into_iter().map(image_part));
        return parts;
    }
    let mut parts = Vec::new();
    let mut uris = uris.into_iter();
    for (i, seg) in question.split("<image>").enumerate() {
        if i > 0 {
            parts.extend(uris.next().map(image_part));
        }
        if !seg.is_empty() {
            parts.push(json!({"type": "text", "text": seg}));
        }
    }
    parts
}

/// A per-prompt seed for servers without `qoq_stream` (SplitMix64 of the run's seed and the
/// stream id, in the positive `i64` range): prompts do not share a random stream, and a resumed
/// run sends the same seeds.
fn mixed_seed(seed: u64, stream: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) >> 1
}

fn absolute(p: &Path) -> String {
    std::path::absolute(p)
        .unwrap_or_else(|_| PathBuf::from(p))
        .display()
        .to_string()
}

fn describe(e: ureq::Error) -> String {
    match e {
        ureq::Error::Status(code, resp) => {
            let body = resp.into_string().unwrap_or_default();
            format!("HTTP {code}: {}", body.trim())
        }
        ureq::Error::Transport(t) => t.to_string(),
    }
}

fn read_text(resp: ureq::Response, url: &str) -> std::result::Result<String, String> {
    let mut text = String::new();
    std::io::Read::read_to_string(&mut resp.into_reader(), &mut text)
        .map_err(|e| format!("{url}: reading the answer: {e}"))?;
    Ok(text)
}

fn read_json(resp: ureq::Response, url: &str) -> std::result::Result<Value, String> {
    let text = read_text(resp, url)?;
    serde_json::from_str(&text).map_err(|e| format!("{url}: the answer is not JSON: {e}"))
}

/// The `n` choices of a chat-completions answer as generated rollouts: token ids from
/// `logprobs.content[].token` (`"token_id:<id>"`), their log-probs, the finish reason. A choice
/// cut by `length` before `max_tokens` means the server capped the request: an error.
pub(crate) fn parse_choices(
    resp: &Value,
    n: usize,
    max_tokens: usize,
) -> std::result::Result<Vec<Generated>, String> {
    let choices = resp["choices"]
        .as_array()
        .ok_or("the answer has no `choices`")?;
    if choices.len() != n {
        return Err(format!("{} choices for n = {n}", choices.len()));
    }
    let mut out: Vec<Option<Generated>> = (0..n).map(|_| None).collect();
    for (k, c) in choices.iter().enumerate() {
        let index = c["index"].as_u64().map_or(k, |i| i as usize);
        let content = c["logprobs"]["content"].as_array().ok_or_else(|| {
            format!("choice {index} has no logprobs.content (the server ignored `logprobs`)")
        })?;
        let mut tokens = Vec::with_capacity(content.len());
        let mut logprobs = Vec::with_capacity(content.len());
        for (j, e) in content.iter().enumerate() {
            let tok = e["token"].as_str().unwrap_or_default();
            let id = tok
                .strip_prefix("token_id:")
                .and_then(|s| s.parse::<u32>().ok())
                .ok_or_else(|| {
                    format!(
                        "choice {index} token {j}: {tok:?} is not \"token_id:<id>\" (the server \
                         ignored vLLM's `return_tokens_as_token_ids`)"
                    )
                })?;
            let lp = e["logprob"]
                .as_f64()
                .ok_or_else(|| format!("choice {index} token {j}: no logprob"))?;
            tokens.push(id);
            logprobs.push(lp as f32);
        }
        let finish = match c["finish_reason"].as_str() {
            Some("stop") => FinishReason::Stop,
            Some("length") if tokens.len() >= max_tokens => FinishReason::Length,
            Some("length") => {
                return Err(format!(
                    "choice {index} stopped for length after {} of max_tokens = {max_tokens} \
                     tokens: the server caps the request (qoq serve: --max-tokens-cap; vLLM: \
                     --max-model-len)",
                    tokens.len()
                ));
            }
            other => return Err(format!("choice {index}: finish_reason {other:?}")),
        };
        if tokens.is_empty() {
            return Err(format!("choice {index} has no tokens"));
        }
        let slot = out
            .get_mut(index)
            .ok_or_else(|| format!("choice index {index} for n = {n}"))?;
        *slot = Some(Generated {
            tokens,
            logprobs,
            finish,
        });
    }
    out.into_iter()
        .enumerate()
        .map(|(i, g)| g.ok_or_else(|| format!("choice {i} is missing")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_give_token_ids_logprobs_and_finish_in_index_order() {
        let resp = json!({"choices": [
            {"index": 1, "finish_reason": "length", "logprobs": {"content": [
                {"token": "token_id:7", "logprob": -0.5},
                {"token": "token_id:8", "logprob": -1.5}]}},
            {"index": 0, "finish_reason": "stop", "logprobs": {"content": [
                {"token": "token_id:151645", "logprob": -0.25}]}},
        ]});
        let g = parse_choices(&resp, 2, 2).unwrap();
        assert_eq!(g[0].tokens, vec![151645]);
        assert_eq!(g[0].finish, FinishReason::Stop);
        assert_eq!(g[1].tokens, vec![7, 8]);
        assert_eq!(g[1].logprobs, vec![-0.5, -1.5]);
        assert_eq!(g[1].finish, FinishReason::Length);
    }

    #[test]
    fn answers_without_token_ids_or_cut_by_the_server_are_errors() {
        let text = json!({"choices": [{"index": 0, "finish_reason": "stop",
            "logprobs": {"content": [{"token": "yes", "logprob": -0.1}]}}]});
        let e = parse_choices(&text, 1, 4).unwrap_err();
        assert!(e.contains("return_tokens_as_token_ids"), "{e}");
        let capped = json!({"choices": [{"index": 0, "finish_reason": "length",
            "logprobs": {"content": [{"token": "token_id:3", "logprob": -0.1}]}}]});
        let e = parse_choices(&capped, 1, 4).unwrap_err();
        assert!(e.contains("caps the request"), "{e}");
        let e = parse_choices(&capped, 2, 1).unwrap_err();
        assert!(e.contains("1 choices for n = 2"), "{e}");
        let none = json!({"choices": [{"index": 0, "finish_reason": "stop"}]});
        assert!(parse_choices(&none, 1, 4).unwrap_err().contains("logprobs"));
    }

    #[test]
    fn images_go_where_the_placeholders_stand_or_after_the_text_for_qoq_serve() {
        let uris = || vec!["data:a".to_string(), "data:b".to_string()];
        let q = "<image>Case 1. <image>What?";
        let img = |u: &str| json!({"type": "image_url", "image_url": {"url": u}});
        let text = |t: &str| json!({"type": "text", "text": t});
        assert_eq!(
            user_parts(q, uris(), true),
            vec![text(q), img("data:a"), img("data:b")]
        );
        assert_eq!(
            user_parts(q, uris(), false),
            vec![
                img("data:a"),
                text("Case 1. "),
                img("data:b"),
                text("What?")
            ]
        );
    }

    #[test]
    fn mixed_seeds_differ_by_stream_and_fit_a_signed_seed() {
        let a = mixed_seed(1, 0);
        let b = mixed_seed(1, 1);
        assert_ne!(a, b);
        assert_eq!(a, mixed_seed(1, 0));
        assert!(a <= i64::MAX as u64 && b <= i64::MAX as u64);
    }
}
