//! `qoq bench serve` with tiny counts: it starts the batched and the one-at-a-time servers,
//! sends every request of every run and prints the table (no timing is asserted).

#[test]
fn bench_serve_runs_both_servers_and_reports_every_run() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_qoq"))
        .args([
            "bench",
            "serve",
            "--requests",
            "3",
            "--concurrency",
            "1,2",
            "--output-tokens",
            "2,3",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for server in ["batched", "one-at-a-time"] {
        for mix in ["text", "images"] {
            for c in [1, 2] {
                let row = format!("| {server} | {mix} | {c} | 3 | 0 |");
                assert!(stdout.contains(&row), "no row {row:?} in\n{stdout}");
            }
        }
    }
    assert!(stdout.contains("errors: 0"), "{stdout}");
    assert!(
        stdout.contains("images, concurrency 2: batched throughput"),
        "{stdout}"
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(v["runs"].as_array().unwrap().len(), 8);
    assert_eq!(v["speedups"].as_array().unwrap().len(), 4);
    for r in v["runs"].as_array().unwrap() {
        assert!(r["tokens_per_s"].as_f64().unwrap() > 0.0, "{r}");
    }
}
