//! The chat-completions request body as typed serde structs, and its validation into a
//! [`ChatRequest`]. Unknown fields are refused (400 `unsupported_parameter`, the message naming
//! the field): a parameter that would change the output is never silently ignored.
//!
//! Accepted although unused, because they do not change the output: `user` (an end-user id for
//! the caller's own records) and an image part's `detail` when it is `"auto"` (other values are
//! refused).

use super::ApiError;
use super::inputs::data_uri_payload;
use axum::http::StatusCode;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

/// The request body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatBody {
    model: Option<String>,
    messages: Vec<Message>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    n: Option<u64>,
    seed: Option<i64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    stop: Option<Stop>,
    logprobs: Option<bool>,
    top_logprobs: Option<u64>,
    logit_bias: Option<BTreeMap<String, f64>>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    /// vLLM's extension: keep generating past the end-of-sequence tokens up to `max_tokens`.
    ignore_eos: Option<bool>,
    /// Extension: wrap the question in the QoQ format prompt (default true).
    qoq_format_prompt: Option<bool>,
    /// vLLM's extension: each `logprobs.content` entry's `token` (and its top entries') is
    /// `"token_id:<id>"` instead of the decoded text.
    return_tokens_as_token_ids: Option<bool>,
    /// Extension: the random stream id of the choices (default 0): choice `k` samples from the
    /// stream `(seed, qoq_stream, k)`, as the trainer's engine samples rollout `k` of the prompt
    /// whose stream id this is (`rollout.backend = "openai"` sends it).
    qoq_stream: Option<u64>,
    /// Unused: an end-user id (does not change the output).
    #[allow(dead_code)]
    user: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Message {
    role: Role,
    content: Option<Content>,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Role {
    System,
    Developer,
    User,
    Assistant,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum Part {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
    InputEcg { input_ecg: EcgPart },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageUrl {
    url: String,
    detail: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EcgPart {
    data: String,
    format: Option<String>,
    fs: Option<f64>,
}

/// A request's media before decoding.
pub enum Media {
    /// The base64 payload of a data URI.
    Image(String),
    Ecg {
        data: String,
        format: String,
        fs: Option<f64>,
    },
}

/// A validated request.
pub struct ChatRequest {
    /// The LoRA adapter named by `model` (`None`: the base model).
    pub model: Option<String>,
    /// The last user message (with the placeholders of every image).
    pub question: String,
    pub system: Option<String>,
    /// Earlier turns: role (`user` / `assistant`) and text.
    pub history: Vec<(&'static str, String)>,
    pub media: Vec<Media>,
    pub format_prompt: bool,
    pub temperature: f32,
    pub top_p: f32,
    pub max_tokens: usize,
    pub seed: u64,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    /// Stop strings (at most 4, none empty).
    pub stop: Vec<String>,
    pub logprobs: bool,
    pub top_logprobs: usize,
    /// `logprobs` tokens as `"token_id:<id>"` (vLLM's `return_tokens_as_token_ids`).
    pub token_ids: bool,
    /// The random stream id of the choices (`qoq_stream`).
    pub stream_id: u64,
    /// Token id and bias, in [-100, 100].
    pub logit_bias: Vec<(u32, f32)>,
    pub ignore_eos: bool,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
}

/// Server-side limits and facts the validation needs.
pub struct Limits<'a> {
    pub served_name: &'a str,
    /// The LoRA adapters served beside the base model.
    pub adapters: &'a std::collections::BTreeSet<String>,
    pub max_images: usize,
    pub max_tokens_cap: usize,
    pub has_ecg: bool,
    pub vocab_size: usize,
}

fn bad(code: &'static str, msg: impl Into<String>) -> ApiError {
    ApiError::bad(code, msg)
}

/// The text of a system or assistant message: a string, or its text parts joined.
fn text_only(c: &Option<Content>, i: usize, role: &str) -> Result<String, ApiError> {
    match c {
        Some(Content::Text(t)) => Ok(t.clone()),
        Some(Content::Parts(parts)) => {
            let mut t = String::new();
            for p in parts {
                match p {
                    Part::Text { text } => t.push_str(text),
                    _ => {
                        return Err(bad(
                            "invalid_message",
                            format!("messages[{i}] ({role}): only text parts are accepted"),
                        ));
                    }
                }
            }
            Ok(t)
        }
        None => Err(bad(
            "invalid_message",
            format!("messages[{i}] ({role}) needs a `content`"),
        )),
    }
}

/// Parse and validate a body.
pub fn parse(body: &[u8], l: &Limits) -> Result<ChatRequest, ApiError> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| bad("invalid_json", format!("the body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(bad("invalid_json", "the body must be a JSON object"));
    }
    let b: ChatBody = serde_json::from_value(v).map_err(|e| {
        let m = e.to_string();
        if m.starts_with("unknown field") {
            bad(
                "unsupported_parameter",
                format!("{m} (this server refuses parameters it does not implement)"),
            )
        } else {
            bad("invalid_request", format!("invalid request body: {m}"))
        }
    })?;
    if let Some(m) = &b.model
        && m != l.served_name
        && !l.adapters.contains(m)
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!(
                "the model {m:?} is not served here; this server serves {:?}{}",
                l.served_name,
                if l.adapters.is_empty() {
                    String::new()
                } else {
                    format!(" and the LoRA adapters {:?}", l.adapters)
                }
            ),
        ));
    }
    for (k, x) in [
        ("presence_penalty", b.presence_penalty),
        ("frequency_penalty", b.frequency_penalty),
    ] {
        if let Some(x) = x
            && !(-2.0..=2.0).contains(&x)
        {
            return Err(bad(
                "invalid_penalty",
                format!("`{k}` must be in [-2, 2], got {x}"),
            ));
        }
    }
    // The last user message is the question; earlier user and assistant messages are the
    // conversation's history, rendered with the chat template. Images and the ECG of any user
    // turn go with the question (the QoQ prompt holds its media in one user message, as in
    // training): the placeholders of earlier turns' images come first.
    let last_user = b
        .messages
        .iter()
        .rposition(|m| m.role == Role::User)
        .ok_or_else(|| bad("empty_prompt", "no user message"))?;
    if let Some(i) =
        (last_user + 1..b.messages.len()).find(|&i| b.messages[i].role == Role::Assistant)
    {
        return Err(bad(
            "invalid_message",
            format!(
                "messages[{i}]: an assistant message after the last user message (continuing a partial answer) is not supported"
            ),
        ));
    }
    let mut system: Vec<String> = Vec::new();
    let mut media = Vec::new();
    let mut history: Vec<(&'static str, String)> = Vec::new();
    let mut earlier_images = 0usize;
    let mut question = String::new();
    // The last user message's text parts alone and its image parts: a text that places every
    // image's placeholder itself gets none added by the parts.
    let mut own_text = String::new();
    let mut own_images = 0usize;
    for (i, m) in b.messages.iter().enumerate() {
        match m.role {
            Role::System | Role::Developer => {
                system.push(text_only(&m.content, i, "system")?);
                continue;
            }
            Role::Assistant => {
                history.push(("assistant", text_only(&m.content, i, "assistant")?));
                continue;
            }
            Role::User => {}
        }
        let mut text = String::new();
        let mut push = |t: &str| {
            if !text.is_empty() && !text.ends_with(char::is_whitespace) {
                text.push(' ');
            }
            text.push_str(t);
        };
        let last = i == last_user;
        match &m.content {
            Some(Content::Text(t)) => push(t),
            Some(Content::Parts(parts)) => {
                for (j, p) in parts.iter().enumerate() {
                    let at = format!("messages[{i}].content[{j}]");
                    match p {
                        Part::Text { text } => {
                            if last {
                                if !own_text.is_empty() && !own_text.ends_with(char::is_whitespace)
                                {
                                    own_text.push(' ');
                                }
                                own_text.push_str(text);
                            }
                            push(text)
                        }
                        Part::ImageUrl { image_url } => {
                            if let Some(d) = &image_url.detail
                                && d != "auto"
                            {
                                return Err(bad(
                                    "unsupported_parameter",
                                    format!(
                                        "{at}: `image_url.detail` {d:?} is not implemented (only \"auto\": images get the model's own resize)"
                                    ),
                                ));
                            }
                            media.push(Media::Image(data_uri_payload(&image_url.url, &at)?));
                            if last {
                                own_images += 1;
                                push("<image>");
                            } else {
                                earlier_images += 1;
                            }
                        }
                        Part::InputEcg { input_ecg: e } => {
                            let format = e.format.as_deref().unwrap_or("npy").to_ascii_lowercase();
                            if format != "npy" && format != "csv" {
                                return Err(bad(
                                    "unsupported_ecg_format",
                                    format!(
                                        "{at}: ECG format {format:?} is not accepted; use \"npy\" or \"csv\""
                                    ),
                                ));
                            }
                            media.push(Media::Ecg {
                                data: e.data.clone(),
                                format,
                                fs: e.fs,
                            });
                        }
                    }
                }
            }
            None => {}
        }
        if last {
            let placed = own_images > 0 && own_text.matches("<image>").count() == own_images;
            let text = if placed { own_text.clone() } else { text };
            question = "<image>".repeat(earlier_images) + &text;
        } else {
            history.push(("user", text));
        }
    }
    if question.is_empty() && media.is_empty() {
        return Err(bad(
            "empty_prompt",
            "the last user message has no text, images or ECG",
        ));
    }
    let n_images = media
        .iter()
        .filter(|m| matches!(m, Media::Image(_)))
        .count();
    if n_images > l.max_images {
        return Err(bad(
            "too_many_images",
            format!("{n_images} images, at most {} per request", l.max_images),
        ));
    }
    let n_ecg = media.len() - n_images;
    if n_ecg > 1 {
        return Err(bad(
            "too_many_ecgs",
            format!("{n_ecg} ECG parts, at most one per request"),
        ));
    }
    if n_ecg == 1 && !l.has_ecg {
        return Err(bad(
            "ecg_unsupported",
            "this checkpoint has no ECG path (a stock Qwen2.5-VL); input_ecg needs a QoQ-Med checkpoint",
        ));
    }
    let temperature = b.temperature.unwrap_or(0.5);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(bad(
            "invalid_temperature",
            format!("`temperature` must be in [0, 2], got {temperature}"),
        ));
    }
    let top_p = b.top_p.unwrap_or(0.99);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(bad(
            "invalid_top_p",
            format!("`top_p` must be in (0, 1], got {top_p}"),
        ));
    }
    let max_tokens = match b.max_completion_tokens.or(b.max_tokens) {
        Some(0) => {
            return Err(bad(
                "invalid_max_tokens",
                "`max_tokens` / `max_completion_tokens` must be at least 1",
            ));
        }
        Some(m) => (m as usize).min(l.max_tokens_cap),
        None => l.max_tokens_cap,
    };
    let n = b.n.unwrap_or(1);
    if !(1..=8).contains(&n) {
        return Err(bad("invalid_n", format!("`n` must be in 1..=8, got {n}")));
    }
    let seed = match b.seed {
        None => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
        Some(s) => s as u64,
    };
    let stop = match b.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > 4 {
        return Err(bad(
            "invalid_stop",
            format!("`stop` holds at most 4 strings, got {}", stop.len()),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(bad("invalid_stop", "`stop` strings must not be empty"));
    }
    let logprobs = b.logprobs.unwrap_or(false);
    let top_logprobs = b.top_logprobs.unwrap_or(0);
    if top_logprobs > 20 {
        return Err(bad(
            "invalid_top_logprobs",
            format!("`top_logprobs` must be in 0..=20, got {top_logprobs}"),
        ));
    }
    if top_logprobs > 0 && !logprobs {
        return Err(bad(
            "invalid_top_logprobs",
            "`top_logprobs` needs `logprobs: true`",
        ));
    }
    let mut logit_bias = Vec::new();
    for (k, x) in b.logit_bias.unwrap_or_default() {
        let id: u32 = k
            .parse()
            .ok()
            .filter(|&i| (i as usize) < l.vocab_size)
            .ok_or_else(|| {
                bad(
                    "invalid_logit_bias",
                    format!(
                        "`logit_bias` key {k:?} is not a token id of this model (0..{})",
                        l.vocab_size
                    ),
                )
            })?;
        if !(-100.0..=100.0).contains(&x) {
            return Err(bad(
                "invalid_logit_bias",
                format!("`logit_bias` for token {id} must be in [-100, 100], got {x}"),
            ));
        }
        logit_bias.push((id, x as f32));
    }
    Ok(ChatRequest {
        model: b.model.filter(|m| m != l.served_name),
        question,
        system: (!system.is_empty()).then(|| system.join("\n")),
        history,
        media,
        format_prompt: b.qoq_format_prompt.unwrap_or(true),
        temperature: temperature as f32,
        top_p: top_p as f32,
        max_tokens,
        seed,
        n: n as usize,
        stream: b.stream.unwrap_or(false),
        include_usage: b
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        stop,
        logprobs,
        top_logprobs: top_logprobs as usize,
        token_ids: b.return_tokens_as_token_ids.unwrap_or(false),
        stream_id: b.qoq_stream.unwrap_or(0),
        logit_bias,
        ignore_eos: b.ignore_eos.unwrap_or(false),
        presence_penalty: b.presence_penalty.unwrap_or(0.0) as f32,
        frequency_penalty: b.frequency_penalty.unwrap_or(0.0) as f32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits<'static> {
        static NONE: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
        Limits {
            served_name: "m",
            adapters: &NONE,
            max_images: 4,
            max_tokens_cap: 16,
            has_ecg: true,
            vocab_size: 100,
        }
    }

    fn parse_json(v: serde_json::Value) -> ChatRequest {
        parse(v.to_string().as_bytes(), &limits()).unwrap_or_else(|e| panic!("{}", e.message))
    }

    #[test]
    fn a_text_placing_every_image_gets_no_placeholder_added() {
        let img = serde_json::json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}});
        let text = |t: &str| serde_json::json!({"type": "text", "text": t});
        // The trainer's form: the question with its placeholders, then the images.
        let r = parse_json(serde_json::json!({"messages": [{"role": "user",
            "content": [text("<image>Case 1. <image>What?"), img.clone(), img.clone()]}]}));
        assert_eq!(r.question, "<image>Case 1. <image>What?");
        // Without placeholders in the text the parts add them, as before.
        let r = parse_json(serde_json::json!({"messages": [{"role": "user",
            "content": [img.clone(), text("What?")]}]}));
        assert_eq!(r.question, "<image> What?");
        // A count that does not match keeps the parts' placeholders (the processor refuses it).
        let r = parse_json(serde_json::json!({"messages": [{"role": "user",
            "content": [text("<image>What?"), img.clone(), img]}]}));
        assert_eq!(r.question, "<image>What? <image> <image>");
    }

    #[test]
    fn token_ids_and_the_stream_are_read_with_their_defaults() {
        let r = parse_json(serde_json::json!({"messages": [{"role": "user", "content": "q"}]}));
        assert!(!r.token_ids);
        assert_eq!(r.stream_id, 0);
        let r = parse_json(
            serde_json::json!({"messages": [{"role": "user", "content": "q"}],
            "logprobs": true, "return_tokens_as_token_ids": true, "qoq_stream": 42}),
        );
        assert!(r.token_ids);
        assert_eq!(r.stream_id, 42);
    }
}
