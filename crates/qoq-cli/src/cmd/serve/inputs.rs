//! A request's media decoded and its case built ([`qoq_processor::Case`], the case builder
//! `qoq infer` uses), giving the model inputs.

use super::request::{ChatRequest, Media};
use super::{ApiError, Served};
use axum::http::StatusCode;
use base64::Engine as _;
use qoq_processor::processor::Processor;
use qoq_processor::{Case, CaseEcg, CaseImage};
use std::io::Write as _;
use std::sync::atomic::Ordering;

/// The payload of a `data:image/...;base64,` URI; remote URLs are refused.
pub(super) fn data_uri_payload(url: &str, at: &str) -> Result<String, ApiError> {
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
pub(super) struct Prepared {
    pub inputs: qoq_model::ModelInputs,
    pub prompt_tokens: usize,
}

pub(super) fn prepare(s: &Served, r: &ChatRequest) -> Result<Prepared, ApiError> {
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
        history: r
            .history
            .iter()
            .map(|(role, text)| qoq_processor::prompt::Message {
                role: role.to_string(),
                content: qoq_processor::prompt::Content::Text(text.clone()),
            })
            .collect(),
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
    let inputs = qoq_model::prompt_inputs(&batch, &s.device)
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
