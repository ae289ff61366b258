//! qoq-processor: the QoQ-Med processor (spec §3, §4, §5.1, §5.5), tensor-free.
//!
//! It turns a `ClinicalSample` into model-ready plain arrays, the way the reference's
//! `RLHFDataset.__getitem__` with `TimeSeriesQwen2_5_VLProcessor` does:
//! * [`tokenizer`]: `tokenizer.json` with the Qwen2.5-VL added tokens and `<|time_series_pad|>`;
//! * [`prompt`]: the format prompt and the chat template (`minijinja`);
//! * [`image`]: Qwen2-VL `smart_resize`, bicubic resize, normalisation, patch flattening;
//! * [`rope`]: M-RoPE position ids, HF `Qwen2_5_VLForConditionalGeneration.get_rope_index`;
//! * [`processor`]: samples to [`processor::ProcessedSample`], collation to
//!   [`processor::ProcessedBatch`];
//! * [`case`]: one case builder for cases given directly (`qoq infer`, `qoq serve`): the
//!   sample and the processed sample the manifest path gives for the equivalent row;
//! * [`settings`]: `qoq_processor.json`, the processor settings that travel with a model.
//!
//! The crate has no tensor dependency (ARCHITECTURE.md places the processor inside qoq-model; it
//! is a separate crate so its tests build without candle). The model crate turns its arrays into
//! tensors.

pub mod bpe;
pub mod case;
pub mod error;
pub mod image;
pub mod processor;
pub mod prompt;
pub mod rope;
pub mod settings;
pub mod tokenizer;

pub use case::{Case, CaseEcg, CaseImage};
pub use error::{Error, Result};
pub use processor::{
    ProcessedBatch, ProcessedSample, Processor, ProcessorOptions, Truncation, model_folder_files,
};
pub use settings::{ProcessorSettings, SETTINGS_FILE};
pub use tokenizer::QoqTokenizer;
