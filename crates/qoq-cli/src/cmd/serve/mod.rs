//! `qoq serve`: an OpenAI-compatible HTTP server over one QoQ-Med checkpoint (issues 10, 20).
//! The prompt, image and ECG paths are those of `qoq infer` (spec §4 processor, §5.1 ECG input,
//! §7 generation); requests are batched token by token by one scheduler ([`scheduler`]).
//!
//! Endpoints:
//!
//! * `GET /health` (never needs the API key): `{"status": "ok", "model", "running",
//!   "waiting", "batch_rows", "in_flight", "capacity"}` (running: requests admitted to the
//!   engine, prefilling or decoding; batch_rows: sequences in the decode batch);
//! * `GET /metrics`: Prometheus text ([`metrics`]);
//! * `GET /v1/models`: the one served model (`--served-model-name`);
//! * `POST /v1/chat/completions`: the chat-completions API, streamed (server-sent events,
//!   `data: {chunk}` lines with `choices[i].delta.content` as tokens are sampled, a last chunk
//!   per choice carrying its `finish_reason`, a usage chunk with
//!   `stream_options.include_usage`, then `data: [DONE]`) or not;
//! * `POST /v1/reload_weights` `{"model_path": DIR}` (extension, the weight sync of the trainer's
//!   `rollout.backend = "openai"`): loads the weights of the model folder DIR (its
//!   `config.json` must be the served model's) and serves them from the next request on; the
//!   requests running when it arrives finish on the old weights, the waiting ones wait for the
//!   swap. The processor (tokenizer, `qoq_processor.json`) stays the one loaded at start.
//!   Answers `{"status": "ok", "model_path"}`, or 400 `reload_failed` naming the reason;
//! * `POST /v1/load_lora_adapter` `{"lora_name", "lora_path"}` and `POST
//!   /v1/unload_lora_adapter` `{"lora_name"}` (vLLM's runtime adapter API): serve a PEFT LoRA
//!   adapter folder (`adapter_config.json`'s `r` and `lora_alpha`, `adapter_model.safetensors`)
//!   on the base weights as a model of its own, named by requests' `model` and listed by
//!   `/v1/models` (with `parent`), as vLLM does; the base model stays served. A name already
//!   loaded is refused (400), an unknown one on unload is 404. Each adapter is a copy of the
//!   base weights with its projections (memory: one model per adapter); the engine runs one
//!   model at a time, switching when the batch is empty.
//!
//! Messages: the last `user` message is the question; earlier `user` and `assistant` messages
//! are the conversation, rendered with the chat template before it; the text of `system` and
//! `developer` messages, joined by newlines, replaces the chat template's default system
//! message. Images and the ECG of any user turn go with the question (the QoQ prompt holds its
//! media in one user message, as in training; earlier turns' image placeholders come first).
//! A user `content` is a string or a list of parts, concatenated in order, with one `<image>`
//! placeholder per image part:
//!
//! * `{"type": "text", "text": ...}`;
//! * `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`: base64 data
//!   URIs only (PNG, JPEG, BMP, TIFF, WebP, GIF); `http(s)://` URLs are refused (400,
//!   `remote_url_refused`): the server never fetches other hosts;
//! * `{"type": "input_ecg", "input_ecg": {"data": "<base64>", "format": "npy" | "csv",
//!   "fs": 500}}` (extension, at most one per request, QoQ-Med checkpoints only): `npy` is a
//!   NumPy `.npy` file holding a leads x samples (or samples x leads) array at `fs` Hz (500 when
//!   absent); `csv` has a header row of lead names and one row per sample, at `fs` Hz, else at
//!   the rate of its `time` column, else 500 Hz.
//!
//! The case is built by the library's case builder ([`qoq_processor::Case`]), as `qoq infer`
//! builds its case; the processor settings are the model folder's `qoq_processor.json` when it
//! has one, else the defaults.
//!
//! Request fields ([`request`], typed; unknown fields are refused with 400
//! `unsupported_parameter` naming them): `model`, `messages`, `temperature` (default 0.5),
//! `top_p` (default 0.99), `max_tokens` / `max_completion_tokens` (default and ceiling
//! `--max-tokens-cap`), `seed` (default: from the clock; the same seed gives the same choices
//! whatever else runs), `n` (1..=8), `stream`, `stream_options.include_usage`, `stop` (a string
//! or up to 4, matched across token boundaries, excluded from the output, finish reason
//! `stop`), `logprobs` and `top_logprobs` (0..=20; the raw model log-probabilities, OpenAI
//! layout, streamed too; vLLM's `return_tokens_as_token_ids` makes each entry's `token`
//! `"token_id:<id>"`), `logit_bias`, `presence_penalty` / `frequency_penalty` (OpenAI's:
//! over the tokens generated so far, in [-2, 2]), `user` (unused), and the extensions `ignore_eos` (vLLM's), `qoq_format_prompt` (default true) and `qoq_stream` (the random stream id
//! of the choices, default 0: the trainer sends its prompt's stream so that the server samples
//! the engine's tokens). A user message whose text parts hold one `<image>` placeholder per
//! image part places the images there (the parts add none; the trainer sends its questions so).
//! `usage` counts the prompt tokens (image pads included) and the generated tokens of all
//! choices (up to a stop string).
//!
//! Limits, each refused with `{"error": {"message", "type", "code"}}`: the body size
//! (`--max-body-bytes`, 413), image pixels read from the header before decoding
//! (`--max-image-pixels`, 413), images per request (`--max-images`, 400), the token budget
//! (clamped), admission (`--max-running` requests run, `--queue-size` more wait; beyond that
//! 429 `queue_full`), the key/value budget (`--kv-cache-mb`), and a per-request deadline
//! (`--timeout-s`, 504 `timeout`; the request leaves the batch at the next token). A client that
//! disconnects frees its rows at the next token.
//!
//! Operations: `--api-key` (or `QOQ_API_KEY`) requires `Authorization: Bearer <key>` on every
//! route but `/health` (compared in constant time); a non-loopback `--host` without a key is
//! refused unless `--allow-unauthenticated` is given. One access-log line per request (target
//! `qoq::access`: id, status, tokens, latency; never the prompt, images or ECG). SIGTERM or
//! Ctrl-C stops accepting connections and finishes the running requests before exiting.

mod inputs;
mod metrics;
mod output;
mod request;
mod scheduler;

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use candle_core::{DType, Device};
use clap::Args;
use metrics::Metrics;
use output::Choice;
use qoq_engine::{SamplingParams, StopCondition};
use qoq_processor::processor::Processor;
use scheduler::{Job, Msg, Out};
use serde_json::{Value, json};
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// Arguments of `qoq serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Model folder: config.json, weights (HF layout), preprocessor_config.json, tokenizer.json.
    #[arg(long)]
    model: PathBuf,
    /// Tokenizer file overriding DIR/tokenizer.json.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Address to listen on (a non-loopback address needs --api-key or --allow-unauthenticated).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port; the address is printed on stdout).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// The model id of `/v1/models` and of responses.
    #[arg(long, default_value = "qoq-med")]
    served_model_name: String,
    /// Requests running together in the batch at most (1: one request at a time).
    #[arg(long, default_value_t = 16)]
    max_running: usize,
    /// Requests allowed to wait for the batch; more get 429.
    #[arg(long, default_value_t = 8)]
    queue_size: usize,
    /// Sequences decoded together at most (a request takes `n` of them).
    #[arg(long, default_value_t = 64)]
    max_batch_rows: usize,
    /// Key/value memory the running batch may use, MiB (admission keeps its worst case within).
    #[arg(long, default_value_t = 2048)]
    kv_cache_mb: u64,
    /// Prompt tokens prefilled per scheduler step at most (a bound on how long a new prompt
    /// delays the running requests' next tokens).
    #[arg(long, default_value_t = 512)]
    prefill_budget: usize,
    /// Prompt tokens per prefill piece (chunked prefill); 0: whole prompts.
    #[arg(long, default_value_t = 256)]
    prefill_chunk: usize,
    /// Largest request body, bytes.
    #[arg(long, default_value_t = 32 * 1024 * 1024)]
    max_body_bytes: usize,
    /// Largest image, pixels (width x height from its header, checked before decoding).
    #[arg(long, default_value_t = 40_000_000)]
    max_image_pixels: u64,
    /// Images per request at most.
    #[arg(long, default_value_t = 8)]
    max_images: usize,
    /// Tokens generated per choice at most (the default and the ceiling of `max_tokens`).
    #[arg(long, default_value_t = 1024)]
    max_tokens_cap: usize,
    /// Seconds a request may wait and run before it gets 504.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
    /// Require `Authorization: Bearer KEY` on every route but /health.
    #[arg(long, env = "QOQ_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Allow a non-loopback --host without --api-key.
    #[arg(long)]
    allow_unauthenticated: bool,
    /// Write each request's processed inputs (the `qoq process` safetensors layout) into this
    /// folder as `request-<k>.safetensors` (for tests comparing them with the manifest path's).
    #[arg(long, hide = true)]
    dump_inputs: Option<PathBuf>,
    /// Pause after each scheduler step, milliseconds (for tests that must see requests running).
    #[arg(long, hide = true, default_value_t = 0)]
    step_delay_ms: u64,
    #[command(flatten)]
    device: crate::cmd::DeviceArgs,
}

/// A refusal: its status and the OpenAI error object.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    code: &'static str,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, code: &'static str, msg: String) -> Self {
        Self {
            status,
            message: msg,
            kind,
            code,
        }
    }

    fn bad(code: &'static str, msg: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            msg.into(),
        )
    }

    fn internal(msg: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal_error",
            msg.into(),
        )
    }

    fn timeout(what: &str) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout_error",
            "timeout",
            format!("the request timed out {what}"),
        )
    }

    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// What requests share (the model itself belongs to the scheduler thread).
struct Served {
    name: String,
    created: u64,
    /// The processor with the QoQ format prompt, and the one without.
    with_format: Processor,
    plain: Processor,
    eos: Vec<u32>,
    image_token_id: u32,
    has_ecg: bool,
    vocab_size: usize,
    /// Requests admitted and not finished (preparing, waiting or running).
    in_flight: AtomicUsize,
    max_running: usize,
    queue_size: usize,
    next_id: AtomicU64,
    /// Requests prepared so far (the case ids).
    next_request: AtomicU64,
    max_images: usize,
    max_image_pixels: u64,
    max_tokens_cap: usize,
    timeout: Duration,
    dump_inputs: Option<PathBuf>,
    /// Where the model runs (`--device`): requests' inputs are built there.
    device: Device,
    /// The LoRA adapters being served (names).
    adapters: Mutex<std::collections::BTreeSet<String>>,
    /// The scheduler's inbox; taken at shutdown.
    inbox: Mutex<Option<std::sync::mpsc::Sender<Msg>>>,
    metrics: Arc<Metrics>,
    api_key: Option<String>,
}

impl Served {
    fn capacity(&self) -> usize {
        self.max_running + self.queue_size
    }

    fn send(&self, m: Msg) -> Result<(), ApiError> {
        let inbox = self
            .inbox
            .lock()
            .map_err(|_| ApiError::internal("the scheduler inbox is poisoned"))?;
        inbox
            .as_ref()
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    "shutting_down",
                    "the server is shutting down".into(),
                )
            })?
            .send(m)
            .map_err(|_| ApiError::internal("the scheduler has stopped"))
    }
}

/// An admission slot; frees itself when dropped.
struct Slot(Arc<Served>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

fn admit(s: &Arc<Served>) -> Result<Slot, ApiError> {
    let cap = s.capacity();
    s.in_flight
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            (n < cap).then_some(n + 1)
        })
        .map_err(|_| {
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "queue_full",
                format!(
                    "the server is busy ({cap} requests running or queued: --max-running {}, --queue-size {}); retry later",
                    s.max_running, s.queue_size
                ),
            )
        })?;
    Ok(Slot(s.clone()))
}

/// Whether `host` is a loopback address (or `localhost`).
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Load the model and serve until SIGTERM or Ctrl-C.
pub fn run(a: ServeArgs) -> anyhow::Result<ExitCode> {
    let api_key = a.api_key.clone().filter(|k| !k.is_empty());
    if api_key.is_none() && !is_loopback(&a.host) && !a.allow_unauthenticated {
        anyhow::bail!(
            "--host {} is not a loopback address and no API key is set: pass --api-key (or set QOQ_API_KEY), or --allow-unauthenticated to serve without one",
            a.host
        );
    }
    anyhow::ensure!(a.max_running >= 1, "--max-running must be at least 1");
    let load =
        |format: bool| crate::cmd::infer::model_processor(&a.model, a.tokenizer.as_deref(), format);
    let (with_format, plain) = (load(true)?, load(false)?);
    if let Some(d) = &a.dump_inputs {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let device = a.device.open()?;
    let (cfg, model) = qoq_model::loading::load_model(&a.model, DType::F32, &device)
        .with_context(|| format!("loading the model in {}", a.model.display()))?;
    let kv = qoq_engine::KvBudget::for_model(
        &model,
        a.kv_cache_mb.saturating_mul(1024 * 1024),
        format!("--kv-cache-mb {}", a.kv_cache_mb),
    );
    let metrics = Arc::new(Metrics::new(kv.bytes));
    let ids = with_format.tokenizer.ids;
    let (tx, rx) = std::sync::mpsc::channel::<Msg>();
    let limits = scheduler::Limits {
        max_running: a.max_running,
        max_rows: a.max_batch_rows.max(1),
        kv,
        prefill_budget: a.prefill_budget.max(1),
        prefill_chunk: a.prefill_chunk,
        step_delay: Duration::from_millis(a.step_delay_ms),
    };
    let served = Arc::new(Served {
        name: a.served_model_name.clone(),
        created: unix_now(),
        with_format,
        plain,
        eos: vec![ids.im_end, ids.endoftext],
        image_token_id: cfg.image_token_id,
        has_ecg: cfg.has_time_series(),
        vocab_size: cfg.text.vocab_size,
        in_flight: AtomicUsize::new(0),
        max_running: a.max_running,
        queue_size: a.queue_size,
        next_id: AtomicU64::new(0),
        next_request: AtomicU64::new(0),
        max_images: a.max_images,
        max_image_pixels: a.max_image_pixels,
        max_tokens_cap: a.max_tokens_cap.max(1),
        timeout: Duration::from_secs(a.timeout_s.max(1)),
        dump_inputs: a.dump_inputs.clone(),
        device,
        adapters: Mutex::new(Default::default()),
        inbox: Mutex::new(Some(tx)),
        metrics: metrics.clone(),
        api_key,
    });
    let model_dir = a.model.clone();
    let sched = std::thread::Builder::new()
        .name("qoq-scheduler".into())
        .spawn(move || {
            qoq_model::threads::install(|| scheduler::run(model, model_dir, rx, limits, metrics))
        })
        .context("starting the scheduler thread")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let s2 = served.clone();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
            .await
            .with_context(|| format!("binding {}:{}", a.host, a.port))?;
        let addr = listener.local_addr()?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on http://{addr}")?;
        out.flush()?;
        drop(out);
        tracing::info!(%addr, model = %s2.name, ecg = s2.has_ecg, max_running = s2.max_running,
            auth = s2.api_key.is_some(), "serving");
        axum::serve(listener, router(s2, a.max_body_bytes))
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("serving")?;
        anyhow::Ok(())
    })?;
    // Every connection has closed: the running requests are finished. Stop the scheduler.
    if let Ok(mut inbox) = served.inbox.lock() {
        inbox.take();
    }
    let _ = sched.join();
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down: no new connections; finishing the running requests");
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn router(s: Arc<Served>, max_body_bytes: usize) -> Router {
    let protected = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/reload_weights", post(reload_weights))
        .route("/v1/load_lora_adapter", post(load_lora_adapter))
        .route("/v1/unload_lora_adapter", post(unload_lora_adapter))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .route_layer(axum::middleware::from_fn_with_state(s.clone(), auth));
    Router::new()
        .route("/health", get(health))
        .merge(protected)
        .with_state(s)
}

/// Byte strings equal, in time independent of where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

async fn auth(State(s): State<Arc<Served>>, req: Request, next: Next) -> Response {
    let Some(key) = &s.api_key else {
        return next.run(req).await;
    };
    let given = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(g) if constant_time_eq(g.as_bytes(), key.as_bytes()) => next.run(req).await,
        other => {
            s.metrics.request_done(401);
            tracing::info!(target: "qoq::access", path = %req.uri().path(), status = 401, "refused");
            let why = if other.is_some() {
                "the API key is wrong"
            } else {
                "an API key is required: send `Authorization: Bearer <key>`"
            };
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid_api_key",
                why.into(),
            )
            .into_response()
        }
    }
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "not_found",
        "no such endpoint: use /health, /metrics, /v1/models, /v1/chat/completions, \
         /v1/reload_weights, /v1/load_lora_adapter or /v1/unload_lora_adapter"
            .into(),
    )
}

/// The body of `POST /v1/reload_weights`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReloadBody {
    model_path: PathBuf,
}

/// The body of `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter` (vLLM's).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AdapterBody {
    lora_name: String,
    lora_path: Option<PathBuf>,
}

fn admin_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    what: &str,
    shape: &str,
) -> Result<T, ApiError> {
    let body = body.map_err(|e| ApiError::bad("invalid_body", e.body_text()))?;
    serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad(
            "invalid_request",
            format!("{what}: {e} (the body is {shape})"),
        )
    })
}

/// Sends `op` (made with its reply channel) to the scheduler and waits for its answer.
async fn admin(
    s: &Arc<Served>,
    code: &'static str,
    op: impl FnOnce(scheduler::Reply) -> scheduler::Admin,
) -> Result<(), ApiError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    s.send(Msg::Admin(Box::new(op(tx))))?;
    rx.await
        .map_err(|_| ApiError::internal("the scheduler dropped the operation"))?
        .map_err(|(status, m)| {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
            ApiError::new(status, "invalid_request_error", code, m)
        })
}

fn answer(r: Result<Value, ApiError>) -> Response {
    match r {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn reload_weights(
    State(s): State<Arc<Served>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    answer(
        async {
            let b: ReloadBody = admin_body(
                body,
                "reload_weights",
                r#"{"model_path": "/path/to/model"}"#,
            )?;
            let path = b.model_path.clone();
            admin(&s, "reload_failed", |reply| scheduler::Admin::Reload {
                path,
                reply,
            })
            .await?;
            tracing::info!(target: "qoq::access", path = "/v1/reload_weights", status = 200, "reloaded");
            Ok(json!({"status": "ok", "model_path": b.model_path}))
        }
        .await,
    )
}

async fn load_lora_adapter(
    State(s): State<Arc<Served>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    answer(
        async {
            let shape = r#"{"lora_name": "name", "lora_path": "/path/to/adapter"}"#;
            let b: AdapterBody = admin_body(body, "load_lora_adapter", shape)?;
            let Some(path) = b.lora_path.clone() else {
                return Err(ApiError::bad(
                    "invalid_request",
                    format!("load_lora_adapter needs `lora_path` (the body is {shape})"),
                ));
            };
            if b.lora_name == s.name || b.lora_name.is_empty() {
                return Err(ApiError::bad(
                    "invalid_request",
                    format!(
                        "`lora_name` {:?} must be a new name, not the base model's",
                        b.lora_name
                    ),
                ));
            }
            let name = b.lora_name.clone();
            admin(&s, "load_lora_adapter_failed", |reply| {
                scheduler::Admin::LoadAdapter { name, path, reply }
            })
            .await?;
            if let Ok(mut a) = s.adapters.lock() {
                a.insert(b.lora_name.clone());
            }
            Ok(json!({"status": "ok", "lora_name": b.lora_name}))
        }
        .await,
    )
}

async fn unload_lora_adapter(
    State(s): State<Arc<Served>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    answer(
        async {
            let b: AdapterBody =
                admin_body(body, "unload_lora_adapter", r#"{"lora_name": "name"}"#)?;
            if let Ok(mut a) = s.adapters.lock() {
                a.remove(&b.lora_name);
            }
            let name = b.lora_name.clone();
            admin(&s, "model_not_found", |reply| {
                scheduler::Admin::UnloadAdapter { name, reply }
            })
            .await?;
            Ok(json!({"status": "ok", "lora_name": b.lora_name}))
        }
        .await,
    )
}

async fn health(State(s): State<Arc<Served>>) -> Response {
    axum::Json(json!({
        "status": "ok",
        "model": s.name,
        "running": s.metrics.running.load(Ordering::Relaxed),
        "waiting": s.metrics.waiting.load(Ordering::Relaxed),
        "batch_rows": s.metrics.batch_rows.load(Ordering::Relaxed),
        "in_flight": s.in_flight.load(Ordering::SeqCst),
        "capacity": s.capacity(),
    }))
    .into_response()
}

async fn metrics_text(State(s): State<Arc<Served>>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

async fn models(State(s): State<Arc<Served>>) -> Response {
    let mut data = vec![
        json!({"id": s.name, "object": "model", "created": s.created, "owned_by": "qoq-med-rs"}),
    ];
    if let Ok(a) = s.adapters.lock() {
        data.extend(a.iter().map(|n| {
            json!({"id": n, "object": "model", "created": s.created, "owned_by": "qoq-med-rs",
                "parent": s.name})
        }));
    }
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// The access-log line of one request, written when it is dropped (after the last byte of a
/// stream, or when its client went away). Never the prompt, images or ECG.
struct AccessLog {
    metrics: Arc<Metrics>,
    id: String,
    start: std::time::Instant,
    status: u16,
    stream: bool,
    prompt_tokens: usize,
    completion_tokens: usize,
    /// `complete`, `error`, or `disconnected` (a stream dropped before its end).
    outcome: &'static str,
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        self.metrics.request_done(self.status);
        tracing::info!(
            target: "qoq::access",
            id = %self.id,
            status = self.status,
            stream = self.stream,
            prompt_tokens = self.prompt_tokens,
            completion_tokens = self.completion_tokens,
            ms = self.start.elapsed().as_millis() as u64,
            outcome = self.outcome,
            "request"
        );
    }
}

async fn chat(State(s): State<Arc<Served>>, body: Result<Bytes, BytesRejection>) -> Response {
    let job_id = s.next_id.fetch_add(1, Ordering::Relaxed);
    let id = format!("chatcmpl-{job_id}");
    let mut log = Some(AccessLog {
        metrics: s.metrics.clone(),
        id: id.clone(),
        start: std::time::Instant::now(),
        status: 200,
        stream: false,
        prompt_tokens: 0,
        completion_tokens: 0,
        outcome: "disconnected",
    });
    let r = chat_inner(s, id, job_id, body, &mut log).await;
    let (resp, status) = match r {
        Ok(r) => (r, 200),
        Err(e) => {
            tracing::debug!(status = %e.status, code = e.code, "{}", e.message);
            let st = e.status.as_u16();
            (e.into_response(), st)
        }
    };
    if let Some(mut l) = log {
        l.status = status;
        l.outcome = if status == 200 { "complete" } else { "error" };
    }
    resp
}

/// One request's choices while they are generated.
struct Gen {
    s: Arc<Served>,
    job_id: u64,
    choices: Vec<Choice>,
    stops: Vec<String>,
    logprobs: bool,
    /// `return_tokens_as_token_ids`.
    token_ids: bool,
    arrived: std::time::Instant,
    first_token: bool,
    last_token: Vec<Option<std::time::Instant>>,
}

impl Gen {
    /// Take one token event: its choice's delta (`None`: the choice had already finished).
    fn push(&mut self, e: &qoq_engine::TokenEvent) -> Option<(usize, output::Delta)> {
        let k = e.rollout;
        let now = std::time::Instant::now();
        if !self.first_token {
            self.first_token = true;
            self.s
                .metrics
                .ttft
                .observe((now - self.arrived).as_secs_f64());
        }
        if let Some(t) = self.last_token.get(k).copied().flatten() {
            self.s.metrics.itl.observe((now - t).as_secs_f64());
        }
        if let Some(slot) = self.last_token.get_mut(k) {
            *slot = Some(now);
        }
        let tok = &self.s.with_format.tokenizer;
        let c = self.choices.get_mut(k)?;
        let d = c.push(tok, e, &self.stops, self.logprobs, self.token_ids)?;
        if d.finish.is_some() && e.finish.is_none() {
            // A stop string ended the choice: its row leaves the batch.
            let _ = self.s.send(Msg::Cancel {
                id: self.job_id,
                rollout: Some(k),
            });
        }
        Some((k, d))
    }

    fn done(&self) -> bool {
        self.choices.iter().all(|c| c.finish.is_some())
    }

    fn completion_tokens(&self) -> usize {
        self.choices.iter().map(|c| c.tokens.len()).sum()
    }

    fn usage(&self, prompt: usize) -> Value {
        let completion = self.completion_tokens();
        json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
    }
}

async fn chat_inner(
    s: Arc<Served>,
    id: String,
    job_id: u64,
    body: Result<Bytes, BytesRejection>,
    log: &mut Option<AccessLog>,
) -> Result<Response, ApiError> {
    let arrived = std::time::Instant::now();
    let deadline = Instant::now() + s.timeout;
    let body = body.map_err(|e| {
        let status = e.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                status,
                "invalid_request_error",
                "body_too_large",
                format!(
                    "the request body is larger than the limit: {}",
                    e.body_text()
                ),
            )
        } else {
            ApiError::new(
                status,
                "invalid_request_error",
                "invalid_body",
                e.body_text(),
            )
        }
    })?;
    let adapters = s.adapters.lock().map(|a| a.clone()).unwrap_or_default();
    let req = request::parse(
        &body,
        &request::Limits {
            served_name: &s.name,
            adapters: &adapters,
            max_images: s.max_images,
            max_tokens_cap: s.max_tokens_cap,
            has_ecg: s.has_ecg,
            vocab_size: s.vocab_size,
        },
    )?;
    drop(body);
    if let Some(l) = log.as_mut() {
        l.stream = req.stream;
    }
    let req = Arc::new(req);
    let slot = admit(&s)?;
    let (s2, r2) = (s.clone(), req.clone());
    let prep = tokio::time::timeout_at(
        deadline,
        tokio::task::spawn_blocking(move || inputs::prepare(&s2, &r2)),
    )
    .await
    .map_err(|_| ApiError::timeout("while decoding its inputs"))?
    .map_err(|e| ApiError::internal(format!("the input task failed: {e}")))??;
    let prompt_tokens = prep.prompt_tokens;
    if let Some(l) = log.as_mut() {
        l.prompt_tokens = prompt_tokens;
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Out>();
    let mut logit_bias = vec![(s.image_token_id, -100.0)];
    logit_bias.extend(req.logit_bias.iter().copied());
    s.send(Msg::Submit(Box::new(Job {
        id: job_id,
        model: req.model.clone(),
        stream: req.stream_id,
        inputs: prep.inputs,
        prompt_tokens,
        n: req.n,
        sampling: SamplingParams {
            temperature: req.temperature,
            top_p: req.top_p,
            seed: req.seed,
            logit_bias,
            presence_penalty: req.presence_penalty,
            frequency_penalty: req.frequency_penalty,
            ..SamplingParams::default()
        },
        stop: StopCondition {
            eos: if req.ignore_eos {
                Vec::new()
            } else {
                s.eos.clone()
            },
            max_new_tokens: req.max_tokens,
        },
        top_logprobs: if req.logprobs { req.top_logprobs } else { 0 },
        deadline: deadline.into_std(),
        tx,
    })))?;
    let mut g = Gen {
        s: s.clone(),
        job_id,
        choices: (0..req.n).map(|_| Choice::default()).collect(),
        stops: req.stop.clone(),
        logprobs: req.logprobs,
        token_ids: req.token_ids,
        arrived,
        first_token: false,
        last_token: vec![None; req.n],
    };
    let created = unix_now();
    if !req.stream {
        let mut lps: Vec<Vec<Value>> = vec![Vec::new(); req.n];
        while !g.done() {
            // The scheduler enforces the deadline; this is the backstop should a step hang.
            let msg = tokio::time::timeout_at(deadline + Duration::from_secs(5), rx.recv())
                .await
                .map_err(|_| ApiError::timeout("while generating"))?;
            match msg {
                Some(Out::Token(e)) => {
                    if let Some((k, d)) = g.push(&e) {
                        lps[k].extend(d.logprobs);
                    }
                }
                Some(Out::Error(e)) => return Err(e),
                None => {
                    return Err(ApiError::internal(
                        "the scheduler ended the request without a result",
                    ));
                }
            }
        }
        drop(slot);
        let choices: Vec<Value> = g
            .choices
            .iter()
            .zip(lps)
            .enumerate()
            .map(|(i, (c, lp))| {
                json!({
                    "index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "finish_reason": c.finish,
                    "logprobs": if req.logprobs { json!({"content": lp}) } else { Value::Null },
                })
            })
            .collect();
        if let Some(l) = log.as_mut() {
            l.completion_tokens = g.completion_tokens();
        }
        let body = json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": req.model.as_deref().unwrap_or(&s.name),
            "choices": choices,
            "usage": g.usage(prompt_tokens),
        });
        return Ok(axum::Json(body).into_response());
    }
    // Streaming: a chunk per token (or per token batch) as the scheduler sends them.
    let chunk = {
        let (id, name) = (
            id.clone(),
            req.model.clone().unwrap_or_else(|| s.name.clone()),
        );
        move |choices: Value, usage: Option<Value>| {
            let mut c = json!({
                "id": id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": name,
                "choices": choices,
            });
            if let Some(u) = usage {
                c["usage"] = u;
            }
            Event::default().data(c.to_string())
        }
    };
    let mut first: Vec<Event> = (0..req.n)
        .map(|k| {
            chunk(
                json!([{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]),
                None,
            )
        })
        .collect();
    first.reverse();
    let state = StreamState {
        rx,
        pending: first,
        done: false,
        g,
        log: log.take(),
        _slot: slot,
        include_usage: req.include_usage,
        logprobs: req.logprobs,
        prompt_tokens,
    };
    let stream = futures_util::stream::unfold(state, move |mut st| {
        let chunk = chunk.clone();
        async move {
            if let Some(e) = st.pending.pop() {
                return Some((Ok::<Event, std::convert::Infallible>(e), st));
            }
            if st.done {
                return None;
            }
            let mut out: Vec<Event> = Vec::new();
            let msg =
                tokio::time::timeout_at(deadline + Duration::from_secs(5), st.rx.recv()).await;
            let mut fail = |st: &mut StreamState, e: ApiError| {
                if let Some(l) = st.log.as_mut() {
                    l.outcome = "error";
                }
                out.push(Event::default().data(e.body().to_string()));
                st.done = true;
            };
            match msg {
                Ok(Some(Out::Token(e))) => {
                    if let Some((k, d)) = st.g.push(&e)
                        && (!d.text.is_empty() || !d.logprobs.is_empty() || d.finish.is_some())
                    {
                        let delta = if d.text.is_empty() {
                            json!({})
                        } else {
                            json!({"content": d.text})
                        };
                        let lp = if st.logprobs {
                            json!({"content": d.logprobs})
                        } else {
                            Value::Null
                        };
                        out.push(chunk(
                                json!([{"index": k, "delta": delta, "logprobs": lp, "finish_reason": d.finish}]),
                                None,
                            ));
                    }
                    if st.g.done() {
                        if st.include_usage {
                            out.push(chunk(json!([]), Some(st.g.usage(st.prompt_tokens))));
                        }
                        out.push(Event::default().data("[DONE]"));
                        st.done = true;
                        if let Some(l) = st.log.as_mut() {
                            l.outcome = "complete";
                        }
                    }
                }
                Ok(Some(Out::Error(e))) => fail(&mut st, e),
                Ok(None) => fail(
                    &mut st,
                    ApiError::internal("the scheduler ended the request without a result"),
                ),
                Err(_) => fail(&mut st, ApiError::timeout("while generating")),
            }
            if let Some(l) = st.log.as_mut() {
                l.completion_tokens = st.g.completion_tokens();
            }
            if out.is_empty() {
                // Nothing to send for this token (text held back): an SSE comment keeps the
                // stream going.
                out.push(Event::default().comment(""));
            }
            out.reverse();
            let e = out.pop()?;
            st.pending = out;
            Some((Ok(e), st))
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

struct StreamState {
    rx: tokio::sync::mpsc::UnboundedReceiver<Out>,
    /// Events to send before reading the channel again (in reverse order).
    pending: Vec<Event>,
    done: bool,
    g: Gen,
    log: Option<AccessLog>,
    _slot: Slot,
    include_usage: bool,
    logprobs: bool,
    prompt_tokens: usize,
}
