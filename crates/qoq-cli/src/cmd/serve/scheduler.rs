//! The scheduler: one thread owning the model's [`Engine`]. Requests arrive on a channel, wait
//! in arrival order, and join the running batch at a token boundary when it has room:
//!
//! * at most `max_running` requests run (`--max-running`; 1 gives one request at a time);
//! * at most `max_rows` sequences decode together (a request takes `n` rows);
//! * the key/value memory stays within the budget ([`KvBudget`], `--kv-cache-mb`): a request
//!   is admitted only when the batch's worst case, `rows x capacity(longest (prompt + max_tokens)) x bytes per position`
//!   (the cache's buffers grow in steps: [`qoq_model::text::kv_capacity`]), fits (the
//!   engine trims its cache to its longest live row, so this bounds what it holds); a request
//!   alone larger than the budget is refused (400 `context_too_long`);
//! * each step prefills at most `prefill_budget` prompt tokens, in pieces of `prefill_chunk`
//!   (chunked prefill), so a long prompt delays the running requests' next tokens by a bounded
//!   amount.
//!
//! Every token goes to its request's channel as it is sampled. A request whose channel is closed
//! (its client went away) or whose deadline passed is removed from the batch before the next
//! step; a `Cancel` message removes one choice (its stop string matched).
//!
//! The served models are the base model and the LoRA adapters loaded at run time
//! (`POST /v1/load_lora_adapter`, vLLM's API), each a model of its own (the base weights with
//! the adapter's projections); a request names one with `model`. The engine runs one model at a
//! time: requests are admitted in arrival order while they name the running model; when the
//! next one names another, it waits for the batch to empty and the engine switches.
//!
//! `Admin` messages change the models between requests, never during one: from their arrival
//! no waiting request is admitted; once the running ones have finished they run in order, then
//! admission resumes. `Reload` (`POST /v1/reload_weights`) swaps the base model's weights for
//! a folder's (the same `config.json`, else it is refused and the old weights stay; adapters
//! loaded before keep the weights they were loaded on); `LoadAdapter` reads a PEFT adapter
//! folder onto the current base weights; `UnloadAdapter` drops one (requests still waiting for
//! it get 404).

use super::ApiError;
use super::metrics::Metrics;
use candle_core::DType;
use qoq_engine::{Engine, KvBudget, SamplingParams, SeqRequest, StopCondition, TokenEvent};
use qoq_model::{ClinicalVlm, ModelInputs};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// What the scheduler sends a request.
pub enum Out {
    Token(TokenEvent),
    Error(ApiError),
}

/// A request for the engine.
pub struct Job {
    pub id: u64,
    /// The LoRA adapter the request names (`None`: the base model).
    pub model: Option<String>,
    /// The random stream id of the choices (`qoq_stream`).
    pub stream: u64,
    pub inputs: ModelInputs,
    pub prompt_tokens: usize,
    pub n: usize,
    pub sampling: SamplingParams,
    pub stop: StopCondition,
    pub top_logprobs: usize,
    pub deadline: Instant,
    pub tx: UnboundedSender<Out>,
}

pub enum Msg {
    Submit(Box<Job>),
    /// Remove choice `rollout` of request `id` (all of it when `None`).
    Cancel {
        id: u64,
        rollout: Option<usize>,
    },
    /// Change the served models between requests.
    Admin(Box<Admin>),
}

/// Where an [`Admin`] operation answers: `Err((status, message))` on failure.
pub type Reply = tokio::sync::oneshot::Sender<Result<(), (u16, String)>>;

/// An operation on the served models (run when no request is running).
pub enum Admin {
    /// Swap the base model's weights for those of the model folder `path`.
    Reload { path: PathBuf, reply: Reply },
    /// Serve the PEFT adapter folder `path` on the base model as `name`.
    LoadAdapter {
        name: String,
        path: PathBuf,
        reply: Reply,
    },
    /// Stop serving the adapter `name`.
    UnloadAdapter { name: String, reply: Reply },
}

/// The base model, the folder its weights came from, and the adapters' models.
struct Models {
    base: ClinicalVlm,
    base_dir: PathBuf,
    adapters: HashMap<String, ClinicalVlm>,
}

impl Models {
    fn get(&self, name: Option<&str>) -> Option<&ClinicalVlm> {
        match name {
            None => Some(&self.base),
            Some(n) => self.adapters.get(n),
        }
    }

    fn apply(&mut self, a: Admin) {
        let bad = |m: String| (400u16, m);
        match a {
            Admin::Reload { path, reply } => {
                let r = self.reloaded(&path).map(|m| {
                    self.base = m;
                    self.base_dir = path.clone();
                    tracing::info!(path = %path.display(), "weights reloaded");
                });
                let _ = reply.send(r.map_err(bad));
            }
            Admin::LoadAdapter { name, path, reply } => {
                let r = if self.adapters.contains_key(&name) {
                    Err(bad(format!("the LoRA adapter {name:?} is already loaded")))
                } else {
                    self.with_adapter(&path).map_err(bad).map(|m| {
                        tracing::info!(%name, path = %path.display(), "LoRA adapter loaded");
                        self.adapters.insert(name, m);
                    })
                };
                let _ = reply.send(r);
            }
            Admin::UnloadAdapter { name, reply } => {
                let r = match self.adapters.remove(&name) {
                    Some(_) => Ok(()),
                    None => Err((404, format!("the LoRA adapter {name:?} is not loaded"))),
                };
                let _ = reply.send(r);
            }
        }
    }

    /// The model of `path`, refused unless its `config.json` is the served model's.
    fn reloaded(&self, path: &Path) -> Result<ClinicalVlm, String> {
        let (cfg, model) = qoq_model::loading::load_model(path, DType::F32, self.base.device())
            .map_err(|e| format!("loading the model in {}: {e}", path.display()))?;
        if format!("{cfg:?}") != format!("{:?}", self.base.config()) {
            return Err(format!(
                "{}/config.json is not the served model's configuration: only the weights can \
                 be reloaded",
                path.display()
            ));
        }
        Ok(model)
    }

    /// The base weights with the PEFT adapter of folder `dir` on the decoder projections it has
    /// weights for (`adapter_config.json`: `r`, `lora_alpha`; `adapter_model.safetensors`).
    fn with_adapter(&self, dir: &Path) -> Result<ClinicalVlm, String> {
        let at = |e: &dyn std::fmt::Display| format!("{}: {e}", dir.display());
        let p = dir.join(qoq_model::lora::PEFT_CONFIG_FILE);
        let named = |e: &dyn std::fmt::Display| format!("{}: {e}", p.display());
        let text = std::fs::read_to_string(&p).map_err(|e| named(&e))?;
        let c: serde_json::Value = serde_json::from_str(&text).map_err(|e| named(&e))?;
        let rank = c["r"]
            .as_u64()
            .filter(|&r| r > 0)
            .ok_or_else(|| format!("{}: no positive `r`", p.display()))?;
        let alpha = c["lora_alpha"]
            .as_f64()
            .ok_or_else(|| format!("{}: no `lora_alpha`", p.display()))?;
        let dev = self.base.device();
        let weights =
            qoq_model::lora::read_peft_weights(&dir.join(qoq_model::lora::PEFT_WEIGHTS_FILE), dev)
                .map_err(|e| e.to_string())?;
        let mut targets: Vec<String> = weights
            .keys()
            .filter_map(|k| k.strip_suffix(".lora_A.weight"))
            .filter_map(|k| k.rsplit('.').next())
            .map(String::from)
            .collect();
        targets.sort();
        targets.dedup();
        if targets.is_empty() {
            return Err(at(&"the adapter has no lora_A weights"));
        }
        let layers = self.base.config().text.num_hidden_layers;
        if let Some(k) = weights.keys().find(|k| {
            k.split('.')
                .skip_while(|s| *s != "layers")
                .nth(1)
                .and_then(|i| i.parse::<usize>().ok())
                .is_none_or(|i| i >= layers)
        }) {
            return Err(at(&format!(
                "`{k}` is not a projection of the served model's {layers} decoder layers"
            )));
        }
        let lora = qoq_model::lora::LoraBuilder {
            cfg: qoq_model::lora::LoraConfig {
                rank: rank as usize,
                alpha,
                targets,
            },
            vb: candle_nn::VarBuilder::from_tensors(weights, DType::F32, dev),
        };
        let (vb, _) = qoq_model::loading::checkpoint_var_builder(&self.base_dir, DType::F32, dev)
            .map_err(|e| e.to_string())?;
        ClinicalVlm::new_with_lora(self.base.config(), vb, Some(&lora)).map_err(|e| at(&e))
    }
}

/// Why [`serve`] returned.
#[derive(Debug, PartialEq)]
enum Exit {
    /// The inbox closed with nothing left to do.
    Closed,
    /// Admin operations wait, or the next request names another model; no request runs.
    Switch,
}

/// Admission and step limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_running: usize,
    pub max_rows: usize,
    /// The batch's key/value memory (`--kv-cache-mb`).
    pub kv: KvBudget,
    pub prefill_budget: usize,
    pub prefill_chunk: usize,
    /// Pause after each step (hidden test flag: keeps requests running long enough to observe).
    pub step_delay: Duration,
}

struct Running {
    tx: UnboundedSender<Out>,
    deadline: Instant,
    rows: usize,
    /// prompt + max_tokens
    len: usize,
    /// Per choice: finished or cancelled.
    done: Vec<bool>,
}

impl Running {
    fn finished(&self) -> bool {
        self.done.iter().all(|&d| d)
    }
}

/// Run until every sender of `rx` is dropped and nothing is left to do. `model` was loaded
/// from `model_dir`.
pub fn run(
    model: ClinicalVlm,
    model_dir: PathBuf,
    rx: std::sync::mpsc::Receiver<Msg>,
    lim: Limits,
    metrics: Arc<Metrics>,
) {
    let mut models = Models {
        base: model,
        base_dir: model_dir,
        adapters: HashMap::new(),
    };
    let mut waiting: VecDeque<Box<Job>> = VecDeque::new();
    let mut admin: VecDeque<Box<Admin>> = VecDeque::new();
    let mut current: Option<String> = None;
    // Each pass serves one model until the batch is empty and something else is due.
    loop {
        let model = models.get(current.as_deref()).unwrap_or(&models.base);
        let exit = serve(
            model,
            current.as_deref(),
            &rx,
            &lim,
            &metrics,
            &mut waiting,
            &mut admin,
        );
        while let Some(a) = admin.pop_front() {
            models.apply(*a);
        }
        // Requests for an adapter unloaded while they waited.
        waiting.retain(|j| {
            let gone = j
                .model
                .as_deref()
                .is_some_and(|m| models.get(Some(m)).is_none());
            if gone {
                let _ = j.tx.send(Out::Error(ApiError::new(
                    axum::http::StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    "model_not_found",
                    format!(
                        "the LoRA adapter {:?} was unloaded",
                        j.model.as_deref().unwrap_or_default()
                    ),
                )));
            }
            !gone
        });
        current = waiting.front().and_then(|j| j.model.clone());
        if exit == Exit::Closed && waiting.is_empty() {
            break;
        }
    }
}

/// Serve `model` (the adapter `current`, or the base model) until the inbox closes with nothing
/// left to do, or until admin operations or a request for another model find no request
/// running.
fn serve(
    model: &ClinicalVlm,
    current: Option<&str>,
    rx: &std::sync::mpsc::Receiver<Msg>,
    lim: &Limits,
    metrics: &Arc<Metrics>,
    waiting: &mut VecDeque<Box<Job>>,
    admin: &mut VecDeque<Box<Admin>>,
) -> Exit {
    let mut engine = Engine::new(model, lim.prefill_chunk);
    let mut running: HashMap<u64, Running> = HashMap::new();
    let mut open = true;
    loop {
        let other = waiting
            .front()
            .is_some_and(|j| j.model.as_deref() != current);
        if (!admin.is_empty() || other) && running.is_empty() && engine.is_idle() {
            return Exit::Switch;
        }
        // The inbox: block while there is nothing to do.
        if engine.is_idle() && waiting.is_empty() {
            if !open {
                return Exit::Closed;
            }
            match rx.recv() {
                Ok(m) => handle(m, waiting, &mut running, &mut engine, admin),
                Err(_) => return Exit::Closed,
            }
            continue;
        }
        loop {
            match rx.try_recv() {
                Ok(m) => handle(m, waiting, &mut running, &mut engine, admin),
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        // Requests whose client went away or whose deadline passed.
        let now = Instant::now();
        waiting.retain(|j| {
            if j.tx.is_closed() {
                metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            if now >= j.deadline {
                let _ =
                    j.tx.send(Out::Error(ApiError::timeout("waiting for the model")));
                metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            true
        });
        let gone: Vec<u64> = running
            .iter()
            .filter(|(_, r)| r.tx.is_closed() || now >= r.deadline)
            .map(|(&id, _)| id)
            .collect();
        if !gone.is_empty() {
            // Cancels sent just before a channel closed (stop strings) come first.
            while let Ok(m) = rx.try_recv() {
                handle(m, waiting, &mut running, &mut engine, admin);
            }
        }
        for id in gone {
            let Some(r) = running.remove(&id) else {
                continue;
            };
            if !r.tx.is_closed() {
                let _ = r.tx.send(Out::Error(ApiError::timeout("while generating")));
            }
            metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = engine.cancel(id, None) {
                fail_all(&mut engine, &mut running, &format!("{e}"));
            }
        }
        // Admission, in arrival order, of requests for this model (none while admin operations
        // wait for the batch to empty).
        while let Some(j) = waiting
            .front()
            .filter(|j| admin.is_empty() && j.model.as_deref() == current)
        {
            let rows: usize = running.values().map(|r| r.rows).sum();
            let len = j.prompt_tokens + j.stop.max_new_tokens;
            if !lim.kv.fits(j.n, len) {
                let j = waiting.pop_front().expect("front");
                let _ = j.tx.send(Out::Error(ApiError::bad(
                    "context_too_long",
                    format!(
                        "{} choices of {} prompt tokens + {} new tokens need {} bytes of key/value memory, more than the server's budget of {} (--kv-cache-mb); ask for fewer tokens or choices",
                        j.n,
                        j.prompt_tokens,
                        j.stop.max_new_tokens,
                        lim.kv.worst_case(j.n, len),
                        lim.kv.bytes
                    ),
                )));
                continue;
            }
            if !running.is_empty() {
                let longest = running.values().map(|r| r.len).max().unwrap_or(0).max(len);
                if running.len() >= lim.max_running
                    || rows + j.n > lim.max_rows
                    || !lim.kv.fits(rows + j.n, longest)
                {
                    break;
                }
            }
            let j = waiting.pop_front().expect("front");
            let req = SeqRequest {
                inputs: j.inputs,
                n: j.n,
                first_rollout: 0,
                stream: j.stream,
                sampling: j.sampling,
                stop: j.stop,
                top_logprobs: j.top_logprobs,
            };
            let max_new = req.stop.max_new_tokens;
            match engine.add(j.id, req) {
                Ok(()) => {
                    metrics
                        .prompt_tokens
                        .fetch_add(j.prompt_tokens as u64, Ordering::Relaxed);
                    running.insert(
                        j.id,
                        Running {
                            tx: j.tx,
                            deadline: j.deadline,
                            rows: j.n,
                            len: j.prompt_tokens + max_new,
                            done: vec![false; j.n],
                        },
                    );
                }
                Err(e) => {
                    let _ = j.tx.send(Out::Error(ApiError::internal(format!(
                        "the engine refused the request: {e}"
                    ))));
                }
            }
        }
        metrics
            .waiting
            .store(waiting.len() as u64, Ordering::Relaxed);
        metrics
            .running
            .store(running.len() as u64, Ordering::Relaxed);
        if engine.is_idle() {
            metrics.kv_bytes.store(0, Ordering::Relaxed);
            metrics.batch_rows.store(0, Ordering::Relaxed);
            continue;
        }
        match engine.step(lim.prefill_budget) {
            Ok(events) => {
                metrics
                    .generation_tokens
                    .fetch_add(events.len() as u64, Ordering::Relaxed);
                let mut closed: Vec<u64> = Vec::new();
                for e in events {
                    let Some(r) = running.get_mut(&e.id) else {
                        continue;
                    };
                    let (id, k, done) = (e.id, e.rollout, e.finish.is_some());
                    if closed.contains(&id) {
                        continue;
                    }
                    if r.tx.send(Out::Token(e)).is_err() {
                        closed.push(id);
                        continue;
                    }
                    if done {
                        r.done[k] = true;
                        if r.finished() {
                            running.remove(&id);
                        }
                    }
                }
                if !closed.is_empty() {
                    // A request whose stop strings ended every choice closes its channel after
                    // sending its cancels: take those first, so that only requests whose
                    // client went away count as cancelled.
                    while let Ok(m) = rx.try_recv() {
                        handle(m, waiting, &mut running, &mut engine, admin);
                    }
                    for id in closed {
                        if running.remove(&id).is_some() {
                            // The client went away: free its rows now.
                            metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                            if let Err(e) = engine.cancel(id, None) {
                                fail_all(&mut engine, &mut running, &format!("{e}"));
                            }
                        }
                    }
                }
            }
            Err(e) => fail_all(&mut engine, &mut running, &format!("{e}")),
        }
        metrics
            .kv_bytes
            .store(engine.kv_bytes() as u64, Ordering::Relaxed);
        metrics
            .batch_rows
            .store(engine.running_rows() as u64, Ordering::Relaxed);
        metrics
            .running
            .store(running.len() as u64, Ordering::Relaxed);
        if !lim.step_delay.is_zero() {
            std::thread::sleep(lim.step_delay);
        }
    }
}

fn handle(
    m: Msg,
    waiting: &mut VecDeque<Box<Job>>,
    running: &mut HashMap<u64, Running>,
    engine: &mut Engine,
    admin: &mut VecDeque<Box<Admin>>,
) {
    match m {
        Msg::Submit(j) => waiting.push_back(j),
        Msg::Admin(a) => admin.push_back(a),
        Msg::Cancel { id, rollout } => {
            if let Some(r) = running.get_mut(&id) {
                match rollout {
                    Some(k) if k < r.done.len() && !r.done[k] => r.done[k] = true,
                    Some(_) => return,
                    None => r.done.iter_mut().for_each(|d| *d = true),
                }
                if engine.cancel(id, rollout).is_err() {
                    // Only a tensor error can fail a cancel; the next step reports it.
                    return;
                }
                if r.finished() {
                    running.remove(&id);
                }
            } else if rollout.is_none() {
                waiting.retain(|j| j.id != id);
            }
        }
    }
}

/// An engine error: every running request gets a 500 and the engine starts afresh.
fn fail_all(engine: &mut Engine, running: &mut HashMap<u64, Running>, msg: &str) {
    tracing::error!("generation failed: {msg}");
    for (_, r) in running.drain() {
        let _ = r.tx.send(Out::Error(ApiError::internal(format!(
            "generation failed: {msg}"
        ))));
    }
    engine.clear();
}
