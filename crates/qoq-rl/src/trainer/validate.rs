//! Validation: every row of `data.val_files` sampled, scored and evaluated; the generations
//! written to `<out_dir>/val_generations_{step}.jsonl`.

use super::{Result, TIMING_VALIDATION, Trainer, TrainerError};
use crate::metrics_log::names;
use std::collections::BTreeMap;
use std::time::Instant;

impl Trainer {
    /// Validation on `data.val_files` (spec §11-§12; `ray_trainer.py::_validate`): every row in
    /// file order, `rollout.val_override.n` samples at `rollout.val_override.temperature`
    /// (random stream = row index, so a validation depends only on the weights and the seed), in
    /// batches of `data.val_batch_size` prompts. Returns `val/reward_score`,
    /// `val/{component}_reward`, `val/test_score/{data_source}`, the evaluation metrics per
    /// dataset, per domain and overall (`{src}/{ds}/{metric}`, `{src}/{metric}`, `val/{metric}`,
    /// spec §8.9) and `timing_s/validation`; writes every generation with its scores (and the
    /// ground-truth box in the pixels of the image the model saw) to
    /// `<out_dir>/val_generations_{step}.jsonl` (atomically).
    pub fn validate(&self, step: u64) -> Result<BTreeMap<String, f64>> {
        let _span = tracing::info_span!("validate", step).entered();
        let t0 = Instant::now();
        let path = self.val_manifest.path().to_path_buf();
        let data_err = |message: String| TrainerError::Data {
            step,
            path: path.clone(),
            message,
        };
        let vo = &self.cfg.rollout.val_override;
        let mut gen_cfg = self.sampling()?;
        gen_cfg.sampling.temperature = vo.temperature as f32;
        gen_cfg.max_batch_rows = self.cfg.data.val_batch_size * vo.n;
        let mut acc =
            qoq_eval::metrics::MetricsAccumulator::new(qoq_eval::answer::Extraction::Evaluation);
        let mut components: BTreeMap<String, (f64, usize)> = BTreeMap::new();
        let mut per_source: BTreeMap<String, (f64, usize)> = BTreeMap::new();
        let mut lines = String::new();
        let mut rows = self
            .val_manifest
            .rows()
            .map_err(|e| data_err(e.to_string()))?
            .enumerate();
        loop {
            let mut drawn = Vec::with_capacity(self.cfg.data.val_batch_size);
            for (i, row) in rows.by_ref() {
                drawn.push((i as u64, row.map_err(|e| data_err(e.to_string()))?));
                if drawn.len() == self.cfg.data.val_batch_size {
                    break;
                }
            }
            if drawn.is_empty() {
                break;
            }
            let prompts = self.prepare(step, &path, drawn)?;
            let requests = self.requests(step, &path, &prompts, vo.n)?;
            let groups = self.generate(step, &path, &prompts, requests, &gen_cfg)?;
            let scored = self.score(step, &path, &prompts, groups)?;
            for (p, g) in prompts.iter().zip(&scored) {
                for (r, score) in g.group().rollouts().iter().zip(g.scores()) {
                    let text = &r.text;
                    for (name, v) in score.components() {
                        let e = components.entry(name).or_insert((0.0, 0));
                        e.0 += v;
                        e.1 += 1;
                    }
                    let src = p.sample.data_source.as_source().to_string();
                    let e = per_source.entry(src).or_insert((0.0, 0));
                    e.0 += score.overall;
                    e.1 += 1;
                    let mut pred =
                        qoq_eval::metrics::Prediction::from_sample(&p.sample, text.clone());
                    if p.mask.is_some() || p.sample.bbox.is_some() {
                        pred.iou = Some(score.iou_score);
                    }
                    acc.push(&pred);
                    let line = serde_json::json!({
                        "step": step,
                        "id": p.sample.id.0,
                        "line": p.sample.line,
                        "data_source": p.sample.data_source.as_source(),
                        "dataset": p.sample.dataset,
                        "answer": p.sample.answer,
                        "bbox": p.sample.bbox,
                        "response": text,
                        "response_tokens": r.token_ids.len(),
                        "finish": format!("{:?}", r.finish),
                        "reward": score,
                    });
                    lines.push_str(&line.to_string());
                    lines.push('\n');
                }
            }
        }
        let file = self.out_dir.join(format!("val_generations_{step}.jsonl"));
        let tmp = self
            .out_dir
            .join(format!(".val_generations_{step}.jsonl.tmp"));
        // Rank 0 alone writes (every rank validates the same weights).
        if self.writes() {
            std::fs::create_dir_all(&self.out_dir)
                .and_then(|_| std::fs::write(&tmp, &lines))
                .and_then(|_| std::fs::rename(&tmp, &file))
                .map_err(|e| TrainerError::Data {
                    step,
                    path: file.clone(),
                    message: format!("writing the validation generations: {e}"),
                })?;
        }
        let mut m: BTreeMap<String, f64> = BTreeMap::new();
        for (name, (sum, count)) in components {
            m.insert(format!("val/{name}_reward"), sum / count.max(1) as f64);
        }
        if let Some(v) = m.get("val/overall_reward").copied() {
            m.insert(names::VAL_REWARD_SCORE.into(), v);
        }
        for (src, (sum, count)) in per_source {
            m.insert(names::val_test_score(&src), sum / count.max(1) as f64);
        }
        for (k, v) in acc.finish().to_flat() {
            m.insert(k, v);
        }
        m.insert(TIMING_VALIDATION.into(), t0.elapsed().as_secs_f64());
        Ok(m)
    }
}
