//! Writing model folders from scratch: a Qwen2.5-VL-architecture config with the ECG-JEPA
//! encoder whose special token ids follow a trained BPE ([`qoq_processor::bpe`]), seeded random
//! weights, and folders exported from a trainer's weights (the demo's models, and any small
//! model a user builds).

use crate::error::{Error, Result};
use candle_core::Tensor;
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;

/// Sizes of a small model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelSize {
    /// Decoder hidden size.
    pub hidden: usize,
    /// Decoder MLP width.
    pub intermediate: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Vision tower width.
    pub vision_hidden: usize,
    /// Vision tower blocks.
    pub vision_depth: usize,
    /// ECG-JEPA encoder width.
    pub ecg_embed: usize,
    /// ECG-JEPA encoder blocks.
    pub ecg_depth: usize,
    /// Vision tower MLP width.
    pub vision_intermediate: usize,
    /// Vision tower attention heads.
    pub vision_heads: usize,
    /// ECG-JEPA attention heads.
    pub ecg_heads: usize,
    /// Whether the language-model head shares the token embedding.
    pub tie_embeddings: bool,
}

impl ModelSize {
    /// The smallest model that runs every path (decoder hidden 32, 1 layer; vision 16 x 1;
    /// ECG 16 x 1): for tests.
    pub const TINY: ModelSize = ModelSize {
        hidden: 32,
        intermediate: 64,
        layers: 1,
        heads: 4,
        kv_heads: 2,
        vision_hidden: 16,
        vision_depth: 1,
        ecg_embed: 16,
        ecg_depth: 1,
        vision_intermediate: 32,
        vision_heads: 2,
        ecg_heads: 2,
        tie_embeddings: false,
    };

    /// The demo's model (`qoq demo`): decoder hidden 128, 2 layers; vision 64 x 2; ECG 32 x 2.
    /// (At decoder 64 and vision 32 the SFT model learned one answer per dataset in the demo's
    /// budget; at this width it starts to read the chest X-rays and the lesions' places.)
    pub const DEMO: ModelSize = ModelSize {
        hidden: 128,
        intermediate: 256,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        vision_hidden: 64,
        vision_depth: 2,
        ecg_embed: 32,
        ecg_depth: 2,
        vision_intermediate: 128,
        vision_heads: 2,
        ecg_heads: 2,
        tie_embeddings: false,
    };

    /// The project's 0.5B class (the prefill and train-step benches): Qwen2.5-0.5B's decoder
    /// (hidden 896, intermediate 4864, 24 layers, 14 heads, 2 key/value heads, tied
    /// embeddings), a 2-block vision tower of the 7B's width (1280, MLP 3420, 16 heads) and the
    /// QoQ-Med ECG-JEPA encoder (768 x 12, 16 heads).
    pub const HALF_B: ModelSize = ModelSize {
        hidden: 896,
        intermediate: 4864,
        layers: 24,
        heads: 14,
        kv_heads: 2,
        vision_hidden: 1280,
        vision_depth: 2,
        ecg_embed: 768,
        ecg_depth: 12,
        vision_intermediate: 3420,
        vision_heads: 16,
        ecg_heads: 16,
        tie_embeddings: true,
    };

    /// The presets by name, as `qoq model init --preset` takes them.
    pub const PRESETS: [(&'static str, ModelSize); 3] = [
        ("tiny", Self::TINY),
        ("demo", Self::DEMO),
        ("0.5b", Self::HALF_B),
    ];

    /// The preset called `name` ([`Self::PRESETS`]).
    pub fn preset(name: &str) -> Option<ModelSize> {
        Self::PRESETS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, s)| *s)
    }
}

/// `config.json` for a BPE vocabulary of `bpe_vocab` entries: the 23 added tokens follow it in
/// [`qoq_processor::tokenizer::QoqTokenizer`]'s order (`<|endoftext|>` first,
/// `<|time_series_pad|>` last).
pub fn config_json(size: &ModelSize, bpe_vocab: usize) -> serde_json::Value {
    let v = bpe_vocab as u64;
    let head_dim = size.hidden / size.heads;
    // M-RoPE sections over head_dim / 2 frequencies: temporal, height, width (Qwen's 16/24/24
    // proportions).
    let half = head_dim / 2;
    let t = half / 4;
    let h = (half - t) / 2;
    let w = half - t - h;
    json!({
        "architectures": ["TimeSeriesQwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "hidden_size": size.hidden,
        "intermediate_size": size.intermediate,
        "num_hidden_layers": size.layers,
        "num_attention_heads": size.heads,
        "num_key_value_heads": size.kv_heads,
        "vocab_size": v + qoq_processor::bpe::ADDED as u64,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "max_position_embeddings": 4096,
        "rope_scaling": {"type": "mrope", "mrope_section": [t, h, w]},
        "tie_word_embeddings": size.tie_embeddings,
        "vision_config": {
            "depth": size.vision_depth,
            "hidden_size": size.vision_hidden,
            "intermediate_size": size.vision_intermediate,
            "num_heads": size.vision_heads,
            "out_hidden_size": size.hidden,
            "fullatt_block_indexes": [size.vision_depth - 1],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "tokens_per_second": 2,
            "window_size": 112
        },
        "bos_token_id": v,
        "eos_token_id": v + 2,
        "vision_start_token_id": v + 9,
        "vision_end_token_id": v + 10,
        "vision_token_id": v + 11,
        "image_token_id": v + 12,
        "video_token_id": v + 13,
        "time_series_token_id": v + 22,
        "time_series_config": {
            "embed_dim": size.ecg_embed,
            "depth": size.ecg_depth,
            "num_heads": size.ecg_heads
        }
    })
}

/// `preprocessor_config.json`: Qwen2.5-VL's image processor.
pub fn preprocessor_json() -> serde_json::Value {
    json!({
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor"
    })
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v)
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?
        + "\n";
    std::fs::write(path, text).map_err(io(path))
}

/// Writes the initial model folder: config, preprocessor config, tokenizer, seeded weights.
pub fn write_initial(
    dir: &Path,
    config: &serde_json::Value,
    tokenizer_json: &str,
    seed: u64,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let cfg_path = dir.join("config.json");
    write_json(&cfg_path, config)?;
    let parsed = qoq_core::hf_config::QwenVlConfig::from_file(&cfg_path)
        .map_err(|e| Error::Config(format!("{}: {e}", cfg_path.display())))?;
    crate::train::write_random_checkpoint_seeded(&parsed, dir, seed)?;
    // The weights writer saves the parsed config; keep ours (the HF layout with every key).
    write_json(&cfg_path, config)?;
    write_json(&dir.join("preprocessor_config.json"), &preprocessor_json())?;
    let tok = dir.join("tokenizer.json");
    std::fs::write(&tok, tokenizer_json).map_err(io(&tok))
}

/// A fresh model folder (`qoq model init`): `size`'s architecture for the tokenizer at
/// `tokenizer` (a `tokenizer.json`, or a folder holding one), whose special-token ids the
/// config takes ([`config_json`]), with weights seeded by `seed` ([`write_initial`]). `dir` must
/// not exist or be empty: an existing model is never overwritten.
pub fn init_model(dir: &Path, size: &ModelSize, tokenizer: &Path, seed: u64) -> Result<()> {
    require_new_folder(dir)?;
    let tok_path = if tokenizer.is_dir() {
        tokenizer.join("tokenizer.json")
    } else {
        tokenizer.to_path_buf()
    };
    let text = std::fs::read_to_string(&tok_path).map_err(io(&tok_path))?;
    let tok = qoq_processor::tokenizer::QoqTokenizer::from_json_bytes(text.as_bytes())
        .map_err(|e| Error::Config(format!("{}: {e}", tok_path.display())))?;
    write_initial(
        dir,
        &config_json(size, tok.ids.endoftext as usize),
        &text,
        seed,
    )
}

/// Refuses `dir` as the destination of a new model folder unless it does not exist or is an
/// empty folder: an existing model is never overwritten.
pub fn require_new_folder(dir: &Path) -> Result<()> {
    if let Ok(mut entries) = std::fs::read_dir(dir)
        && entries.next().is_some()
    {
        return Err(Error::Config(format!(
            "{} exists and is not empty; give a new or empty folder",
            dir.display()
        )));
    }
    if dir.exists() && !dir.is_dir() {
        return Err(Error::Config(format!(
            "{} exists and is not a folder",
            dir.display()
        )));
    }
    Ok(())
}

/// The tensors of `vm` detached from their variables, by name: plain tensors, as a loaded
/// checkpoint holds them (a model built on variables takes the training paths: the
/// projections' and embedding's custom ops, a recorded graph). For benchmarks of inference on
/// random weights.
pub fn plain_tensors(vm: &candle_nn::VarMap) -> HashMap<String, Tensor> {
    let data = vm.data().lock().unwrap_or_else(|e| e.into_inner());
    data.iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect()
}

/// Writes a model folder with `weights`, the other files of `like` (config, preprocessor
/// config, and its tokenizer or the file `tokenizer` that overrides it, as
/// [`qoq_processor::model_folder_files`]) and the processor settings it was trained with
/// ([`qoq_processor::SETTINGS_FILE`]).
pub fn export(
    dir: &Path,
    like: &Path,
    tokenizer: Option<&Path>,
    weights: &HashMap<String, Tensor>,
    processor: &qoq_processor::ProcessorOptions,
) -> Result<()> {
    write_folder_files(dir, like, tokenizer, processor)?;
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(weights, &path).map_err(|e| Error::Checkpoint {
        path: path.clone(),
        message: e.to_string(),
    })
}

/// The files of a model folder besides its weights: `like`'s config, preprocessor config and
/// tokenizer (or the file `tokenizer` that overrides it, as
/// [`qoq_processor::model_folder_files`]) and the processor settings
/// ([`qoq_processor::SETTINGS_FILE`]).
fn write_folder_files(
    dir: &Path,
    like: &Path,
    tokenizer: Option<&Path>,
    processor: &qoq_processor::ProcessorOptions,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    for (name, from) in qoq_processor::model_folder_files(like, tokenizer) {
        std::fs::copy(&from, dir.join(name)).map_err(io(&from))?;
    }
    processor
        .write_to_model_dir(dir)
        .map_err(|e| Error::Config(format!("{}: {e}", dir.display())))
}

/// A tensor of [`export_replacing`]'s output: kept from the source's memory map, or replaced.
enum Exported<'a> {
    Kept(safetensors::tensor::TensorView<'a>),
    New(&'a Tensor),
}

impl safetensors::View for Exported<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        match self {
            Exported::Kept(v) => v.dtype(),
            Exported::New(t) => safetensors::View::dtype(t),
        }
    }
    fn shape(&self) -> &[usize] {
        match self {
            Exported::Kept(v) => v.shape(),
            Exported::New(t) => t.dims(),
        }
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        match self {
            Exported::Kept(v) => std::borrow::Cow::Borrowed(v.data()),
            Exported::New(t) => safetensors::View::data(t),
        }
    }
    fn data_len(&self) -> usize {
        match self {
            Exported::Kept(v) => v.data_len(),
            Exported::New(t) => safetensors::View::data_len(t),
        }
    }
}

/// [`export`] for a model that changed a few tensors of the checkpoint at `like` (a model
/// folder): writes `dir` with `like`'s folder files and the processor settings, and `like`'s
/// safetensors files under their own names (every shard and the index of a sharded checkpoint,
/// else `model.safetensors`), with their metadata, in which the tensors named in `replace`
/// (checkpoint names) hold the given values, converted to the checkpoint's dtype, and every
/// other tensor its bytes as they are.
///
/// Why not [`export`]: that takes every tensor as a loaded `Tensor`, so a caller that trained a
/// few of them (the ECG encoder of a 7B model) would load the whole checkpoint, a second copy
/// beside its own, and write a sharded checkpoint as one file. Here the kept tensors are written
/// from a memory map of each source file, one file at a time: they never enter the process's
/// heap. A name that is not in the checkpoint, or a replacement of another shape, is an error
/// naming it, and nothing is written for it.
#[allow(unsafe_code)]
pub fn export_replacing(
    dir: &Path,
    like: &Path,
    replace: &HashMap<String, Tensor>,
    processor: &qoq_processor::ProcessorOptions,
) -> Result<()> {
    let files = crate::loading::checkpoint_files(like)?;
    let bad = |path: &Path, message: String| Error::Checkpoint {
        path: path.to_path_buf(),
        message,
    };
    let mut maps = Vec::with_capacity(files.len());
    for f in &files {
        let file = std::fs::File::open(f).map_err(io(f))?;
        // SAFETY: the file is only read; a checkpoint modified on disk while mapped is undefined
        // behaviour, the documented contract of loading weights by mmap (as `loading`).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io(f))?;
        maps.push(map);
    }
    // Every replacement names a tensor of the checkpoint, with its shape: checked before writing.
    let mut parsed = Vec::with_capacity(files.len());
    let mut found: HashMap<&str, (safetensors::Dtype, Vec<usize>)> = HashMap::new();
    for (f, map) in files.iter().zip(&maps) {
        let st = safetensors::SafeTensors::deserialize(map).map_err(|e| {
            bad(
                f,
                format!("cannot read as safetensors (truncated or corrupt?): {e}"),
            )
        })?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(map)
            .map_err(|e| bad(f, format!("bad header: {e}")))?;
        for (name, view) in st.iter() {
            if let Some((key, _)) = replace.get_key_value(name) {
                found.insert(key.as_str(), (view.dtype(), view.shape().to_vec()));
            }
        }
        parsed.push((st, meta.metadata().clone()));
    }
    let mut converted: HashMap<&str, Tensor> = HashMap::with_capacity(replace.len());
    for (name, t) in replace {
        let (dtype, shape) = found.get(name.as_str()).ok_or_else(|| {
            bad(
                like,
                format!("{name} is not in the checkpoint: cannot replace it"),
            )
        })?;
        if t.dims() != shape.as_slice() {
            return Err(bad(
                like,
                format!(
                    "{name}: replacement of shape {:?}, the checkpoint's is {shape:?}",
                    t.dims()
                ),
            ));
        }
        let dtype =
            candle_core::DType::try_from(*dtype).map_err(|e| bad(like, format!("{name}: {e}")))?;
        converted.insert(name, t.to_dtype(dtype)?);
    }

    write_folder_files(dir, like, None, processor)?;
    let index = like.join(crate::loading::INDEX_FILE);
    if index.is_file() {
        std::fs::copy(&index, dir.join(crate::loading::INDEX_FILE)).map_err(io(&index))?;
    }
    for (f, (st, metadata)) in files.iter().zip(parsed) {
        let out = dir.join(f.file_name().unwrap_or(f.as_os_str()));
        let tensors = st.iter().map(|(name, view)| {
            let t = match converted.get(name) {
                Some(t) => Exported::New(t),
                None => Exported::Kept(view),
            };
            (name, t)
        });
        safetensors::serialize_to_file(tensors, metadata, &out)
            .map_err(|e| bad(&out, e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn initial_model_follows_the_trained_tokenizer_loads_and_exports() {
        let corpus: Vec<String> = (0..40)
            .map(|i| format!("Above is an image. What is the diagnosis? benign {i} malignant"))
            .collect();
        let (tok_json, tok) = qoq_processor::bpe::train_bpe(&corpus, 300).unwrap();
        let bpe = tok.ids.endoftext as usize;
        let size = ModelSize::TINY;
        let dir = tempfile::tempdir().unwrap();
        let init = dir.path().join("init");
        write_initial(&init, &config_json(&size, bpe), &tok_json, 3).unwrap();
        let (cfg, _) = crate::loading::load_model(&init, DType::F32, &Device::Cpu).unwrap();
        // Every special id of the config is the tokenizer's.
        assert_eq!(cfg.image_token_id, tok.ids.image_pad);
        assert_eq!(cfg.video_token_id, tok.ids.video_pad);
        assert_eq!(cfg.vision_start_token_id, tok.ids.vision_start);
        assert_eq!(cfg.vision_end_token_id, tok.ids.vision_end);
        assert_eq!(cfg.time_series_token_id, Some(tok.ids.time_series_pad));
        assert_eq!(cfg.bos_token_id, Some(tok.ids.endoftext));
        assert_eq!(cfg.eos_token_id, Some(tok.ids.im_end));
        assert_eq!(
            cfg.text.vocab_size,
            tok.ids.time_series_pad as usize + 1,
            "the vocabulary ends at the last added token"
        );
        // Seeded: the same seed writes the same weights, another seed other ones.
        let again = dir.path().join("again");
        write_initial(&again, &config_json(&size, bpe), &tok_json, 3).unwrap();
        let other = dir.path().join("other");
        write_initial(&other, &config_json(&size, bpe), &tok_json, 4).unwrap();
        let bytes = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
        assert_eq!(bytes(&init), bytes(&again));
        assert_ne!(bytes(&init), bytes(&other));
        // Export: the weights given, the folder's files, the processor settings.
        let w =
            candle_core::safetensors::load(init.join("model.safetensors"), &Device::Cpu).unwrap();
        let out = dir.path().join("out");
        export(&out, &init, None, &w, &Default::default()).unwrap();
        crate::loading::load_model(&out, DType::F32, &Device::Cpu).unwrap();
        assert!(out.join(qoq_processor::SETTINGS_FILE).is_file());
        assert_eq!(
            std::fs::read(out.join("tokenizer.json")).unwrap(),
            tok_json.as_bytes()
        );
        assert!(
            export(
                &out,
                &dir.path().join("missing"),
                None,
                &w,
                &Default::default()
            )
            .is_err()
        );
        // A tokenizer that overrides the folder's is the one exported.
        let other_tok = dir.path().join("other_tokenizer.json");
        std::fs::write(&other_tok, tok_json.replace("malignant", "malignant ")).unwrap();
        let out2 = dir.path().join("out2");
        export(&out2, &init, Some(&other_tok), &w, &Default::default()).unwrap();
        assert_eq!(
            std::fs::read(out2.join("tokenizer.json")).unwrap(),
            std::fs::read(&other_tok).unwrap()
        );
    }

    /// `export_replacing` keeps a sharded checkpoint sharded: every shard under its name with its
    /// metadata, the index, every kept tensor's bytes as they were, the replaced ones in the
    /// checkpoint's dtype; a name not in the checkpoint or a wrong shape writes nothing.
    #[test]
    fn export_replacing_streams_the_kept_tensors_shard_by_shard() {
        let corpus: Vec<String> = (0..20).map(|i| format!("benign {i} malignant")).collect();
        let (tok_json, tok) = qoq_processor::bpe::train_bpe(&corpus, 300).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let init = dir.path().join("init");
        let cfg_json = config_json(&ModelSize::TINY, tok.ids.endoftext as usize);
        write_initial(&init, &cfg_json, &tok_json, 0).unwrap();
        // Re-shard the model into two files, the second in bf16, with the "pt" metadata HF writes.
        let dev = Device::Cpu;
        let single = init.join(crate::loading::SINGLE_FILE);
        let all = candle_core::safetensors::load(&single, &dev).unwrap();
        std::fs::remove_file(&single).unwrap();
        let mut names: Vec<&String> = all.keys().collect();
        names.sort();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let mut map = serde_json::Map::new();
        for (i, n) in names.iter().enumerate() {
            let (shard, part, t) = if i % 2 == 0 {
                ("model-00001-of-00002.safetensors", &mut a, all[*n].clone())
            } else {
                let t = all[*n].to_dtype(DType::BF16).unwrap();
                ("model-00002-of-00002.safetensors", &mut b, t)
            };
            part.push(((*n).clone(), t));
            map.insert((*n).clone(), json!(shard));
        }
        let meta = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
        for (shard, part) in [
            ("model-00001-of-00002.safetensors", &a),
            ("model-00002-of-00002.safetensors", &b),
        ] {
            let items = part.iter().map(|(n, t)| (n.as_str(), t));
            safetensors::serialize_to_file(items, meta.clone(), &init.join(shard)).unwrap();
        }
        let index = json!({"metadata": {"total_size": 0}, "weight_map": map});
        std::fs::write(init.join(crate::loading::INDEX_FILE), index.to_string()).unwrap();

        // Replace one tensor of each shard (given in f32).
        let (ra, rb) = (a[0].0.clone(), b[0].0.clone());
        let new = |n: &str| (all[n].ones_like().unwrap() * 0.25).unwrap();
        let replace = HashMap::from([(ra.clone(), new(&ra)), (rb.clone(), new(&rb))]);
        let out = dir.path().join("out");
        export_replacing(&out, &init, &replace, &Default::default()).unwrap();
        crate::loading::load_model(&out, DType::F32, &dev).unwrap();
        assert!(out.join(qoq_processor::SETTINGS_FILE).is_file());
        assert!(!out.join(crate::loading::SINGLE_FILE).exists());
        assert_eq!(
            std::fs::read(out.join(crate::loading::INDEX_FILE)).unwrap(),
            std::fs::read(init.join(crate::loading::INDEX_FILE)).unwrap()
        );
        for (shard, part) in [
            ("model-00001-of-00002.safetensors", &a),
            ("model-00002-of-00002.safetensors", &b),
        ] {
            let (src, dst) = (
                std::fs::read(init.join(shard)).unwrap(),
                std::fs::read(out.join(shard)).unwrap(),
            );
            let (src_st, dst_st) = (
                safetensors::SafeTensors::deserialize(&src).unwrap(),
                safetensors::SafeTensors::deserialize(&dst).unwrap(),
            );
            let (_, m) = safetensors::SafeTensors::read_metadata(&dst).unwrap();
            assert_eq!(m.metadata(), &meta, "{shard}");
            assert_eq!(src_st.len(), dst_st.len(), "{shard}");
            let loaded = candle_core::safetensors::load(out.join(shard), &dev).unwrap();
            for (n, t) in part.iter() {
                let (s, d) = (src_st.tensor(n).unwrap(), dst_st.tensor(n).unwrap());
                assert_eq!((s.dtype(), s.shape()), (d.dtype(), d.shape()), "{n}");
                if replace.contains_key(n) {
                    assert_ne!(s.data(), d.data(), "{n} was not replaced");
                    let got = loaded[n].to_dtype(DType::F32).unwrap();
                    let want = replace[n].to_dtype(t.dtype()).unwrap();
                    let diff = (got - want.to_dtype(DType::F32).unwrap())
                        .unwrap()
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap();
                    assert_eq!(diff, 0.0, "{n}");
                } else {
                    assert_eq!(s.data(), d.data(), "{n} changed");
                }
            }
        }
        // Refused before anything is written: an unknown name, a wrong shape.
        let bad = dir.path().join("bad");
        let unknown = HashMap::from([("model.nope.weight".to_string(), new(&ra))]);
        let e = export_replacing(&bad, &init, &unknown, &Default::default()).unwrap_err();
        assert!(e.to_string().contains("model.nope.weight"), "{e}");
        let wrong = HashMap::from([(ra.clone(), Tensor::zeros(7, DType::F32, &dev).unwrap())]);
        let e = export_replacing(&bad, &init, &wrong, &Default::default()).unwrap_err();
        assert!(
            e.to_string().contains(&ra) && e.to_string().contains("shape"),
            "{e}"
        );
        assert!(!bad.exists());
    }

    /// A varmap's tensors come out by name with their values, as plain tensors.
    #[test]
    fn plain_tensors_are_the_variables_values_untracked() {
        let vm = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let w = vb
            .get_with_hints((2, 3), "w", candle_nn::Init::Const(0.5))
            .unwrap();
        assert!(w.is_variable());
        let plain = plain_tensors(&vm);
        assert_eq!(plain.len(), 1);
        assert!(!plain["w"].track_op());
        assert_eq!(
            plain["w"].to_vec2::<f32>().unwrap(),
            w.to_vec2::<f32>().unwrap()
        );
    }

    /// A fresh model's vision tower and ECG encoder pass their input on: their norms start at
    /// one (they started at zero, which made every image give the same vision tokens and every
    /// ECG the same embedding, and left the vision MLPs without a gradient).
    #[test]
    fn a_fresh_models_towers_depend_on_their_inputs() {
        let corpus: Vec<String> = (0..20).map(|i| format!("benign {i} malignant")).collect();
        let (tok_json, tok) = qoq_processor::bpe::train_bpe(&corpus, 300).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let size = ModelSize::DEMO;
        let cfg_json = config_json(&size, tok.ids.endoftext as usize);
        write_initial(dir.path(), &cfg_json, &tok_json, 0).unwrap();
        let dev = Device::Cpu;
        let weights =
            candle_core::safetensors::load(dir.path().join("model.safetensors"), &dev).unwrap();
        let mut norms = 0;
        for (name, t) in &weights {
            let is_norm_scale = name.ends_with("ln_q.weight")
                || (name.ends_with(".weight")
                    && name.rsplit('.').nth(1).is_some_and(|m| m.contains("norm")));
            if is_norm_scale {
                let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                assert!(v.iter().all(|&x| x == 1.0), "{name} does not start at one");
                norms += 1;
            }
        }
        // Decoder 2 x 2 + final, vision 2 x 2 + merger, ECG 2 x 2 + final.
        assert_eq!(norms, 5 + 5 + 5);
        let cfg: qoq_core::hf_config::QwenVlConfig = serde_json::from_value(cfg_json).unwrap();
        let vb = candle_nn::VarBuilder::from_tensors(weights, DType::F32, &dev);
        let mode = crate::ForwardMode::Train;
        let differ = |a: &Tensor, b: &Tensor| -> f32 {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };

        let tower = crate::vision::VisionTower::new(&cfg.vision, vb.pp("visual")).unwrap();
        let grid = [[1, 4, 4]];
        let pixels = |phase: f64| {
            let v: Vec<f32> = (0..16 * cfg.vision.patch_dim())
                .map(|k| (k as f64 * 0.37 + phase).sin() as f32)
                .collect();
            Tensor::from_vec(v, (16, cfg.vision.patch_dim()), &dev).unwrap()
        };
        let (a, b) = (
            tower.forward(&pixels(0.0), &grid, mode).unwrap(),
            tower.forward(&pixels(1.3), &grid, mode).unwrap(),
        );
        assert!(
            differ(&a, &b) > 1e-3,
            "two images give the same vision tokens"
        );

        let ecg = crate::ecg::TimeSeriesEmbedding::new(
            &cfg.time_series,
            cfg.text.hidden_size,
            vb.pp("time_series_embedding"),
        )
        .unwrap();
        let n = cfg.time_series.samples();
        let signal = |f: f64| {
            let v: Vec<f32> = (0..8 * n).map(|k| (k as f64 * f).sin() as f32).collect();
            Tensor::from_vec(v, (1, 8, n), &dev).unwrap()
        };
        let (a, b) = (
            ecg.forward(&signal(0.01), mode).unwrap(),
            ecg.forward(&signal(0.05), mode).unwrap(),
        );
        // Mean-pooled over 400 patches with 0.02-scale weights, an untrained ECG encoder's
        // output moves little with its input (about 3e-4 here), but it moves.
        let d = differ(&a, &b);
        assert!(d > 1e-5, "two ECGs give the same embedding ({d})");
    }

    #[test]
    fn init_model_takes_the_tokenizer_file_or_folder_and_refuses_a_non_empty_folder() {
        let corpus: Vec<String> = (0..20).map(|i| format!("benign {i} malignant")).collect();
        let (tok_json, tok) = qoq_processor::bpe::train_bpe(&corpus, 300).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let tok_file = dir.path().join("tok.json");
        std::fs::write(&tok_file, &tok_json).unwrap();
        let a = dir.path().join("a");
        init_model(&a, &ModelSize::TINY, &tok_file, 5).unwrap();
        let (cfg, _) = crate::loading::load_model(&a, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(cfg.image_token_id, tok.ids.image_pad);
        assert_eq!(cfg.text.hidden_size, ModelSize::TINY.hidden);
        for f in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "preprocessor_config.json",
        ] {
            assert!(a.join(f).is_file(), "{f}");
        }
        // A model folder as the tokenizer; an empty folder as the destination.
        let b = dir.path().join("b");
        std::fs::create_dir(&b).unwrap();
        init_model(&b, &ModelSize::TINY, &a, 5).unwrap();
        let bytes = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
        assert_eq!(bytes(&a), bytes(&b), "same preset, tokenizer and seed");
        // Never over an existing model.
        let e = init_model(&a, &ModelSize::TINY, &tok_file, 6).unwrap_err();
        assert!(e.to_string().contains("not empty"), "{e}");
        assert_eq!(bytes(&a), bytes(&b));
        // A file that is not a tokenizer is named.
        let e = init_model(
            &dir.path().join("c"),
            &ModelSize::TINY,
            &a.join("config.json"),
            0,
        )
        .unwrap_err();
        assert!(e.to_string().contains("config.json"), "{e}");
        // Every preset's config parses with its sizes.
        for (name, size) in ModelSize::PRESETS {
            assert_eq!(ModelSize::preset(name), Some(size));
            let v = config_json(&size, 1000);
            let cfg: qoq_core::hf_config::QwenVlConfig = serde_json::from_value(v).unwrap();
            assert_eq!(cfg.text.num_hidden_layers, size.layers, "{name}");
            assert_eq!(cfg.vision.num_heads, size.vision_heads, "{name}");
            assert_eq!(cfg.time_series.num_heads, size.ecg_heads, "{name}");
        }
        assert_eq!(ModelSize::preset("7b"), None);
    }
}
