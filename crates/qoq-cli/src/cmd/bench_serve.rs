//! `qoq bench serve`: a bounded load generator against `qoq serve` on loopback.
//!
//! It starts the server twice on the same model (by default the tiny random model of
//! `qoq bench train-step --size tiny`): batched (`--max-running` = the largest concurrency) and
//! the one-at-a-time baseline (`--max-running 1`), both with a queue as large as the largest
//! concurrency, so that no request is refused. Against each, for each concurrency level and each
//! mix (text only; every second request with an image), it sends a fixed number of streamed
//! requests with mixed prompt lengths (three sizes) and output lengths (three sizes,
//! `ignore_eos` so that they are exact) and measures per request the time to the first content
//! chunk (TTFT), the gaps between content chunks (inter-token latency) and the generated tokens
//! (the usage chunk). It prints one row per run: requests answered, errors, wall time,
//! throughput (generated tokens/s, requests/s), TTFT and inter-token latency p50/p99, and the
//! batched server's throughput over the baseline's at each concurrency.

use anyhow::Context;
use base64::Engine as _;
use clap::Args;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, ExitCode, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Arguments of `qoq bench serve`.
#[derive(Debug, Args)]
pub struct ServeBenchArgs {
    /// Model folder (default: the tiny random model, written to a temporary folder).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Requests per run (one run per server, mix and concurrency).
    #[arg(long, default_value_t = 128)]
    pub requests: usize,
    /// Concurrency levels (clients sending at once), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    pub concurrency: Vec<usize>,
    /// The three output lengths (tokens, end-of-sequence ignored), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "8,32,64")]
    pub output_tokens: Vec<usize>,
    /// Skip the mix with images.
    #[arg(long)]
    pub no_images: bool,
    /// Write the results as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Where the servers run the model (their `--device`).
    #[command(flatten)]
    pub device: crate::cmd::DeviceArgs,
}

/// A running `qoq serve`; killed when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_server(
    model: &std::path::Path,
    device: qoq_model::DeviceSpec,
    max_running: usize,
    queue: usize,
    cap: usize,
) -> anyhow::Result<Server> {
    let exe = std::env::current_exe().context("locating the qoq binary")?;
    let mut child = std::process::Command::new(exe)
        .arg("serve")
        .arg("--model")
        .arg(model)
        .args(["--device", &device.to_string()])
        .args(["--port", "0"])
        .args(["--max-running", &max_running.to_string()])
        .args(["--max-batch-rows", &max_running.max(1).to_string()])
        .args(["--queue-size", &queue.to_string()])
        .args(["--max-tokens-cap", &cap.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting qoq serve")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("the server's stdout")?)
        .read_line(&mut line)
        .context("reading the server's address")?;
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .with_context(|| format!("unexpected first line of qoq serve: {line:?}"))?
        .to_string();
    Ok(Server { child, addr })
}

/// What one streamed request gave.
#[derive(Debug, Default)]
struct Sample {
    ok: bool,
    ttft: Option<f64>,
    gaps: Vec<f64>,
    tokens: u64,
}

/// Read one chunk of a chunked body; `None` at its end.
fn read_chunk(r: &mut impl BufRead) -> std::io::Result<Option<Vec<u8>>> {
    let mut size = String::new();
    if r.read_line(&mut size)? == 0 {
        return Ok(None);
    }
    let n = usize::from_str_radix(size.trim(), 16)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    if n == 0 {
        return Ok(None);
    }
    let mut buf = vec![0u8; n + 2];
    r.read_exact(&mut buf)?;
    buf.truncate(n);
    Ok(Some(buf))
}

/// Send one streamed request and time its chunks.
fn one_request(addr: &str, body: &str) -> Sample {
    let t0 = Instant::now();
    let run = || -> anyhow::Result<Sample> {
        let mut out = Sample::default();
        let mut tcp = TcpStream::connect(addr)?;
        tcp.set_read_timeout(Some(Duration::from_secs(600)))?;
        write!(
            tcp,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        let mut r = BufReader::new(tcp);
        let mut status = String::new();
        r.read_line(&mut status)?;
        anyhow::ensure!(status.contains(" 200 "), "status {}", status.trim());
        loop {
            let mut h = String::new();
            r.read_line(&mut h)?;
            if h.trim().is_empty() {
                break;
            }
        }
        let mut pending = String::new();
        let mut last: Option<Instant> = None;
        let mut done = false;
        while let Some(c) = read_chunk(&mut r)? {
            let now = Instant::now();
            pending.push_str(&String::from_utf8_lossy(&c));
            while let Some(end) = pending.find("\n\n") {
                let ev: String = pending.drain(..end + 2).collect();
                let Some(data) = ev.trim().strip_prefix("data: ") else {
                    continue;
                };
                if data == "[DONE]" {
                    done = true;
                    continue;
                }
                let v: Value = serde_json::from_str(data)?;
                anyhow::ensure!(v.get("error").is_none(), "stream error {data}");
                if let Some(u) = v["usage"]["completion_tokens"].as_u64() {
                    out.tokens = u;
                }
                let has_content = v["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|t| !t.is_empty());
                if has_content {
                    match last {
                        None => out.ttft = Some((now - t0).as_secs_f64()),
                        Some(l) => out.gaps.push((now - l).as_secs_f64()),
                    }
                    last = Some(now);
                }
            }
        }
        anyhow::ensure!(done, "the stream ended without [DONE]");
        out.ok = true;
        Ok(out)
    };
    run().unwrap_or_else(|e| {
        tracing::warn!("request failed: {e:#}");
        Sample::default()
    })
}

fn png_data_uri(w: u32, h: u32, seed: u32) -> String {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 7 + seed) as u8, (y * 5) as u8, (seed * 13) as u8])
    });
    let mut bytes = Vec::new();
    let _ = image::DynamicImage::ImageRgb8(img).write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    );
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// The body of request `i`: prompt and output lengths cycle through three sizes; with
/// `images`, every second request carries one.
fn body(i: usize, images: bool, outputs: &[usize]) -> String {
    let words = [4usize, 48, 160][i % 3];
    let max_tokens = outputs[(i / 3) % outputs.len()];
    let text = format!(
        "Case {i}: {} What is the diagnosis?",
        "the patient reports chest pain and shortness of breath ".repeat(words / 8 + 1)
    );
    let content = if images && i % 2 == 1 {
        json!([{"type": "text", "text": text},
            {"type": "image_url", "image_url": {"url": png_data_uri(64 + (i as u32 % 3) * 32, 64, i as u32)}}])
    } else {
        json!(text)
    };
    json!({"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
        "temperature": 0.7, "seed": i, "ignore_eos": true, "stream": true,
        "stream_options": {"include_usage": true}})
    .to_string()
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((p / 100.0 * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
}

/// One run's figures.
#[derive(Debug, serde::Serialize)]
struct Row {
    server: &'static str,
    mix: &'static str,
    concurrency: usize,
    ok: usize,
    errors: usize,
    wall_s: f64,
    tokens_per_s: f64,
    requests_per_s: f64,
    ttft_p50_ms: f64,
    ttft_p99_ms: f64,
    itl_p50_ms: f64,
    itl_p99_ms: f64,
}

fn run_load(addr: &str, bodies: &[String], concurrency: usize) -> (Vec<Sample>, f64) {
    let next = AtomicUsize::new(0);
    let out = Mutex::new(Vec::with_capacity(bodies.len()));
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..concurrency.max(1) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(b) = bodies.get(i) else { break };
                    let r = one_request(addr, b);
                    if let Ok(mut o) = out.lock() {
                        o.push(r);
                    }
                }
            });
        }
    });
    let wall = t.elapsed().as_secs_f64();
    (out.into_inner().unwrap_or_default(), wall)
}

pub fn serve(a: ServeBenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(a.requests > 0, "--requests must be at least 1");
    anyhow::ensure!(
        !a.concurrency.is_empty() && a.concurrency.iter().all(|&c| c > 0),
        "--concurrency needs levels of at least 1"
    );
    anyhow::ensure!(
        !a.output_tokens.is_empty() && a.output_tokens.iter().all(|&c| c > 0),
        "--output-tokens needs lengths of at least 1"
    );
    let dir = tempfile::tempdir().context("creating a temporary folder")?;
    let model = match &a.model {
        Some(m) => m.clone(),
        None => {
            super::bench_train::build_model_dir(super::bench_train::BenchSize::Tiny, dir.path())?
        }
    };
    let top = *a.concurrency.iter().max().unwrap_or(&1);
    let cap = *a.output_tokens.iter().max().unwrap_or(&1);
    let mixes: Vec<(&'static str, bool)> = if a.no_images {
        vec![("text", false)]
    } else {
        vec![("text", false), ("images", true)]
    };
    let mut rows: Vec<Row> = Vec::new();
    for (server, max_running) in [("batched", top), ("one-at-a-time", 1)] {
        let srv = spawn_server(&model, a.device.device, max_running, top, cap)?;
        for &(mix, images) in &mixes {
            let bodies: Vec<String> = (0..a.requests)
                .map(|i| body(i, images, &a.output_tokens))
                .collect();
            // A warm-up request (first-call allocations) outside the measurement.
            let _ = one_request(&srv.addr, &bodies[0]);
            for &c in &a.concurrency {
                let (samples, wall) = run_load(&srv.addr, &bodies, c);
                let ok = samples.iter().filter(|s| s.ok).count();
                let tokens: u64 = samples.iter().map(|s| s.tokens).sum();
                let mut ttft: Vec<f64> = samples.iter().filter_map(|s| s.ttft).collect();
                let mut itl: Vec<f64> = samples
                    .iter()
                    .flat_map(|s| s.gaps.iter().copied())
                    .collect();
                let row = Row {
                    server,
                    mix,
                    concurrency: c,
                    ok,
                    errors: a.requests - ok,
                    wall_s: wall,
                    tokens_per_s: tokens as f64 / wall,
                    requests_per_s: ok as f64 / wall,
                    ttft_p50_ms: pct(&mut ttft, 50.0) * 1e3,
                    ttft_p99_ms: pct(&mut ttft, 99.0) * 1e3,
                    itl_p50_ms: pct(&mut itl, 50.0) * 1e3,
                    itl_p99_ms: pct(&mut itl, 99.0) * 1e3,
                };
                eprintln!(
                    "{server} {mix} c={c}: {ok}/{} ok in {wall:.2} s",
                    a.requests
                );
                rows.push(row);
            }
        }
        drop(srv);
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "| server | mix | concurrency | ok | errors | wall s | tokens/s | requests/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|")?;
    for r in &rows {
        writeln!(
            out,
            "| {} | {} | {} | {} | {} | {:.2} | {:.1} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} |",
            r.server,
            r.mix,
            r.concurrency,
            r.ok,
            r.errors,
            r.wall_s,
            r.tokens_per_s,
            r.requests_per_s,
            r.ttft_p50_ms,
            r.ttft_p99_ms,
            r.itl_p50_ms,
            r.itl_p99_ms
        )?;
    }
    let mut speedups = Vec::new();
    for &(mix, _) in &mixes {
        for &c in &a.concurrency {
            let find = |s: &str| {
                rows.iter()
                    .find(|r| r.server == s && r.mix == mix && r.concurrency == c)
                    .map(|r| r.tokens_per_s)
            };
            if let (Some(b), Some(o)) = (find("batched"), find("one-at-a-time")) {
                writeln!(
                    out,
                    "{mix}, concurrency {c}: batched throughput {:.2}x the one-at-a-time baseline",
                    b / o
                )?;
                speedups.push(json!({"mix": mix, "concurrency": c, "speedup": b / o}));
            }
        }
    }
    let errors: usize = rows.iter().map(|r| r.errors).sum();
    writeln!(out, "errors: {errors}")?;
    if let Some(p) = &a.json {
        std::fs::write(
            p,
            serde_json::to_string_pretty(&json!({"runs": rows, "speedups": speedups}))?,
        )
        .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(if errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
