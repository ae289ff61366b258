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
//! A `Reload` message (`POST /v1/reload_weights`) swaps the model between requests, never
//! during one: from its arrival no waiting request is admitted; once the running ones have
//! finished, the new weights are loaded (the same `config.json` as the served model, else the
//! reload is refused and the old model stays), then admission resumes.

use super::ApiError;
use super::metrics::Metrics;
use qoq_engine::{Engine, KvBudget, SamplingParams, SeqRequest, StopCondition, TokenEvent};
use qoq_model::{ClinicalVlm, ModelInputs};
use std::collections::{HashMap, VecDeque};
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
    /// Swap the model for the one in this folder between requests.
    Reload(Box<Reload>),
}

/// A weight reload: the model folder and where to answer.
pub struct Reload {
    pub path: std::path::PathBuf,
    pub reply: tokio::sync::oneshot::Sender<Result<(), String>>,
}

/// The model of `r.path`, refused unless its `config.json` is the served model's.
fn load_for(served: &ClinicalVlm, r: &Reload) -> Result<ClinicalVlm, String> {
    let (cfg, model) =
        qoq_model::loading::load_model(&r.path, candle_core::DType::F32, served.device())
            .map_err(|e| format!("loading the model in {}: {e}", r.path.display()))?;
    if format!("{cfg:?}") != format!("{:?}", served.config()) {
        return Err(format!(
            "{}/config.json is not the served model's configuration: only the weights can be \
             reloaded",
            r.path.display()
        ));
    }
    Ok(model)
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

/// Run until every sender of `rx` is dropped and nothing is left to do.
pub fn run(
    model: ClinicalVlm,
    rx: std::sync::mpsc::Receiver<Msg>,
    lim: Limits,
    metrics: Arc<Metrics>,
) {
    let mut model = model;
    let mut waiting: VecDeque<Box<Job>> = VecDeque::new();
    let mut reload: Option<Box<Reload>> = None;
    // Each pass serves one model until a reload finds the batch empty.
    loop {
        serve(&model, &rx, &lim, &metrics, &mut waiting, &mut reload);
        let Some(r) = reload.take() else {
            break;
        };
        let answer = load_for(&model, &r).map(|m| {
            model = m;
            tracing::info!(path = %r.path.display(), "weights reloaded");
        });
        let _ = r.reply.send(answer);
    }
}

/// Serve `model` until the inbox closes with nothing left to do (`reload` is then `None`), or
/// until a pending reload finds no request running.
fn serve(
    model: &ClinicalVlm,
    rx: &std::sync::mpsc::Receiver<Msg>,
    lim: &Limits,
    metrics: &Arc<Metrics>,
    waiting: &mut VecDeque<Box<Job>>,
    reload: &mut Option<Box<Reload>>,
) {
    let mut engine = Engine::new(model, lim.prefill_chunk);
    let mut running: HashMap<u64, Running> = HashMap::new();
    let mut open = true;
    loop {
        if reload.is_some() && running.is_empty() && engine.is_idle() {
            return;
        }
        // The inbox: block while there is nothing to do.
        if engine.is_idle() && (waiting.is_empty() || reload.is_some()) {
            if !open {
                break;
            }
            match rx.recv() {
                Ok(m) => handle(m, waiting, &mut running, &mut engine, reload),
                Err(_) => break,
            }
            continue;
        }
        loop {
            match rx.try_recv() {
                Ok(m) => handle(m, waiting, &mut running, &mut engine, reload),
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
                handle(m, waiting, &mut running, &mut engine, reload);
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
        // Admission, in arrival order (none while a reload waits for the batch to empty).
        while let Some(j) = waiting.front().filter(|_| reload.is_none()) {
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
                        handle(m, waiting, &mut running, &mut engine, reload);
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
    reload: &mut Option<Box<Reload>>,
) {
    match m {
        Msg::Submit(j) => waiting.push_back(j),
        Msg::Reload(r) => {
            if let Some(old) = reload.replace(r) {
                let _ = old
                    .reply
                    .send(Err("superseded by a later reload before it ran".into()));
            }
        }
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
