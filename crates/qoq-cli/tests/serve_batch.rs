//! `qoq serve`'s scheduler and the OpenAI parameters (issue 20), over loopback with the tiny
//! random checkpoint: concurrent requests batched together answer exactly what they answer one
//! at a time; the queue bound; a dropped stream or a passed deadline frees its place; stop
//! strings, log-probabilities, seeds, `n`, token limits and refused parameters; the API key; the
//! access log, plain-text logs and a graceful SIGTERM.

use serde_json::{Value, json};
use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

mod support;

use support::{http, http_with, post_chat as post};

struct Server {
    srv: support::Server,
    addr: String,
    _dir: tempfile::TempDir,
}

fn start_env(extra: &[&str], stderr: Stdio, env: &[(&str, &str)]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let model = support::tiny_model_with(dir.path(), false);
    let srv = support::spawn_serve_env(&model, extra, stderr, env);
    Server {
        addr: srv.addr.clone(),
        srv,
        _dir: dir,
    }
}

fn start(extra: &[&str]) -> Server {
    start_env(extra, Stdio::inherit(), &[])
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

fn health(a: &str) -> Value {
    let (st, b) = http(a, "GET", "/health", b"");
    assert_eq!(st, 200);
    serde_json::from_slice(&b).unwrap()
}

/// Poll /health until `ok` holds (20 s at most).
fn wait_health(a: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let t = Instant::now();
    loop {
        let h = health(a);
        if ok(&h) {
            return h;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "{what}: {h}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The `data:` payloads of a server-sent-event body.
fn sse_datas(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

/// A streamed request's text per choice, finish reasons, log-prob entries and usage chunk.
struct Streamed {
    text: Vec<String>,
    finish: Vec<Option<String>>,
    logprobs: Vec<Vec<Value>>,
    usage: Option<Value>,
}

fn stream(a: &str, body: &Value) -> Streamed {
    let mut b = body.clone();
    b["stream"] = json!(true);
    let (st, raw) = http(a, "POST", "/v1/chat/completions", b.to_string().as_bytes());
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&raw));
    let datas = sse_datas(&raw);
    assert_eq!(datas.last().map(String::as_str), Some("[DONE]"));
    let n = body["n"].as_u64().unwrap_or(1) as usize;
    let mut out = Streamed {
        text: vec![String::new(); n],
        finish: vec![None; n],
        logprobs: vec![Vec::new(); n],
        usage: None,
    };
    for d in &datas[..datas.len() - 1] {
        let c: Value = serde_json::from_str(d).unwrap();
        assert!(c.get("error").is_none(), "{c}");
        if c["usage"].is_object() {
            out.usage = Some(c["usage"].clone());
        }
        for ch in c["choices"].as_array().unwrap() {
            let k = ch["index"].as_u64().unwrap() as usize;
            out.text[k].push_str(ch["delta"]["content"].as_str().unwrap_or(""));
            if let Some(f) = ch["finish_reason"].as_str() {
                assert!(out.finish[k].is_none(), "two finishes: {c}");
                out.finish[k] = Some(f.to_string());
            }
            if let Some(l) = ch["logprobs"]["content"].as_array() {
                out.logprobs[k].extend(l.iter().cloned());
            }
        }
    }
    out
}

/// A streamed request left open: the response head and first event are read, then nothing.
fn open_stream(a: &str, body: &Value) -> TcpStream {
    let mut b = body.clone();
    b["stream"] = json!(true);
    let body = b.to_string();
    let mut s = TcpStream::connect(a).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {a}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut r = std::io::BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains(" 200 "), "{line}");
    s
}

fn content(r: &Value, k: usize) -> String {
    r["choices"][k]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn concurrent_requests_are_batched_and_answer_what_they_answer_alone() {
    // A short pause per step so that the burst is seen running together.
    let srv = start(&[
        "--max-running",
        "8",
        "--queue-size",
        "8",
        "--step-delay-ms",
        "15",
        "--prefill-chunk",
        "64",
        "--prefill-budget",
        "512",
    ]);
    let a = srv.addr.as_str();
    let bodies: Vec<Value> = (0..8)
        .map(|i| {
            let mut b = json!({"messages": user(&format!("Case {i}: what is the diagnosis? {}", "details ".repeat(i))),
                "max_tokens": 10 + i, "temperature": 0, "ignore_eos": i % 2 == 0});
            if i == 3 {
                // Sampled choices too: the seed fixes them whatever shares the batch.
                b["temperature"] = json!(1.0);
                b["n"] = json!(2);
                b["seed"] = json!(11);
            }
            b
        })
        .collect();
    let gate = std::sync::Barrier::new(bodies.len() + 1);
    let peak = std::sync::atomic::AtomicU64::new(0);
    let done = std::sync::atomic::AtomicBool::new(false);
    let together: Vec<Value> = std::thread::scope(|s| {
        let hs: Vec<_> = bodies
            .iter()
            .map(|b| {
                let gate = &gate;
                s.spawn(move || {
                    gate.wait();
                    let (st, r) = post(a, b);
                    assert_eq!(st, 200, "{r}");
                    r
                })
            })
            .collect();
        s.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                // Sequences decoding together (not only admitted).
                let r = health(a)["batch_rows"].as_u64().unwrap();
                peak.fetch_max(r, std::sync::atomic::Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        gate.wait();
        let out = hs.into_iter().map(|h| h.join().unwrap()).collect();
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        out
    });
    let peak = peak.into_inner();
    assert!(
        peak >= 2,
        "the burst never ran together (peak running {peak})"
    );
    for (b, t) in bodies.iter().zip(&together) {
        let (st, alone) = post(a, b);
        assert_eq!(st, 200, "{alone}");
        assert_eq!(alone["choices"], t["choices"], "{b}");
        assert_eq!(alone["usage"], t["usage"], "{b}");
    }
    println!("peak decode batch rows during the burst: {peak}");
}

#[test]
fn the_queue_bounds_waiting_requests_and_a_dropped_stream_frees_its_place() {
    let srv = start(&[
        "--max-running",
        "2",
        "--queue-size",
        "1",
        "--step-delay-ms",
        "30",
        "--max-tokens-cap",
        "100000",
    ]);
    let a = srv.addr.as_str();
    // Three endless streams (about 3000 s each at 30 ms a token): two run, one waits.
    let long = json!({"messages": user("Findings?"), "max_tokens": 100000, "ignore_eos": true,
        "temperature": 0});
    let s1 = open_stream(a, &long);
    let s2 = open_stream(a, &long);
    wait_health(a, "two running", |h| h["running"] == 2);
    let (tx, rx) = std::sync::mpsc::channel();
    let a2 = a.to_string();
    let long2 = long.clone();
    std::thread::spawn(move || {
        let s3 = open_stream(&a2, &long2);
        tx.send(s3).unwrap();
    });
    wait_health(a, "one waiting", |h| {
        h["waiting"] == 1 && h["in_flight"] == 3
    });
    // Running 2 + queue 1 are taken: the next request is refused at once.
    let t = Instant::now();
    let (st, r) = post(a, &json!({"messages": user("q"), "max_tokens": 2}));
    assert_eq!(st, 429, "{r}");
    assert_eq!(r["error"]["code"], "queue_full");
    assert!(t.elapsed() < Duration::from_secs(10));
    // Dropping a running stream frees its place: the waiting one starts.
    drop(s1);
    wait_health(a, "the waiting stream starts", |h| {
        h["running"] == 2 && h["waiting"] == 0 && h["in_flight"] == 2
    });
    let s3 = rx.recv_timeout(Duration::from_secs(20)).unwrap();
    // Dropping another: a new short request runs without waiting for the endless ones.
    drop(s2);
    wait_health(a, "one running", |h| h["running"] == 1);
    let t = Instant::now();
    let (st, r) = post(
        a,
        &json!({"messages": user("q"), "max_tokens": 3, "temperature": 0}),
    );
    assert_eq!(st, 200, "{r}");
    assert!(t.elapsed() < Duration::from_secs(30));
    drop(s3);
    wait_health(a, "all gone", |h| h["running"] == 0 && h["in_flight"] == 0);
    let (_, m) = http(a, "GET", "/metrics", b"");
    let m = String::from_utf8(m).unwrap();
    assert!(m.contains("qoq_requests_cancelled_total 3\n"), "{m}");
}

#[test]
fn the_key_value_budget_bounds_admission_and_refuses_what_cannot_fit() {
    // The tiny model holds 2 layers x 2 x 2 kv heads x 16 dims x 4 bytes = 512 bytes per
    // position: 1 MiB is 2048 positions of buffer, which a batch reaching n positions may
    // hold kv_capacity(n) of (1.5 n in blocks of 64: n <= 1365 fits).
    let srv = start(&[
        "--kv-cache-mb",
        "1",
        "--step-delay-ms",
        "30",
        "--max-tokens-cap",
        "100000",
    ]);
    let a = srv.addr.as_str();
    let (_, r) = post(a, &json!({"messages": user("Findings?"), "max_tokens": 1}));
    let prompt = r["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    // One request alone larger than the budget: refused.
    let (st, r) = post(
        a,
        &json!({"messages": user("Findings?"), "max_tokens": 1366 - prompt}),
    );
    assert_eq!(st, 400, "{r}");
    assert_eq!(r["error"]["code"], "context_too_long");
    // Two that fit alone but not together: the second waits although --max-running allows it.
    let each = 1000 - prompt;
    let body = json!({"messages": user("Findings?"), "max_tokens": each, "ignore_eos": true});
    let s1 = open_stream(a, &body);
    wait_health(a, "one running", |h| h["running"] == 1);
    let s2 = open_stream(a, &body);
    wait_health(a, "the second waits for memory", |h| {
        h["running"] == 1 && h["waiting"] == 1
    });
    drop(s1);
    wait_health(a, "the second runs once the first is gone", |h| {
        h["running"] == 1 && h["waiting"] == 0
    });
    drop(s2);
    wait_health(a, "all gone", |h| h["running"] == 0);
}

#[test]
fn a_request_past_its_deadline_leaves_the_batch() {
    let srv = start(&[
        "--timeout-s",
        "1",
        "--step-delay-ms",
        "20",
        "--max-tokens-cap",
        "100000",
    ]);
    let a = srv.addr.as_str();
    let t = Instant::now();
    let (st, r) = post(
        a,
        &json!({"messages": user("q"), "max_tokens": 100000, "ignore_eos": true}),
    );
    assert_eq!(st, 504, "{r}");
    assert_eq!(r["error"]["code"], "timeout");
    assert!(t.elapsed() < Duration::from_secs(30));
    wait_health(a, "the batch is empty", |h| h["running"] == 0);
    let (st, r) = post(a, &json!({"messages": user("q"), "max_tokens": 2}));
    assert_eq!(st, 200, "{r}");
}

#[test]
fn parameters_stop_logprobs_seed_n_limits_and_refusals() {
    let srv = start(&["--max-tokens-cap", "64"]);
    let a = srv.addr.as_str();
    let base = json!({"messages": user("What is the diagnosis?"), "temperature": 0,
        "max_tokens": 24, "ignore_eos": true, "logprobs": true, "top_logprobs": 3});
    let (st, r) = post(a, &base);
    assert_eq!(st, 200, "{r}");
    let text = content(&r, 0);
    let lp = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        lp.len() as u64,
        r["usage"]["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(lp.len(), 24);
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    for e in lp {
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{e}");
        // Greedy: the chosen token is the most likely one; log-probs are <= 0 and descend.
        assert_eq!(top[0]["token"], e["token"], "{e}");
        assert!(
            (top[0]["logprob"].as_f64().unwrap() - e["logprob"].as_f64().unwrap()).abs() < 1e-6
        );
        assert!(e["logprob"].as_f64().unwrap() <= 0.0);
        assert!(top[1]["logprob"].as_f64() <= top[0]["logprob"].as_f64());
        assert!(e["bytes"].is_array());
    }
    // Streamed: the same text, the same log-prob entries.
    let s = stream(a, &base);
    assert_eq!(s.text[0], text);
    assert_eq!(s.logprobs[0].as_slice(), lp.as_slice());
    assert_eq!(s.finish[0].as_deref(), Some("length"));
    // Without logprobs, `logprobs` is null.
    let mut plain = base.clone();
    plain.as_object_mut().unwrap().remove("top_logprobs");
    plain["logprobs"] = json!(false);
    let (_, r2) = post(a, &plain);
    assert!(r2["choices"][0]["logprobs"].is_null());
    assert_eq!(content(&r2, 0), text);

    // Stop strings: one inside the greedy answer, and one spanning two tokens.
    let toks: Vec<String> = lp
        .iter()
        .map(|e| e["token"].as_str().unwrap().to_string())
        .collect();
    let chars: Vec<char> = text.chars().collect();
    assert!(
        chars.len() >= 8,
        "greedy answer too short for the stop test: {text:?}"
    );
    let mut stops: Vec<String> = vec![chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect()];
    if toks.concat() == text {
        // The last character of one token and the first of the next.
        if let Some(k) =
            (4..toks.len() - 1).find(|&k| !toks[k].is_empty() && !toks[k + 1].is_empty())
        {
            let mut s = toks[k].chars().last().unwrap().to_string();
            s.push(toks[k + 1].chars().next().unwrap());
            stops.push(s);
        }
    }
    for stop in &stops {
        let cut = text.find(stop.as_str()).unwrap();
        let want = &text[..cut];
        let mut b = base.clone();
        b["stop"] = json!(stop);
        let (st, r) = post(a, &b);
        assert_eq!(st, 200, "{r}");
        assert_eq!(content(&r, 0), want, "stop {stop:?} in {text:?}");
        assert_eq!(r["choices"][0]["finish_reason"], "stop");
        let n = r["usage"]["completion_tokens"].as_u64().unwrap();
        assert!((1..24).contains(&n), "{r}");
        assert_eq!(
            r["choices"][0]["logprobs"]["content"]
                .as_array()
                .unwrap()
                .len() as u64,
            n
        );
        // A list of stops, the first to match wins; streamed the same.
        b["stop"] = json!(["@@never@@", stop]);
        let s = stream(a, &b);
        assert_eq!(s.text[0], want, "streamed stop {stop:?}");
        assert_eq!(s.finish[0].as_deref(), Some("stop"));
    }

    // n and seed: the same seed gives the same choices; usage counts them all; include_usage.
    let sampled = json!({"messages": user("Findings?"), "temperature": 1.0, "n": 3, "seed": 42,
        "max_completion_tokens": 6, "ignore_eos": true, "stream_options": {"include_usage": true}});
    let (_, r1) = post(a, &sampled);
    let (_, r2) = post(a, &sampled);
    assert_eq!(r1["choices"], r2["choices"]);
    assert_eq!(r1["choices"].as_array().unwrap().len(), 3);
    assert_eq!(r1["usage"]["completion_tokens"], 18);
    let s = stream(a, &sampled);
    for k in 0..3 {
        assert_eq!(s.text[k], content(&r1, k));
    }
    assert_eq!(s.usage.as_ref(), Some(&r1["usage"]));
    // max_completion_tokens wins over max_tokens.
    let (_, r) = post(
        a,
        &json!({"messages": user("q"), "max_tokens": 9, "max_completion_tokens": 2, "ignore_eos": true}),
    );
    assert_eq!(r["usage"]["completion_tokens"], 2);
    // `user` is accepted and changes nothing.
    let mut u = plain.clone();
    u["user"] = json!("someone");
    let (st, ru) = post(a, &u);
    assert_eq!(st, 200);
    assert_eq!(content(&ru, 0), text);
    // The system message reaches the prompt.
    let (_, rs) = post(
        a,
        &json!({"messages": [{"role": "system", "content": "You are a cardiologist reading ECGs."},
            {"role": "user", "content": "What is the diagnosis?"}], "max_tokens": 1}),
    );
    let (_, r0) = post(
        a,
        &json!({"messages": user("What is the diagnosis?"), "max_tokens": 1}),
    );
    assert_ne!(
        rs["usage"]["prompt_tokens"], r0["usage"]["prompt_tokens"],
        "{rs} {r0}"
    );

    // Refusals name the field.
    let refuse = |extra: Value, code: &str, needle: &str| {
        let mut b = json!({"messages": user("q")});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        let (st, r) = post(a, &b);
        assert_eq!(st, 400, "{r}");
        assert_eq!(r["error"]["code"], code, "{r}");
        let m = r["error"]["message"].as_str().unwrap();
        assert!(m.contains(needle), "{m}");
    };
    refuse(json!({"tools": []}), "unsupported_parameter", "tools");
    refuse(
        json!({"response_format": {"type": "json_object"}}),
        "unsupported_parameter",
        "response_format",
    );
    refuse(
        json!({"presence_penalty": 2.5}),
        "invalid_penalty",
        "presence_penalty",
    );
    refuse(
        json!({"frequency_penalty": -3}),
        "invalid_penalty",
        "frequency_penalty",
    );
    refuse(
        json!({"top_logprobs": 21, "logprobs": true}),
        "invalid_top_logprobs",
        "top_logprobs",
    );
    refuse(
        json!({"top_logprobs": 2}),
        "invalid_top_logprobs",
        "logprobs",
    );
    refuse(
        json!({"stop": ["a", "b", "c", "d", "e"]}),
        "invalid_stop",
        "stop",
    );
    refuse(
        json!({"logit_bias": {"abc": 1}}),
        "invalid_logit_bias",
        "logit_bias",
    );
    // Presence and frequency penalties (over generated tokens): under a frequency penalty of 2
    // the greedy answer repeats no token (the tiny model's logits lie within a few tenths);
    // where the unpenalised answer repeats one, the answer changes.
    let mut pen = base.clone();
    pen["frequency_penalty"] = json!(2.0);
    pen["presence_penalty"] = json!(0.5);
    let (st, rp) = post(a, &pen);
    assert_eq!(st, 200, "{rp}");
    let ptoks: Vec<&str> = rp["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["token"].as_str().unwrap())
        .collect();
    let distinct: std::collections::HashSet<&&str> = ptoks.iter().collect();
    assert_eq!(distinct.len(), ptoks.len(), "{ptoks:?}");
    let plain_distinct: std::collections::HashSet<&String> = toks.iter().collect();
    if plain_distinct.len() < toks.len() {
        assert_ne!(content(&rp, 0), text);
    }
    // Choices ended by stop strings are not counted as abandoned by their clients.
    let (_, m) = http(a, "GET", "/metrics", b"");
    let m = String::from_utf8(m).unwrap();
    assert!(m.contains("qoq_requests_cancelled_total 0\n"), "{m}");
}

#[test]
fn the_api_key_guards_every_route_but_health() {
    let srv = start(&["--api-key", "s3cret"]);
    let a = srv.addr.as_str();
    assert_eq!(http(a, "GET", "/health", b"").0, 200);
    for path in ["/v1/models", "/metrics"] {
        let (st, b) = http(a, "GET", path, b"");
        assert_eq!(st, 401, "{path}");
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key");
        let (st, _) = http_with(a, "GET", path, &[("Authorization", "Bearer wrong")], b"");
        assert_eq!(st, 401, "{path}");
        let (st, _) = http_with(a, "GET", path, &[("Authorization", "Bearer s3cret")], b"");
        assert_eq!(st, 200, "{path}");
    }
    let body = json!({"messages": user("q"), "max_tokens": 2}).to_string();
    let (st, _) = http(a, "POST", "/v1/chat/completions", body.as_bytes());
    assert_eq!(st, 401);
    let (st, _) = http_with(
        a,
        "POST",
        "/v1/chat/completions",
        &[("Authorization", "Bearer s3cret")],
        body.as_bytes(),
    );
    assert_eq!(st, 200);
    let (_, m) = http_with(
        a,
        "GET",
        "/metrics",
        &[("Authorization", "Bearer s3cret")],
        b"",
    );
    let m = String::from_utf8(m).unwrap();
    assert!(m.contains("qoq_requests_total{status=\"401\"} 5\n"), "{m}");
    assert!(m.contains("qoq_requests_total{status=\"200\"} 1\n"), "{m}");
    assert!(
        m.contains("qoq_time_to_first_token_seconds_count 1\n"),
        "{m}"
    );
    assert!(m.contains("qoq_generation_tokens_total"), "{m}");
    assert!(
        m.contains("# TYPE qoq_inter_token_latency_seconds histogram"),
        "{m}"
    );
    drop(srv);
    // The key from the environment.
    let srv = start_env(&[], Stdio::inherit(), &[("QOQ_API_KEY", "envkey")]);
    assert_eq!(http(&srv.addr, "GET", "/v1/models", b"").0, 401);
    let (st, _) = http_with(
        &srv.addr,
        "GET",
        "/v1/models",
        &[("Authorization", "Bearer envkey")],
        b"",
    );
    assert_eq!(st, 200);
}

#[test]
fn a_public_address_needs_a_key_or_an_explicit_flag() {
    let dir = tempfile::tempdir().unwrap();
    let model = support::tiny_model_with(dir.path(), false);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_qoq"))
        .args(["serve", "--host", "0.0.0.0", "--port", "0", "--model"])
        .arg(&model)
        .env_remove("QOQ_API_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--api-key") && err.contains("--allow-unauthenticated"),
        "{err}"
    );
    let srv = support::spawn_serve(
        &model,
        &["--host", "0.0.0.0", "--allow-unauthenticated"],
        Stdio::inherit(),
    );
    let port = srv.addr.rsplit(':').next().unwrap();
    assert_eq!(
        http(&format!("127.0.0.1:{port}"), "GET", "/health", b"").0,
        200
    );
}

#[test]
fn access_log_lines_are_plain_and_sigterm_finishes_running_requests() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serve.log");
    let mut srv = start_env(
        &["--step-delay-ms", "20"],
        Stdio::from(std::fs::File::create(&log).unwrap()),
        &[("RUST_LOG", "info")],
    );
    let a = srv.addr.clone();
    let secret = "PATIENT-NAME-XYZ";
    let (st, _) = post(&a, &json!({"messages": user(secret), "max_tokens": 2}));
    assert_eq!(st, 200);
    let (st, _) = post(&a, &json!({"messages": user(secret), "n": 99}));
    assert_eq!(st, 400);
    // A stream of 40 tokens (about 0.8 s), SIGTERM while it runs: it still ends with [DONE].
    let mut s = open_stream(
        &a,
        &json!({"messages": user(secret), "max_tokens": 40, "ignore_eos": true}),
    );
    wait_health(&a, "the stream runs", |h| h["running"] == 1);
    let pid = srv.srv.child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.contains("data: [DONE]"), "{rest}");
    let t = Instant::now();
    let status = loop {
        if let Some(st) = srv.srv.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the server did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains('\u{1b}'),
        "ANSI escapes in the log file:\n{text}"
    );
    assert!(
        !text.contains(secret),
        "the prompt leaked into the log:\n{text}"
    );
    let access: Vec<&str> = text.lines().filter(|l| l.contains("qoq::access")).collect();
    assert_eq!(access.len(), 3, "{text}");
    assert!(
        access[0].contains("id=chatcmpl-0") && access[0].contains("status=200"),
        "{text}"
    );
    assert!(access[0].contains("completion_tokens=2"), "{text}");
    assert!(access[1].contains("status=400"), "{text}");
    assert!(
        access[2].contains("stream=true") && access[2].contains("completion_tokens=40"),
        "{text}"
    );
    assert!(
        access[2].contains("outcome=\"complete\"") || access[2].contains("outcome=complete"),
        "{text}"
    );
}

#[test]
fn earlier_turns_and_the_system_message_are_rendered_with_the_chat_template() {
    let dir = tempfile::tempdir().unwrap();
    let model = support::tiny_model_with(dir.path(), false);
    let srv = support::spawn_serve(&model, &[] as &[&str], Stdio::inherit());
    let a = srv.addr.as_str();
    let tok = qoq_processor::QoqTokenizer::from_file(&model.join("tokenizer.json")).unwrap();
    let sys = json!({"role": "system", "content": "You are a cardiologist."});
    let ask = |messages: Value| {
        let (st, r) = post(
            a,
            &json!({"messages": messages, "max_tokens": 1, "qoq_format_prompt": false}),
        );
        assert_eq!(st, 200, "{r}");
        r["usage"]["prompt_tokens"].as_u64().unwrap() as usize
    };
    let single = ask(json!([sys, {"role": "user", "content": "Is it an MI?"}]));
    let multi = ask(json!([sys,
        {"role": "user", "content": "What is the rhythm?"},
        {"role": "assistant", "content": "Sinus rhythm."},
        {"role": "user", "content": "Is it an MI?"}]));
    // Exactly the two earlier turns' tokens more.
    let turns = "<|im_start|>user\nWhat is the rhythm?<|im_end|>\n<|im_start|>assistant\nSinus rhythm.<|im_end|>\n";
    assert_eq!(multi, single + tok.encode(turns).unwrap().len());
    // The system message replaces the default one.
    let default = ask(json!([{"role": "user", "content": "Is it an MI?"}]));
    let default_sys = tok.encode("You are a helpful assistant.").unwrap().len();
    let own_sys = tok.encode("You are a cardiologist.").unwrap().len();
    assert_eq!(single + default_sys, default + own_sys);
    // An assistant message after the last user message is refused.
    let (st, r) = post(
        a,
        &json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
    );
    assert_eq!(st, 400, "{r}");
    assert_eq!(r["error"]["code"], "invalid_message");
}
