//! `qoq process` on the bundled mini manifest with the committed tiny model folder
//! (crates/qoq-processor/tests/fixtures/tiny_model: a 3000-entry Qwen vocabulary plus the
//! Qwen2.5-VL / QoQ added tokens, a QoQ config with the ECG path).

use safetensors::SafeTensors;
use std::path::{Path, PathBuf};
use std::process::Command;

fn qoq() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qoq"))
}

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

fn tiny_model() -> PathBuf {
    repo("crates/qoq-processor/tests/fixtures/tiny_model")
}

fn i64s(st: &SafeTensors, name: &str) -> (Vec<usize>, Vec<i64>) {
    let t = st.tensor(name).unwrap();
    let v = t
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (t.shape().to_vec(), v)
}

fn run_process(extra: &[&str]) -> (Vec<u8>, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("processed.safetensors");
    let o = qoq()
        .args(["process", "--model"])
        .arg(tiny_model())
        .arg("--input")
        .arg(repo("examples/mini/manifest.jsonl"))
        .arg("--out")
        .arg(&out)
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    (std::fs::read(&out).unwrap(), stdout)
}

#[test]
fn process_writes_model_inputs_for_the_mini_manifest() {
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny_model().join("config.json")).unwrap())
            .unwrap();
    let id = |k: &str| config[k].as_i64().unwrap();
    let (bytes, stdout) = run_process(&[]);
    assert!(stdout.contains("processed 4 rows"), "{stdout}");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (shape, ids) = i64s(&st, "input_ids");
    assert_eq!(shape[0], 4);
    let (b, s) = (shape[0], shape[1]);
    let (mshape, mask) = i64s(&st, "attention_mask");
    assert_eq!(mshape, vec![b, s]);
    let (pshape, pos) = i64s(&st, "position_ids");
    assert_eq!(pshape, vec![3, b, s]);
    let (gshape, grids) = i64s(&st, "image_grid_thw");
    assert_eq!(gshape[1], 3);
    let pv = st.tensor("pixel_values").unwrap();
    let patches: i64 = grids.chunks(3).map(|g| g[0] * g[1] * g[2]).sum();
    assert_eq!(pv.shape(), &[patches as usize, 1176]);
    let ts = st.tensor("time_series_data").unwrap();
    assert_eq!(ts.shape(), &[b, 8, 2500]);

    // Every row: exactly one ECG token, left padding, image pads = merged patches.
    let mut grid_iter = grids.chunks(3);
    for r in 0..b {
        let row = &ids[r * s..(r + 1) * s];
        let m = &mask[r * s..(r + 1) * s];
        let n_real = m.iter().filter(|&&v| v == 1).count();
        assert!(
            m[s - n_real..].iter().all(|&v| v == 1),
            "row {r}: left padding"
        );
        assert!(row[..s - n_real].iter().all(|&t| t == id("bos_token_id")));
        assert_eq!(
            row.iter()
                .filter(|&&t| t == id("time_series_token_id"))
                .count(),
            1,
            "row {r}"
        );
        let n_blocks = row
            .iter()
            .filter(|&&t| t == id("vision_start_token_id"))
            .count();
        let want_pads: i64 = (0..n_blocks)
            .map(|_| {
                let g = grid_iter.next().unwrap();
                g[0] * g[1] * g[2] / 4
            })
            .sum();
        let pads = row.iter().filter(|&&t| t == id("image_token_id")).count() as i64;
        assert_eq!(pads, want_pads, "row {r}");
        // Text positions after the image block are all equal across the 3 axes; the last token
        // sits at max position; padded positions are 1.
        let last = |axis: usize| pos[axis * b * s + r * s + s - 1];
        assert_eq!((last(0), last(1)), (last(2), last(2)));
        assert!(pos[r * s..r * s + s - n_real].iter().all(|&p| p == 1));
    }
    assert!(grid_iter.next().is_none());
    // The ECG row (4th) has a real signal, the others zeros.
    let tsv: Vec<f32> = ts
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let per = 8 * 2500;
    assert!(tsv[..3 * per].iter().all(|&v| v == 0.0));
    assert!(tsv[3 * per..].iter().any(|&v| v != 0.0));
    let meta = st_metadata(&bytes);
    assert!(meta.contains("raw_prompt_ids"));

    // --no-format-prompt: the same rows, shorter prompts.
    let (plain, _) = run_process(&["--no-format-prompt"]);
    let st2 = SafeTensors::deserialize(&plain).unwrap();
    let (shape2, _) = i64s(&st2, "input_ids");
    assert!(shape2[1] + 50 < s, "{shape2:?} vs {s}");
}

fn st_metadata(bytes: &[u8]) -> String {
    let (_, meta) = SafeTensors::read_metadata(bytes).unwrap();
    format!("{:?}", meta.metadata())
}

#[test]
fn process_refuses_overlong_prompts_and_bad_models() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.safetensors");
    let o = qoq()
        .args(["process", "--max-prompt-length", "50", "--model"])
        .arg(tiny_model())
        .arg("--input")
        .arg(repo("examples/mini/manifest.jsonl"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("max_prompt_length 50"), "{err}");
    assert!(err.contains("manifest.jsonl:"), "{err}");

    let o = qoq()
        .args(["process", "--model"])
        .arg(dir.path())
        .arg("--input")
        .arg(repo("examples/mini/manifest.jsonl"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("config.json"), "{err}");
}
