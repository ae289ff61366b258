//! Fuzz target: the QoQ medical reward and its parsers must be total on any UTF-8 input
//! (finite components in [0, 1], no panic, no stack overflow).
//!
//! Run: `cargo +nightly fuzz run reward -- -max_total_time=600` (or see fuzz/README.md for a
//! build without cargo-fuzz).
#![no_main]

use libfuzzer_sys::fuzz_target;
use qoq_core::SegMask;
use qoq_reward::pyvalue::{json_loads, literal_eval};
use qoq_reward::{Compat, IouReduce, MaskIndex, MedicalConfig, QoqMedicalReward};
use std::sync::OnceLock;

struct Fixture {
    rewards: Vec<QoqMedicalReward>,
    mask: MaskIndex,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let mut d = vec![0u8; 40 * 40];
        for y in 10..30 {
            for x in 10..30 {
                d[y * 40 + x] = 1;
            }
        }
        let mask = MaskIndex::new(&SegMask::new(40, 40, d).unwrap());
        let mut rewards = Vec::new();
        for compat in [Compat::Reference, Compat::Fixed] {
            for iou_reduce in [IouReduce::Mean, IouReduce::Max] {
                if compat == Compat::Reference && iou_reduce == IouReduce::Max {
                    continue;
                }
                rewards.push(
                    QoqMedicalReward::new(MedicalConfig {
                        compat,
                        iou_reduce,
                        ..MedicalConfig::default()
                    })
                    .unwrap(),
                );
            }
        }
        Fixture { rewards, mask }
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = json_loads(&text);
    let _ = literal_eval(&text);
    let f = fixture();
    for r in &f.rewards {
        for (mask, gt) in [
            (Some(&f.mask), None),
            (None, Some([0.0, 0.0, 10.0, 10.0])),
            (None, None),
        ] {
            let s = r.score_parts(&text, "Cardiomegaly, Edema", mask, gt);
            for v in [s.overall, s.standard_score, s.iou_score, s.format_score, s.length_score] {
                assert!(v.is_finite() && (0.0..=1.0).contains(&v), "{v} for {text:?}");
            }
        }
    }
});
