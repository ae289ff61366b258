//! `qoq serve`: an OpenAI-compatible HTTP server over one QoQ-Med checkpoint (issue 10). The
//! prompt, image and ECG paths are those of `qoq infer` (spec §4 processor, §5.1 ECG input,
//! §7 generation); only the transport is new.
//!
//! Endpoints:
//!
//! * `GET /health`: `{"status": "ok", "model", "running_or_queued", "capacity"}`;
//! * `GET /v1/models`: the one served model (`--served-model-name`);
//! * `POST /v1/chat/completions`: the chat-completions API, streamed (server-sent events,
//!   `data: {chunk}` lines with `choices[i].delta.content`, a last chunk per choice carrying its
//!   `finish_reason`, an optional usage chunk with `stream_options.include_usage`, then
//!   `data: [DONE]`) or not.
//!
//! Messages: `user` messages form the question (the QoQ prompt is single-turn; `assistant`
//! messages are ignored); the text of `system` and `developer` messages, joined by newlines,
//! replaces the chat template's default system message. A user `content` is a string or a list
//! of parts, concatenated in order, with one `<image>` placeholder per image part:
//!
//! * `{"type": "text", "text": ...}`;
//! * `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`: base64 data
//!   URIs only (PNG, JPEG, BMP, TIFF, WebP, GIF); `http(s)://` URLs are refused (400,
//!   `remote_url_refused`): the server never fetches other hosts;
//! * `{"type": "input_ecg", "input_ecg": {"data": "<base64>", "format": "npy" | "csv",
//!   "fs": 500}}` (extension, at most one per request, QoQ-Med checkpoints only): `npy` is a
//!   NumPy `.npy` file holding a leads x samples (or samples x leads) array at `fs` Hz (500 when
//!   absent); `csv` has a header row of lead names and one row per sample, at `fs` Hz, else at
//!   the rate of its `time` column, else 500 Hz. WFDB, DICOM and `.npz` are not accepted here
//!   (use `qoq infer`).
//!
//! The case is built by the library's case builder ([`qoq_processor::Case`]), as `qoq infer`
//! builds its case and as training builds the equivalent manifest row: images go through the
//! dataset-side resize, an ECG-only request gets the white placeholder image with its
//! `<image>` placeholder plus the time-series token, a text-only request the placeholder image
//! and a zero ECG. The processor settings are the model folder's `qoq_processor.json` (those it
//! was trained with) when it has one, else the defaults.
//!
//! Request fields: `model` (must name the served model when given), `messages`, `temperature`
//! (default 0.5, the reference's validation temperature), `top_p` (default 0.99), `max_tokens`
//! or `max_completion_tokens` (default and ceiling `--max-tokens-cap`; larger values are
//! clamped to it), `seed` (default: from the clock), `n` (1..=8), `stream`,
//! `stream_options.include_usage`, and the extension `qoq_format_prompt` (default true: the
//! QoQ format prompt wraps the question; false: the question is used as is). Other fields
//! (`stop`, `logprobs`, tools, ...) are ignored. `usage` counts the prompt tokens (image pads
//! included) and the generated tokens of all choices.
//!
//! Limits, each refused with `{"error": {"message", "type", "code"}}`: the body size
//! (`--max-body-bytes`, 413 `body_too_large`), the pixels of one image read from its header
//! before decoding (`--max-image-pixels`, 413 `image_too_large`), the number of images
//! (`--max-images`, 400), the token budget (clamped), the admission queue (one request
//! generates, `--queue-size` more wait; beyond that 429 `queue_full`), and a per-request
//! deadline (`--timeout-s`, 504 `timeout`). The model runs on blocking threads, one generation
//! at a time; a generation past the deadline is not interrupted (candle has no cancellation):
//! it finishes in the background while the client already has its 504, so `max_tokens` bounds
//! the work a request can cause.

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use candle_core::{DType, Device};
use clap::Args;
use qoq_core::FinishReason;
use qoq_engine::{
    GenerateConfig, Generated, GroupRequest, SamplingParams, StopCondition, generate,
};
use qoq_model::ClinicalVlm;
use qoq_processor::processor::Processor;
use qoq_processor::{Case, CaseEcg, CaseImage};
use serde_json::{Value, json};
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port; the address is printed on stdout).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// The model id of `/v1/models` and of responses.
    #[arg(long, default_value = "qoq-med")]
    served_model_name: String,
    /// Requests allowed to wait while one generates; more get 429.
    #[arg(long, default_value_t = 8)]
    queue_size: usize,
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
    /// Write each request's processed inputs (the `qoq process` safetensors layout) into this
    /// folder as `request-<k>.safetensors` (for tests comparing them with the manifest path's).
    #[arg(long, hide = true)]
    dump_inputs: Option<PathBuf>,
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

/// The loaded model and what requests share.
struct Served {
    name: String,
    created: u64,
    model: ClinicalVlm,
    /// The processor with the QoQ format prompt, and the one without.
    with_format: Processor,
    plain: Processor,
    image_token_id: u32,
    has_ecg: bool,
    /// Held while generating: one generation at a time.
    worker: Arc<tokio::sync::Mutex<()>>,
    /// Requests admitted and not finished (running or waiting).
    admitted: AtomicUsize,
    next_id: AtomicU64,
    /// Requests prepared so far (the case ids).
    next_request: AtomicU64,
    queue_size: usize,
    max_images: usize,
    max_image_pixels: u64,
    max_tokens_cap: usize,
    timeout: Duration,
    dump_inputs: Option<PathBuf>,
}

/// An admission slot; frees itself when dropped.
struct Slot(Arc<Served>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.admitted.fetch_sub(1, Ordering::SeqCst);
    }
}

fn admit(s: &Arc<Served>) -> Result<Slot, ApiError> {
    let cap = 1 + s.queue_size;
    s.admitted
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            (n < cap).then_some(n + 1)
        })
        .map_err(|_| {
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "queue_full",
                format!(
                    "the server is busy ({cap} requests running or queued, --queue-size {}); retry later",
                    s.queue_size
                ),
            )
        })?;
    Ok(Slot(s.clone()))
}

/// Load the model and serve until Ctrl-C.
pub fn run(a: ServeArgs) -> anyhow::Result<ExitCode> {
    let load =
        |format: bool| crate::cmd::infer::model_processor(&a.model, a.tokenizer.as_deref(), format);
    let (with_format, plain) = (load(true)?, load(false)?);
    if let Some(d) = &a.dump_inputs {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let (cfg, model) = qoq_model::loading::load_model(&a.model, DType::F32, &Device::Cpu)
        .with_context(|| format!("loading the model in {}", a.model.display()))?;
    let served = Arc::new(Served {
        name: a.served_model_name.clone(),
        created: unix_now(),
        model,
        with_format,
        plain,
        image_token_id: cfg.image_token_id,
        has_ecg: cfg.has_time_series(),
        worker: Arc::new(tokio::sync::Mutex::new(())),
        admitted: AtomicUsize::new(0),
        next_id: AtomicU64::new(0),
        next_request: AtomicU64::new(0),
        queue_size: a.queue_size,
        max_images: a.max_images,
        max_image_pixels: a.max_image_pixels,
        max_tokens_cap: a.max_tokens_cap.max(1),
        timeout: Duration::from_secs(a.timeout_s.max(1)),
        dump_inputs: a.dump_inputs.clone(),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
            .await
            .with_context(|| format!("binding {}:{}", a.host, a.port))?;
        let addr = listener.local_addr()?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on http://{addr}")?;
        out.flush()?;
        drop(out);
        tracing::info!(%addr, model = %served.name, ecg = served.has_ecg, "serving");
        axum::serve(listener, router(served, a.max_body_bytes))
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .context("serving")?;
        Ok(ExitCode::SUCCESS)
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn router(s: Arc<Served>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(s)
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "not_found",
        "no such endpoint: use /health, /v1/models or /v1/chat/completions".into(),
    )
}

async fn health(State(s): State<Arc<Served>>) -> Response {
    axum::Json(json!({
        "status": "ok",
        "model": s.name,
        "running_or_queued": s.admitted.load(Ordering::SeqCst),
        "capacity": 1 + s.queue_size,
    }))
    .into_response()
}

async fn models(State(s): State<Arc<Served>>) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{"id": s.name, "object": "model", "created": s.created, "owned_by": "qoq-med-rs"}],
    }))
    .into_response()
}

/// A request's media before decoding.
enum Media {
    /// The base64 payload of a data URI.
    Image(String),
    Ecg {
        data: String,
        format: String,
        fs: Option<f64>,
    },
}

/// A validated request.
struct ChatRequest {
    question: String,
    system: Option<String>,
    media: Vec<Media>,
    format_prompt: bool,
    temperature: f32,
    top_p: f32,
    max_tokens: usize,
    seed: u64,
    n: usize,
    stream: bool,
    include_usage: bool,
}

fn field<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| !x.is_null())
}

fn number(v: &Value, key: &str) -> Result<Option<f64>, ApiError> {
    field(v, key)
        .map(|x| {
            x.as_f64()
                .ok_or_else(|| ApiError::bad("invalid_type", format!("`{key}` must be a number")))
        })
        .transpose()
}

fn count(v: &Value, key: &str) -> Result<Option<u64>, ApiError> {
    field(v, key)
        .map(|x| {
            x.as_u64().ok_or_else(|| {
                ApiError::bad(
                    "invalid_type",
                    format!("`{key}` must be a non-negative integer"),
                )
            })
        })
        .transpose()
}

fn flag(v: &Value, key: &str) -> Result<Option<bool>, ApiError> {
    field(v, key)
        .map(|x| {
            x.as_bool()
                .ok_or_else(|| ApiError::bad("invalid_type", format!("`{key}` must be a boolean")))
        })
        .transpose()
}

/// The payload of a `data:image/...;base64,` URI; remote URLs are refused.
fn data_uri_payload(url: &str, at: &str) -> Result<String, ApiError> {
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        return Err(ApiError::bad(
            "remote_url_refused",
            format!(
                "{at}: remote image URLs are not fetched (the server does not contact other hosts); send the image inline as a data URI, e.g. data:image/png;base64,..."
            ),
        ));
    }
    let Some(rest) = url.strip_prefix("data:") else {
        return Err(ApiError::bad(
            "invalid_image_url",
            format!("{at}: only data URIs (data:image/png;base64,...) are accepted"),
        ));
    };
    let Some((meta, payload)) = rest.split_once(',') else {
        return Err(ApiError::bad(
            "invalid_image_url",
            format!("{at}: a data URI needs a comma before its payload"),
        ));
    };
    let Some(mime) = meta.strip_suffix(";base64") else {
        return Err(ApiError::bad(
            "invalid_image_url",
            format!("{at}: the data URI must be base64 (data:image/...;base64,...)"),
        ));
    };
    if !mime.starts_with("image/") {
        return Err(ApiError::bad(
            "invalid_image_url",
            format!("{at}: the data URI's media type is {mime:?}, not image/*"),
        ));
    }
    Ok(payload.to_string())
}

fn parse_request(body: &[u8], s: &Served) -> Result<ChatRequest, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad("invalid_json", format!("the body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad(
            "invalid_json",
            "the body must be a JSON object",
        ));
    }
    if let Some(m) = field(&v, "model") {
        let m = m
            .as_str()
            .ok_or_else(|| ApiError::bad("invalid_type", "`model` must be a string"))?;
        if m != s.name {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                format!(
                    "the model {m:?} is not served here; this server serves {:?}",
                    s.name
                ),
            ));
        }
    }
    let messages = field(&v, "messages")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::bad("missing_messages", "`messages` must be a list"))?;
    let mut pieces: Vec<String> = Vec::new();
    let mut system: Vec<String> = Vec::new();
    let mut media = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).ok_or_else(|| {
            ApiError::bad(
                "invalid_message",
                format!("messages[{i}] needs a string `role`"),
            )
        })?;
        if role == "system" || role == "developer" {
            system.push(system_text(m, i)?);
            continue;
        }
        if role != "user" {
            continue;
        }
        let mut text = String::new();
        let mut push = |t: &str| {
            if !text.is_empty() && !text.ends_with(char::is_whitespace) {
                text.push(' ');
            }
            text.push_str(t);
        };
        match m.get("content") {
            Some(Value::String(t)) => push(t),
            Some(Value::Array(parts)) => {
                for (j, p) in parts.iter().enumerate() {
                    let at = format!("messages[{i}].content[{j}]");
                    match p.get("type").and_then(Value::as_str) {
                        Some("text") => {
                            push(p.get("text").and_then(Value::as_str).ok_or_else(|| {
                                ApiError::bad("invalid_part", format!("{at} needs a string `text`"))
                            })?)
                        }
                        Some("image_url") => {
                            let url = p
                                .get("image_url")
                                .and_then(|u| u.get("url").or(Some(u)))
                                .and_then(Value::as_str)
                                .ok_or_else(|| {
                                    ApiError::bad(
                                        "invalid_part",
                                        format!("{at} needs `image_url.url`"),
                                    )
                                })?;
                            media.push(Media::Image(data_uri_payload(url, &at)?));
                            push("<image>");
                        }
                        Some("input_ecg") => {
                            let e = p.get("input_ecg").ok_or_else(|| {
                                ApiError::bad("invalid_part", format!("{at} needs `input_ecg`"))
                            })?;
                            let data = e.get("data").and_then(Value::as_str).ok_or_else(|| {
                                ApiError::bad(
                                    "invalid_part",
                                    format!("{at} needs a base64 string `input_ecg.data`"),
                                )
                            })?;
                            let format = e
                                .get("format")
                                .and_then(Value::as_str)
                                .unwrap_or("npy")
                                .to_ascii_lowercase();
                            if format != "npy" && format != "csv" {
                                return Err(ApiError::bad(
                                    "unsupported_ecg_format",
                                    format!(
                                        "{at}: ECG format {format:?} is not accepted; use \"npy\" or \"csv\""
                                    ),
                                ));
                            }
                            let fs = number(e, "fs")?;
                            media.push(Media::Ecg {
                                data: data.to_string(),
                                format,
                                fs,
                            });
                        }
                        other => {
                            return Err(ApiError::bad(
                                "invalid_part",
                                format!(
                                    "{at}: unsupported part type {other:?} (text, image_url, input_ecg)"
                                ),
                            ));
                        }
                    }
                }
            }
            Some(Value::Null) | None => {}
            Some(_) => {
                return Err(ApiError::bad(
                    "invalid_message",
                    format!("messages[{i}].content must be a string or a list of parts"),
                ));
            }
        }
        if !text.is_empty() {
            pieces.push(text);
        }
    }
    if pieces.is_empty() && media.is_empty() {
        return Err(ApiError::bad(
            "empty_prompt",
            "no user message with text, images or an ECG",
        ));
    }
    let n_images = media
        .iter()
        .filter(|m| matches!(m, Media::Image(_)))
        .count();
    if n_images > s.max_images {
        return Err(ApiError::bad(
            "too_many_images",
            format!("{n_images} images, at most {} per request", s.max_images),
        ));
    }
    let n_ecg = media.len() - n_images;
    if n_ecg > 1 {
        return Err(ApiError::bad(
            "too_many_ecgs",
            format!("{n_ecg} ECG parts, at most one per request"),
        ));
    }
    if n_ecg == 1 && !s.has_ecg {
        return Err(ApiError::bad(
            "ecg_unsupported",
            "this checkpoint has no ECG path (a stock Qwen2.5-VL); input_ecg needs a QoQ-Med checkpoint",
        ));
    }
    let temperature = number(&v, "temperature")?.unwrap_or(0.5);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad(
            "invalid_temperature",
            format!("`temperature` must be in [0, 2], got {temperature}"),
        ));
    }
    let top_p = number(&v, "top_p")?.unwrap_or(0.99);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad(
            "invalid_top_p",
            format!("`top_p` must be in (0, 1], got {top_p}"),
        ));
    }
    let max_tokens = match count(&v, "max_completion_tokens")?.or(count(&v, "max_tokens")?) {
        Some(0) => {
            return Err(ApiError::bad(
                "invalid_max_tokens",
                "`max_tokens` must be at least 1",
            ));
        }
        Some(m) => (m as usize).min(s.max_tokens_cap),
        None => s.max_tokens_cap,
    };
    let n = count(&v, "n")?.unwrap_or(1);
    if !(1..=8).contains(&n) {
        return Err(ApiError::bad(
            "invalid_n",
            format!("`n` must be in 1..=8, got {n}"),
        ));
    }
    let seed = match field(&v, "seed") {
        None => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
        Some(x) => x
            .as_i64()
            .map(|i| i as u64)
            .or(x.as_u64())
            .ok_or_else(|| ApiError::bad("invalid_type", "`seed` must be an integer"))?,
    };
    let include_usage = field(&v, "stream_options")
        .map(|o| flag(o, "include_usage"))
        .transpose()?
        .flatten()
        .unwrap_or(false);
    Ok(ChatRequest {
        question: pieces.join("\n"),
        system: (!system.is_empty()).then(|| system.join("\n")),
        media,
        format_prompt: flag(&v, "qoq_format_prompt")?.unwrap_or(true),
        temperature: temperature as f32,
        top_p: top_p as f32,
        max_tokens,
        seed,
        n: n as usize,
        stream: flag(&v, "stream")?.unwrap_or(false),
        include_usage,
    })
}

/// The text of a system or developer message: a string, or its text parts joined.
fn system_text(m: &Value, i: usize) -> Result<String, ApiError> {
    let bad =
        |what: &str| ApiError::bad("invalid_message", format!("messages[{i}] (system): {what}"));
    match m.get("content") {
        Some(Value::String(t)) => Ok(t.clone()),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(
                |p| match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => Ok(t.as_str()),
                    _ => Err(bad("only text parts are accepted")),
                },
            )
            .collect::<Result<Vec<_>, _>>()
            .map(|v| v.concat()),
        _ => Err(bad("`content` must be a string or a list of text parts")),
    }
}

fn b64(data: &str, what: &str) -> Result<Vec<u8>, ApiError> {
    let clean: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(clean)
        .map_err(|e| ApiError::bad("invalid_base64", format!("{what}: invalid base64: {e}")))
}

/// Decode one image, refusing it from its header when it has too many pixels.
fn decode_image(payload: &str, k: usize, max_pixels: u64) -> Result<image::RgbImage, ApiError> {
    let what = format!("image {k}");
    let bytes = b64(payload, &what)?;
    let reader = || {
        image::ImageReader::new(std::io::Cursor::new(&bytes))
            .with_guessed_format()
            .map_err(|e| ApiError::bad("invalid_image", format!("{what}: {e}")))
    };
    let (w, h) = qoq_data::guard::catch(|| reader().map(|r| r.into_dimensions()))
        .map_err(|p| {
            ApiError::bad(
                "invalid_image",
                format!("{what}: the image header decoder failed on it (it panicked: {p})"),
            )
        })??
        .map_err(|e| ApiError::bad("invalid_image", format!("{what}: unreadable header: {e}")))?;
    let pixels = w as u64 * h as u64;
    if pixels > max_pixels {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "image_too_large",
            format!("{what} is {w}x{h} = {pixels} pixels, more than the limit of {max_pixels}"),
        ));
    }
    let mut r = reader()?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    r.limits(limits);
    // behind the data layer's decoder boundary: a decoder that panics on a damaged image gives
    // a 400 naming the image, and the server goes on
    let img = qoq_data::guard::catch(|| r.decode())
        .map_err(|p| {
            ApiError::bad(
                "invalid_image",
                format!("{what}: the image decoder failed on it (it panicked: {p})"),
            )
        })?
        .map_err(|e| ApiError::bad("invalid_image", format!("{what}: {e}")))?;
    if img.width() == 0 || img.height() == 0 {
        return Err(ApiError::bad(
            "invalid_image",
            format!("{what} has no pixels ({} x {})", img.width(), img.height()),
        ));
    }
    Ok(img.to_rgb8())
}

/// Decode the ECG part to a signal (the case builder makes it the model's (8, 2500) input).
fn decode_ecg(
    data: &str,
    format: &str,
    fs: Option<f64>,
    p: &Processor,
) -> Result<qoq_data::ecg::EcgSignal, ApiError> {
    let bytes = b64(data, "input_ecg")?;
    let bad = |m: String| ApiError::bad("invalid_ecg", format!("input_ecg ({format}): {m}"));
    let mut opts = p.opts.ecg_load.clone();
    let sig = if format == "npy" {
        opts.fs = Some(fs.unwrap_or(500.0));
        let arr = qoq_data::guard::catch(|| qoq_data::npy::parse_npy(&bytes))
            .map_err(|p| bad(format!("the .npy decoder failed on it (it panicked: {p})")))?
            .map_err(bad)?;
        qoq_data::ecg_io::array_to_signal(&arr.shape, &arr.data, &opts).map_err(bad)?
    } else {
        let mut f = tempfile::Builder::new()
            .suffix(".csv")
            .tempfile()
            .map_err(|e| ApiError::internal(format!("temporary file: {e}")))?;
        f.write_all(&bytes)
            .map_err(|e| ApiError::internal(format!("temporary file: {e}")))?;
        opts.fs = fs;
        match qoq_data::ecg_io::read_csv(f.path(), &opts) {
            Ok(s) => s,
            Err(e) if fs.is_none() && e.to_string().contains("no sampling frequency") => {
                opts.fs = Some(500.0);
                qoq_data::ecg_io::read_csv(f.path(), &opts).map_err(|e| bad(e.to_string()))?
            }
            Err(e) => return Err(bad(e.to_string())),
        }
    };
    // Refuse a signal the model input cannot take here, as a bad request.
    p.ecg_input(&sig).map_err(bad)?;
    Ok(sig)
}

/// Everything the worker needs: the model inputs and the prompt length.
struct Prepared {
    inputs: qoq_model::ModelInputs,
    prompt_tokens: usize,
}

fn prepare(s: &Served, r: &ChatRequest) -> Result<Prepared, ApiError> {
    let t = std::time::Instant::now();
    let p = if r.format_prompt {
        &s.with_format
    } else {
        &s.plain
    };
    let k = s.next_request.fetch_add(1, Ordering::Relaxed);
    let mut case = Case {
        id: format!("request-{k}"),
        question: r.question.clone(),
        system: r.system.clone(),
        ..Case::default()
    };
    for m in &r.media {
        match m {
            Media::Image(payload) => {
                case.images
                    .push(CaseImage::Decoded(image::DynamicImage::ImageRgb8(
                        decode_image(payload, case.images.len(), s.max_image_pixels)?,
                    )))
            }
            Media::Ecg { data, format, fs } => {
                case.ecg = Some(CaseEcg::Signal(decode_ecg(data, format, *fs, p)?))
            }
        }
    }
    let processed = p
        .process_case(&case)
        .map_err(|e| ApiError::bad("invalid_prompt", e.to_string()))?;
    let batch = p
        .collate(std::slice::from_ref(&processed), None)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    if let Some(dir) = &s.dump_inputs {
        crate::cmd::process::write_batch(&batch, &dir.join(format!("{}.safetensors", case.id)))
            .map_err(|e| ApiError::internal(format!("{e:#}")))?;
    }
    let inputs = qoq_model::prompt_inputs(&batch, &Device::Cpu)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    tracing::debug!(
        prompt_tokens = batch.seq_len(),
        ms = t.elapsed().as_millis() as u64,
        "inputs ready"
    );
    Ok(Prepared {
        inputs,
        prompt_tokens: batch.seq_len(),
    })
}

/// Generate the choices; `on_token(group, choice, token)` sees every token as it comes.
fn run_model(
    s: &Served,
    r: &ChatRequest,
    prep: Prepared,
    on_token: impl FnMut(usize, usize, u32),
) -> Result<Vec<Generated>, ApiError> {
    let t = std::time::Instant::now();
    let ids = s.with_format.tokenizer.ids;
    let cfg = GenerateConfig {
        sampling: SamplingParams {
            temperature: r.temperature,
            top_p: r.top_p,
            seed: r.seed,
            logit_bias: vec![(s.image_token_id, -100.0)],
            ..SamplingParams::default()
        },
        stop: StopCondition {
            eos: vec![ids.im_end, ids.endoftext],
            max_new_tokens: r.max_tokens,
        },
        max_batch_rows: r.n,
    };
    let mut out = generate(
        &s.model,
        &[GroupRequest {
            inputs: prep.inputs,
            n: r.n,
            stream: 0,
        }],
        &cfg,
        on_token,
    )
    .map_err(|e| ApiError::internal(format!("generation failed: {e}")))?;
    let gens = out.pop().unwrap_or_default();
    tracing::debug!(
        choices = gens.len(),
        tokens = gens.iter().map(|g| g.tokens.len()).sum::<usize>(),
        ms = t.elapsed().as_millis() as u64,
        "generated"
    );
    Ok(gens)
}

fn finish_name(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn usage(prompt: usize, gens: &[Generated]) -> Value {
    let completion: usize = gens.iter().map(|g| g.tokens.len()).sum();
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

async fn chat(State(s): State<Arc<Served>>, body: Result<Bytes, BytesRejection>) -> Response {
    match chat_inner(s, body).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(status = %e.status, code = e.code, "{}", e.message);
            e.into_response()
        }
    }
}

async fn chat_inner(
    s: Arc<Served>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
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
    let req = Arc::new(parse_request(&body, &s)?);
    drop(body);
    let slot = admit(&s)?;
    let (s2, r2) = (s.clone(), req.clone());
    let prep = tokio::time::timeout_at(
        deadline,
        tokio::task::spawn_blocking(move || prepare(&s2, &r2)),
    )
    .await
    .map_err(|_| ApiError::timeout("while decoding its inputs"))?
    .map_err(|e| ApiError::internal(format!("the input task failed: {e}")))??;
    let guard = tokio::time::timeout_at(deadline, s.worker.clone().lock_owned())
        .await
        .map_err(|_| ApiError::timeout("waiting for the model"))?;
    let id = format!("chatcmpl-{}", s.next_id.fetch_add(1, Ordering::Relaxed));
    let created = unix_now();
    let prompt_tokens = prep.prompt_tokens;
    if !req.stream {
        let (s2, r2) = (s.clone(), req.clone());
        let task = tokio::task::spawn_blocking(move || {
            let _hold = (guard, slot);
            run_model(&s2, &r2, prep, |_, _, _| {})
        });
        let gens = tokio::time::timeout_at(deadline, task)
            .await
            .map_err(|_| ApiError::timeout("while generating"))?
            .map_err(|e| ApiError::internal(format!("the generation task failed: {e}")))??;
        let tok = &s.with_format.tokenizer;
        let mut choices = Vec::with_capacity(gens.len());
        for (i, g) in gens.iter().enumerate() {
            let text = tok
                .decode(&g.tokens, true)
                .map_err(|e| ApiError::internal(e.to_string()))?;
            choices.push(json!({
                "index": i,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_name(g.finish),
                "logprobs": null,
            }));
        }
        let body = json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": s.name,
            "choices": choices,
            "usage": usage(prompt_tokens, &gens),
        });
        return Ok(axum::Json(body).into_response());
    }
    // Streaming: the worker sends text deltas; the response turns them into SSE chunks.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<StreamMsg>();
    let (s2, r2) = (s.clone(), req.clone());
    tokio::task::spawn_blocking(move || {
        let _hold = (guard, slot);
        let tok = &s2.with_format.tokenizer;
        let n = r2.n;
        let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); n];
        let mut sent = vec![0usize; n];
        let result = run_model(&s2, &r2, prep, |_, k, t| {
            tokens[k].push(t);
            // Send the newly decodable text; hold back an incomplete UTF-8 sequence.
            if let Ok(text) = tok.decode(&tokens[k], true)
                && text.len() > sent[k]
                && !text.ends_with('\u{FFFD}')
                && text.is_char_boundary(sent[k])
            {
                let _ = tx.send(StreamMsg::Delta(k, text[sent[k]..].to_string()));
                sent[k] = text.len();
            }
        });
        let result = result.map(|gens| {
            let tails = gens
                .iter()
                .enumerate()
                .map(|(k, g)| {
                    let text = tok.decode(&g.tokens, true).unwrap_or_default();
                    (
                        text.get(sent[k]..).unwrap_or("").to_string(),
                        finish_name(g.finish),
                    )
                })
                .collect();
            (tails, usage(prompt_tokens, &gens))
        });
        let _ = tx.send(StreamMsg::Done(result));
    });
    let chunk = {
        let (id, name) = (id.clone(), s.name.clone());
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
                json!([{"index": k, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]),
                None,
            )
        })
        .collect();
    first.reverse();
    let include_usage = req.include_usage;
    let state = StreamState {
        rx,
        pending: first,
        done: false,
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
            let msg = tokio::time::timeout_at(deadline, st.rx.recv()).await;
            let mut out: Vec<Event> = Vec::new();
            match msg {
                Ok(Some(StreamMsg::Delta(k, text))) => out.push(chunk(
                    json!([{"index": k, "delta": {"content": text}, "finish_reason": null}]),
                    None,
                )),
                Ok(Some(StreamMsg::Done(Ok((tails, usage))))) => {
                    for (k, (tail, finish)) in tails.into_iter().enumerate() {
                        let delta = if tail.is_empty() {
                            json!({})
                        } else {
                            json!({"content": tail})
                        };
                        out.push(chunk(
                            json!([{"index": k, "delta": delta, "finish_reason": finish}]),
                            None,
                        ));
                    }
                    if include_usage {
                        out.push(chunk(json!([]), Some(usage)));
                    }
                    out.push(Event::default().data("[DONE]"));
                    st.done = true;
                }
                Ok(Some(StreamMsg::Done(Err(e)))) => {
                    out.push(Event::default().data(e.body().to_string()));
                    st.done = true;
                }
                Ok(None) => {
                    let e = ApiError::internal("the generation task ended without a result");
                    out.push(Event::default().data(e.body().to_string()));
                    st.done = true;
                }
                Err(_) => {
                    let e = ApiError::timeout("while generating");
                    out.push(Event::default().data(e.body().to_string()));
                    st.done = true;
                }
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

/// Text deltas of the choices, then the end (per choice: the undelivered text and the finish
/// reason; the usage) or an error.
type StreamEnd = Result<(Vec<(String, &'static str)>, Value), ApiError>;

enum StreamMsg {
    Delta(usize, String),
    Done(StreamEnd),
}

struct StreamState {
    rx: tokio::sync::mpsc::UnboundedReceiver<StreamMsg>,
    /// Events to send before reading the channel again (in reverse order).
    pending: Vec<Event>,
    done: bool,
}
