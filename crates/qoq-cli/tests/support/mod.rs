//! Helpers shared by the CLI tests: the repository root, the fetched test-data cache, and a tiny
//! random model folder built from the processor fixture (config, preprocessor config, tokenizer).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A file of the test-data cache (`$QOQ_TESTDATA` or `<repo>/.testdata`); fails, naming the
/// fetch script, when it is missing.
pub fn cache(rel: &str) -> PathBuf {
    let root = match std::env::var_os("QOQ_TESTDATA") {
        Some(p) => PathBuf::from(p),
        None => repo().join(".testdata"),
    };
    let p = root.join(rel);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-testdata.sh first",
        p.display()
    );
    p
}

/// `dir/train.jsonl`: `rows` derm rows on the mini example's first image (absolute path),
/// answer `benign`, asking `question` after `<image>Case {i}. `.
pub fn derm_manifest(dir: &Path, rows: usize, question: &str) -> PathBuf {
    let img = repo().join("examples/mini/derm/demo-derm/case_001.png");
    let text: String = (0..rows)
        .map(|i| {
            format!(
                "{}\n",
                serde_json::json!({
                    "problem": format!("<image>Case {i}. {question}"),
                    "answer": "benign",
                    "images": [img.display().to_string()],
                    "data_source": "derm",
                    "dataset": "demo-derm",
                })
            )
        })
        .collect();
    let manifest = dir.join("train.jsonl");
    std::fs::write(&manifest, text).unwrap();
    manifest
}

/// `dir/model`: the processor fixture's files plus deterministic random weights for its config.
pub fn tiny_model(dir: &Path) -> PathBuf {
    tiny_model_with(dir, true)
}

/// As [`tiny_model`]; without `ecg` the config loses its `time_series_token_id` (a stock
/// Qwen2.5-VL checkpoint: no ECG encoder).
pub fn tiny_model_with(dir: &Path, ecg: bool) -> PathBuf {
    let src = repo().join("crates/qoq-processor/tests/fixtures/tiny_model");
    let m = dir.join("model");
    std::fs::create_dir_all(&m).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    if !ecg {
        cfg.as_object_mut().unwrap().remove("time_series_token_id");
    }
    std::fs::write(m.join("config.json"), cfg.to_string()).unwrap();
    let parsed = qoq_core::hf_config::QwenVlConfig::from_file(&m.join("config.json")).unwrap();
    assert_eq!(parsed.has_time_series(), ecg);
    qoq_model::train::write_random_checkpoint(&parsed, &m).unwrap();
    // The weights writer saves the parsed config; keep the fixture's own text.
    std::fs::write(m.join("config.json"), cfg.to_string()).unwrap();
    for f in ["preprocessor_config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), m.join(f)).unwrap();
    }
    m
}

/// A running `qoq serve` on a loopback port the OS picked; killed when dropped.
pub struct Server {
    pub child: std::process::Child,
    /// `host:port`.
    pub addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `qoq serve --model MODEL --port 0 ARGS...` with its stderr going to `stderr` (a file
/// when nobody reads it: a pipe nobody reads would fill and stall the server) and waits for its
/// `listening on http://...` line.
pub fn spawn_serve<S: AsRef<std::ffi::OsStr>>(
    model: &Path,
    args: &[S],
    stderr: std::process::Stdio,
) -> Server {
    spawn_serve_env(model, args, stderr, &[])
}

/// As [`spawn_serve`], with environment variables set for the server.
pub fn spawn_serve_env<S: AsRef<std::ffi::OsStr>>(
    model: &Path,
    args: &[S],
    stderr: std::process::Stdio,
    env: &[(&str, &str)],
) -> Server {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_qoq"))
        .envs(env.iter().copied())
        .arg("serve")
        .arg("--model")
        .arg(model)
        .args(["--port", "0"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    Server { child, addr }
}

/// One HTTP/1.1 exchange over a raw `TcpStream` (120 s read timeout); returns the status and the
/// (de-chunked) body.
pub fn http(addr: &str, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    http_with(addr, method, path, &[], body)
}

/// As [`http`], with extra request headers.
pub fn http_with(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(120)))
        .unwrap();
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    // The server may answer (413) before the whole body is sent: ignore write errors.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut rest = raw[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        let mut out = Vec::new();
        let mut i = 0;
        loop {
            let eol = i + rest[i..].windows(2).position(|w| w == b"\r\n").unwrap();
            let len = usize::from_str_radix(std::str::from_utf8(&rest[i..eol]).unwrap().trim(), 16)
                .unwrap();
            if len == 0 {
                break;
            }
            out.extend_from_slice(&rest[eol + 2..eol + 2 + len]);
            i = eol + 2 + len + 2;
        }
        rest = out;
    }
    (status, rest)
}

/// POSTs a JSON body to `/v1/chat/completions`; the status and the body as JSON (`null` when it
/// is not JSON).
pub fn post_chat(addr: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let (st, b) = http(
        addr,
        "POST",
        "/v1/chat/completions",
        body.to_string().as_bytes(),
    );
    (
        st,
        serde_json::from_slice(&b).unwrap_or(serde_json::Value::Null),
    )
}
