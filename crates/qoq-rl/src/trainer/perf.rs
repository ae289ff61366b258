//! Per-phase accounting of a step, for the run log and for `qoq bench train-step` (which times
//! the trainer's own step through it rather than a copy of the step):
//!
//! - seconds of the nested parts of the update (the reference policy's log-probs when the KL is in
//!   the loss, the optimiser's norm + clipping + AdamW), logged as `timing_s/ref` and
//!   `timing_s/optimizer`, both included in `timing_s/update_actor`;
//! - with [`Trainer::set_phase_memory`], each phase's peak resident memory (Linux: the
//!   high-water mark is reset before the phase through `/proc/self/clear_refs` and `VmHWM` read
//!   after it), logged as `memory/peak_mib/<phase>`;
//! - with [`Trainer::set_capture`], the step's exact update batch ([`CapturedStep`]), so that a
//!   reference implementation can run the same update on the same tensors.

use super::Trainer;
use candle_core::Tensor;
use qoq_model::ModelInputs;
use std::cell::RefCell;
use std::path::PathBuf;
use std::time::Instant;

/// Metric: seconds drawing and processing the step's rows and building the generation requests.
pub const TIMING_PROCESS: &str = "timing_s/process";
/// Metric: seconds in the optimiser (gradient norm, clipping, AdamW), part of
/// `timing_s/update_actor`.
pub const TIMING_OPTIMIZER: &str = "timing_s/optimizer";
/// Metric prefix: peak resident MiB of a phase (`memory/peak_mib/process`, `.../gen`,
/// `.../update`), with [`Trainer::set_phase_memory`].
pub const PEAK_MIB_PREFIX: &str = "memory/peak_mib/";

/// Resets this process's peak-RSS high-water mark; false where the kernel refuses (not Linux,
/// or a kernel without `clear_refs`).
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// `VmHWM` of this process in MiB (`None` where `/proc` does not say).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// One prompt of a captured step.
#[derive(Debug, Clone)]
pub struct CapturedPrompt {
    /// The rendered prompt text.
    pub prompt: String,
    /// Its image files.
    pub images: Vec<PathBuf>,
    /// The generation request's model inputs.
    pub inputs: ModelInputs,
}

/// One micro-batch of a captured update, as the loss saw it.
#[derive(Debug, Clone)]
pub struct CapturedMicroBatch {
    /// Prompt + response inputs.
    pub inputs: ModelInputs,
    /// Prompt length.
    pub s: usize,
    /// `(b, r)` response token ids.
    pub labels: Tensor,
    /// `(b, r)` response mask.
    pub mask: Tensor,
    /// `(b, r)` old log-probs.
    pub old_log_probs: Tensor,
    /// `(b, r)` advantages.
    pub advantages: Tensor,
    /// `(b, r)` reference log-probs (KL in the loss).
    pub ref_log_probs: Option<Tensor>,
    /// The micro-batch's policy-gradient loss (before the division by the micro-batch count).
    pub pg_loss: f64,
}

/// The update batch of one step.
#[derive(Debug, Clone, Default)]
pub struct CapturedStep {
    /// The step's prompts, in draw order.
    pub prompts: Vec<CapturedPrompt>,
    /// The actor update's micro-batches, in order (every epoch's).
    pub micro_batches: Vec<CapturedMicroBatch>,
}

/// The step's nested timers and the opt-in memory and capture switches.
#[derive(Debug, Default)]
pub(super) struct Perf {
    pub(super) memory: bool,
    pub(super) capture: bool,
    pub(super) ref_s: std::cell::Cell<f64>,
    pub(super) optimizer_s: std::cell::Cell<f64>,
    pub(super) captured: RefCell<Option<CapturedStep>>,
}

/// A running phase: its start time (the high-water mark was reset when memory is measured).
pub(super) struct PhaseTimer {
    t: Instant,
    memory: bool,
}

impl PhaseTimer {
    /// Seconds since the start; the phase's peak MiB written into `m` under `name` when
    /// memory is measured.
    pub(super) fn stop(self, name: &str, m: &mut std::collections::BTreeMap<String, f64>) -> f64 {
        if self.memory
            && let Some(p) = peak_rss_mib()
        {
            m.insert(format!("{PEAK_MIB_PREFIX}{name}"), p);
        }
        self.t.elapsed().as_secs_f64()
    }
}

impl Perf {
    /// Starts a phase.
    pub(super) fn phase(&self) -> PhaseTimer {
        if self.memory {
            reset_peak_rss();
        }
        PhaseTimer {
            t: Instant::now(),
            memory: self.memory,
        }
    }

    /// Clears the nested timers (and starts a capture) at the start of a step.
    pub(super) fn begin_step(&self) {
        self.ref_s.set(0.0);
        self.optimizer_s.set(0.0);
        if self.capture {
            *self.captured.borrow_mut() = Some(CapturedStep::default());
        }
    }

    /// Runs `f`, adding its seconds to `cell`.
    pub(super) fn timed<R>(cell: &std::cell::Cell<f64>, f: impl FnOnce() -> R) -> R {
        let t = Instant::now();
        let r = f();
        cell.set(cell.get() + t.elapsed().as_secs_f64());
        r
    }

    /// Adds to the capture, when one runs.
    pub(super) fn record(&self, f: impl FnOnce(&mut CapturedStep)) {
        if let Some(c) = self.captured.borrow_mut().as_mut() {
            f(c);
        }
    }
}

impl Trainer {
    /// Measures each phase's peak resident memory (`memory/peak_mib/<phase>` in the step's
    /// metrics). Off by default: it resets the process's high-water mark, which a caller
    /// measuring the whole run would not want.
    pub fn set_phase_memory(&mut self, on: bool) {
        self.perf.memory = on;
    }

    /// Keeps each step's exact update batch for [`Trainer::take_captured`]. Off by default (it
    /// holds the step's tensors).
    pub fn set_capture(&mut self, on: bool) {
        self.perf.capture = on;
    }

    /// The last step's update batch, with [`Trainer::set_capture`].
    pub fn take_captured(&mut self) -> Option<CapturedStep> {
        self.perf.captured.borrow_mut().take()
    }
}
