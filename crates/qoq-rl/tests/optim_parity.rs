//! AdamW, clipping, skip-on-non-finite and the warmup+cosine schedule against torch
//! (fixture by tools/fixtures/adamw.py), and exact continuation after a state round trip.

use candle_core::{Device, Tensor, Var};
use qoq_rl::optim::{AdamW, AdamWConfig, LrSchedule};
use serde_json::Value;

fn fixture() -> Value {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/adamw.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().map_or(f32::NAN, |f| f as f32))
        .collect()
}

const NAMES: [&str; 3] = ["a", "b", "c"];

fn setup(f: &Value) -> (Vec<Var>, AdamW) {
    let vars: Vec<Var> = NAMES
        .iter()
        .map(|n| {
            let shape: Vec<usize> = f["shapes"][n]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            let t = Tensor::from_vec(floats(&f["init"][n]), shape, &Device::Cpu).unwrap();
            Var::from_tensor(&t).unwrap()
        })
        .collect();
    let c = &f["config"];
    let cfg = AdamWConfig {
        lr: c["lr"].as_f64().unwrap(),
        schedule: LrSchedule::WarmupCosine {
            warmup_steps: c["warmup"].as_u64().unwrap(),
            total_steps: c["total"].as_u64().unwrap(),
            min_lr_ratio: c["min_lr_ratio"].as_f64().unwrap(),
        },
        ..AdamWConfig::default()
    };
    let named = NAMES
        .iter()
        .zip(&vars)
        .map(|(n, v)| (n.to_string(), v.clone()))
        .collect();
    (vars.clone(), AdamW::new(named, cfg).unwrap())
}

fn grads(step: &Value, vars: &[Var]) -> Vec<Option<Tensor>> {
    NAMES
        .iter()
        .zip(vars)
        .map(|(n, v)| {
            let g = &step["grads"][n];
            (!g.is_null()).then(|| Tensor::from_vec(floats(g), v.shape(), &Device::Cpu).unwrap())
        })
        .collect()
}

#[test]
fn updates_match_torch_adamw_with_clipping_skips_and_schedule() {
    let f = fixture();
    let (vars, mut opt) = setup(&f);
    for (i, step) in f["steps"].as_array().unwrap().iter().enumerate() {
        let r = opt.step(&grads(step, &vars)).unwrap();
        assert_eq!(r.skipped, step["skipped"].as_bool().unwrap(), "step {i}");
        if !r.skipped {
            let want_norm = step["grad_norm"].as_f64().unwrap();
            assert!(
                (r.grad_norm - want_norm).abs() < 1e-4 * want_norm,
                "step {i} norm"
            );
            assert!(
                (r.lr - step["lr"].as_f64().unwrap()).abs() < 1e-12,
                "step {i} lr"
            );
        }
        for (n, v) in NAMES.iter().zip(&vars) {
            let got = v
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let want = floats(&step["params"][n]);
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 2e-6, "step {i} param {n}: {a} vs {b}");
            }
        }
    }
    assert_eq!((opt.steps(), opt.skipped()), (6, 1));
}

#[test]
fn a_saved_and_restored_optimiser_continues_bit_identically() {
    let f = fixture();
    let steps = f["steps"].as_array().unwrap();
    let (vars_a, mut a) = setup(&f);
    for s in &steps[..3] {
        a.step(&grads(s, &vars_a)).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("opt.safetensors");
    a.save(&path).unwrap();
    // A fresh optimiser over a copy of the current weights, restored from the file.
    let (vars_b, mut b) = setup(&f);
    for (va, vb) in vars_a.iter().zip(&vars_b) {
        vb.set(va.as_tensor()).unwrap();
    }
    b.load(&path).unwrap();
    for s in &steps[3..] {
        a.step(&grads(s, &vars_a)).unwrap();
        b.step(&grads(s, &vars_b)).unwrap();
    }
    for (va, vb) in vars_a.iter().zip(&vars_b) {
        let x = va
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let y = vb
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(x, y);
    }
    // A state file for other parameters is refused with the missing key's name.
    let other = Var::new(&[0f32; 7], &Device::Cpu).unwrap();
    let mut c = AdamW::new(vec![("zz".into(), other)], AdamWConfig::default()).unwrap();
    let e = c.load(&path).unwrap_err().to_string();
    assert!(e.contains("t.zz") || e.contains("m.zz"), "{e}");
}
