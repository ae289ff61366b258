//! Rollout: the step's manifest rows in their seeded, resumable order → [`Prompt`]s (processed,
//! the ground-truth box in the model's pixels, the segmentation mask indexed) → one
//! [`RolloutGroup`] of `n` decoded rollouts per prompt, sampled with [`qoq_engine::generate`]
//! or by an OpenAI-compatible server (`rollout.backend = "openai"`, [`super::openai`]).

use super::openai::Backend;
use super::{Result, Trainer, TrainerError};
use qoq_core::{ClinicalSample, GroupId, Rollout, RolloutGroup};
use qoq_engine::{GenerateConfig, GroupRequest, KvBudget, SamplingParams, StopCondition};
use qoq_processor::processor::ProcessedSample;
use qoq_reward::MaskIndex;
use std::path::Path;

/// One prompt of a step: the drawn row, processed for the model. `groups[i]` of the rollout
/// stage answers `prompts[i]`.
pub struct Prompt {
    /// The random stream id (`epoch · rows + row index`; the row index for validation).
    pub stream: u64,
    /// The row, its box rescaled to the pixels of the image the model sees.
    pub sample: ClinicalSample,
    /// The processed prompt.
    pub processed: ProcessedSample,
    /// The segmentation mask at the processed image size, when the row has one.
    pub mask: Option<MaskIndex>,
}

impl Prompt {
    /// The id of this prompt's group: the sample id and the stream (a row drawn twice in one
    /// step, across an epoch end, makes two groups).
    pub fn group_id(&self) -> GroupId {
        GroupId(format!("{}#{}", self.sample.id.0, self.stream))
    }
}

impl Trainer {
    /// Draws the step's prompts in the seeded order, each row's files decoded once
    /// ([`Trainer::prepare_one`]). With `data.manifest.skip_bad_rows`, rows whose JSON is bad
    /// are skipped by the stream and rows whose files fail to decode are skipped here (a whole
    /// epoch's worth of bad rows in a row ends the stream); without it the first bad row stops
    /// the step, naming its line.
    pub(super) fn draw(&mut self, step: u64) -> Result<Vec<Prompt>> {
        let want = self.cfg.data.rollout_batch_size;
        let seed = self.cfg.data.seed;
        let rows = self.manifest.len() as u64;
        let path = self.manifest.path().to_path_buf();
        let data_err = |message: String| TrainerError::Data {
            step,
            path: path.clone(),
            message,
        };
        let mut out = Vec::with_capacity(want);
        let mut order: Option<(u64, Vec<u32>)> = None;
        let mut next = self.cursor;
        let skip = self.cfg.data.manifest.skip_bad_rows;
        let mut iter = self
            .manifest
            .training_rows(seed, self.cursor)
            .map_err(|e| data_err(e.to_string()))?;
        let mut undecodable = 0usize;
        let mut consecutive = 0usize;
        for (after, row) in iter.by_ref() {
            let sample = row.map_err(|e| data_err(e.to_string()))?;
            next = after;
            // The row index: the position just consumed in `after`'s epoch order.
            let epoch = after.epoch;
            if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
                order = Some((epoch, self.manifest.epoch_order(seed, epoch)));
            }
            let index = order
                .as_ref()
                .map_or(0, |(_, o)| o[after.position as usize - 1]);
            let line = sample.line;
            match self.prepare_one(epoch * rows + u64::from(index), sample) {
                Ok(prompt) => {
                    consecutive = 0;
                    out.push(prompt);
                    if out.len() == want {
                        break;
                    }
                }
                Err(reason) if skip => {
                    tracing::warn!(
                        step,
                        manifest = %path.display(),
                        line,
                        %reason,
                        "skipping a row whose files fail to decode (data.manifest.skip_bad_rows)"
                    );
                    undecodable += 1;
                    consecutive += 1;
                    if consecutive >= rows.max(1) as usize {
                        break;
                    }
                }
                Err(reason) => return Err(data_err(format!("line {line}: {reason}"))),
            }
        }
        for bad in iter.skipped() {
            tracing::warn!(
                step,
                manifest = %path.display(),
                line = bad.line,
                reason = %bad.reason,
                "skipping a bad row (data.manifest.skip_bad_rows)"
            );
        }
        let skipped = iter.skipped_count() + undecodable;
        if out.len() < want {
            return Err(data_err(format!(
                "the stream ended after {} of {want} rows ({skipped} bad rows skipped{})",
                out.len(),
                if skip {
                    "; a whole epoch's worth of rows in a row was bad"
                } else {
                    ""
                }
            )));
        }
        self.cursor = next;
        self.skipped_rows = skipped;
        Ok(out)
    }

    /// The key/value budget of the rollout batch: `rollout.kv_cache_mib`, or what
    /// `rollout.gpu_memory_utilization` of the GPU's memory leaves after what is allocated now.
    fn kv_budget(&self) -> Result<Option<KvBudget>> {
        let r = &self.cfg.rollout;
        if let Some(u) = r.gpu_memory_utilization {
            let key = "rollout.gpu_memory_utilization";
            let mem = qoq_model::device::memory(self.model.device())
                .map_err(|e| TrainerError::Config(format!("{key}: {e}")))?;
            let cap = (u * mem.total as f64) as u64;
            let used = mem.total.saturating_sub(mem.free);
            if cap <= used {
                return Err(TrainerError::Config(format!(
                    "{key} = {u}: {:.0} MiB of the GPU's {:.0} MiB, but {:.0} MiB are in use \
                     already (weights, optimiser state): nothing is left for the key/value \
                     cache; raise it",
                    KvBudget::mib(cap),
                    KvBudget::mib(mem.total),
                    KvBudget::mib(used)
                )));
            }
            return Ok(Some(KvBudget::for_model(
                &self.model,
                cap - used,
                format!("{key} = {u}"),
            )));
        }
        Ok((r.kv_cache_mib > 0).then(|| {
            KvBudget::for_model(
                &self.model,
                r.kv_cache_mib.saturating_mul(1024 * 1024),
                format!("rollout.kv_cache_mib = {}", r.kv_cache_mib),
            )
        }))
    }

    /// The rollout sampling settings of the run.
    pub(super) fn sampling(&self) -> Result<GenerateConfig> {
        let r = &self.cfg.rollout;
        let ids = self.processor.tokenizer.ids;
        // The reference biases `<|image_pad|>`; the video and ECG placeholders get the same
        // bias here, as a sampled placeholder cannot be re-encoded by the training forward.
        let placeholders = self.placeholder_ids();
        Ok(GenerateConfig {
            sampling: SamplingParams {
                temperature: r.temperature as f32,
                top_p: r.top_p as f32,
                top_k: usize::try_from(r.top_k).unwrap_or(0),
                seed: r.seed,
                logit_bias: if r.image_pad_logit_bias != 0.0 {
                    placeholders
                        .iter()
                        .map(|&t| (t, r.image_pad_logit_bias as f32))
                        .collect()
                } else {
                    Vec::new()
                },
                ..SamplingParams::default()
            },
            stop: StopCondition {
                eos: if r.ignore_eos {
                    Vec::new()
                } else {
                    vec![ids.im_end, ids.endoftext]
                },
                max_new_tokens: self.cfg.data.max_response_length,
            },
            max_batch_rows: self.cfg.rollouts_per_step(),
            prefill_tokens: r.max_num_batched_tokens,
            kv_budget: self.kv_budget()?,
        })
    }

    /// Token ids the model replaces by encoder features.
    pub(super) fn placeholder_ids(&self) -> Vec<u32> {
        self.model.config().placeholder_token_ids()
    }

    /// One row's files decoded for the model, as the prompt of random stream `stream`: the
    /// processed prompt, the row with its box in the model's pixels, and its segmentation mask
    /// indexed; why not otherwise.
    pub(super) fn prepare_one(
        &self,
        stream: u64,
        mut sample: ClinicalSample,
    ) -> std::result::Result<Prompt, String> {
        let processed = self
            .processor
            .process_sample(&sample)
            .map_err(|e| e.to_string())?;
        let images = processed.image_grid_thw.len();
        if images > self.cfg.rollout.limit_images {
            return Err(format!(
                "{images} images (frames and slices included), more than rollout.limit_images = {}",
                self.cfg.rollout.limit_images
            ));
        }
        box_to_model_pixels(&mut sample, &processed)?;
        let mask = match (&sample.segmentation_path, processed.image_sizes.first()) {
            (Some(p), Some(&size)) => {
                let m = qoq_data::vision::load_mask(p, size, self.cfg.data.mask_wh_swap_bug)
                    .map_err(|e| e.to_string())?;
                Some(MaskIndex::new(&m))
            }
            _ => None,
        };
        Ok(Prompt {
            stream,
            sample,
            processed,
            mask,
        })
    }

    /// Processes rows into prompts ([`Trainer::prepare_one`]); errors name `path` (the
    /// manifest) and the row's line.
    pub(super) fn prepare(
        &self,
        step: u64,
        path: &Path,
        drawn: Vec<(u64, ClinicalSample)>,
    ) -> Result<Vec<Prompt>> {
        drawn
            .into_iter()
            .map(|(stream, sample)| {
                let line = sample.line;
                self.prepare_one(stream, sample)
                    .map_err(|e| TrainerError::Data {
                        step,
                        path: path.to_path_buf(),
                        message: format!("line {line}: {e}"),
                    })
            })
            .collect()
    }

    /// The generation requests of `n` rollouts for each prompt; errors name `path` (the
    /// manifest) and the row's line.
    pub(super) fn requests(
        &self,
        step: u64,
        path: &Path,
        prompts: &[Prompt],
        n: usize,
    ) -> Result<Vec<GroupRequest>> {
        prompts
            .iter()
            .map(|p| {
                let batch = self
                    .processor
                    .collate(std::slice::from_ref(&p.processed), None)
                    .map_err(|e| TrainerError::Data {
                        step,
                        path: path.to_path_buf(),
                        message: format!("line {}: {e}", p.sample.line),
                    })?;
                let inputs = qoq_model::prompt_inputs(&batch, &self.device)?;
                Ok(GroupRequest {
                    inputs,
                    n,
                    stream: p.stream,
                })
            })
            .collect()
    }

    /// Samples every prompt's rollouts and decodes them: one group per prompt, in order, keyed
    /// by [`Prompt::group_id`] with the domain `algorithm.drpo.domain_key` names.
    pub(super) fn generate(
        &self,
        step: u64,
        path: &Path,
        prompts: &[Prompt],
        requests: Vec<GroupRequest>,
        cfg: &GenerateConfig,
    ) -> Result<Vec<RolloutGroup>> {
        let gen_err = |message: String| TrainerError::Generate { step, message };
        let generated = match &self.backend {
            Backend::Engine => qoq_engine::generate(&self.model, &requests, cfg, |_, _, _| {})
                .map_err(|e| gen_err(e.to_string()))?,
            Backend::OpenAi(server) => {
                server.sync(self, step)?;
                let n: Vec<usize> = requests.iter().map(|r| r.n).collect();
                server.generate(self, step, prompts, &n, cfg)?
            }
        };
        drop(requests);
        let key = self.cfg.algorithm.drpo.domain_key;
        let mut groups = Vec::with_capacity(prompts.len());
        for (p, rollouts) in prompts.iter().zip(generated) {
            let mut decoded = Vec::with_capacity(rollouts.len());
            for r in rollouts {
                let text = self
                    .processor
                    .tokenizer
                    .decode(&r.tokens, true)
                    .map_err(|e| TrainerError::Data {
                        step,
                        path: path.to_path_buf(),
                        message: format!("line {}: decoding a response: {e}", p.sample.line),
                    })?;
                decoded.push(Rollout {
                    token_ids: r.tokens,
                    logprobs: r.logprobs,
                    text,
                    finish: r.finish,
                });
            }
            let group = RolloutGroup::new(
                p.group_id(),
                p.sample.id.clone(),
                p.sample.domain_key(key),
                decoded,
            )
            .map_err(|e| gen_err(e.to_string()))?;
            groups.push(group);
        }
        if groups.len() != prompts.len() {
            return Err(gen_err(format!(
                "{} groups for {} prompts",
                groups.len(),
                prompts.len()
            )));
        }
        Ok(groups)
    }
}

impl Trainer {
    /// ReMax's baselines: one greedy rollout per prompt (temperature 0, `n = 1`, the prompt's
    /// stream), scored by the reward without the KL (verl's `reward_baselines`), in prompt order.
    pub(super) fn greedy_baselines(
        &self,
        step: u64,
        path: &Path,
        prompts: &[Prompt],
    ) -> Result<Vec<f64>> {
        let requests = self.requests(step, path, prompts, 1)?;
        let mut cfg = self.sampling()?;
        cfg.sampling.temperature = 0.0;
        cfg.max_batch_rows = prompts.len();
        let groups = self.generate(step, path, prompts, requests, &cfg)?;
        let scored = self.score(step, path, prompts, groups)?;
        Ok(scored.iter().map(|g| g.rewards()[0]).collect())
    }
}

/// Rescales the sample's ground-truth box from the original first image's pixels to the image
/// the model sees (the dataset-side resize; spec §4.3), as the predicted boxes are in those
/// pixels.
fn box_to_model_pixels(
    sample: &mut ClinicalSample,
    processed: &ProcessedSample,
) -> std::result::Result<(), String> {
    if let (Some(b), Some(img), Some(&to)) = (
        sample.bbox,
        sample.images.first(),
        processed.image_sizes.first(),
    ) {
        let from = qoq_data::vision::image_dims(img).map_err(|e| e.to_string())?;
        sample.bbox = Some(qoq_data::vision::rescale_bbox(b, from, to));
    }
    Ok(())
}
