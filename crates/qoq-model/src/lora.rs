//! Linear projections with optional LoRA adapters (Hu et al. 2021; PEFT `lora.Linear` semantics).
//!
//! `y = x W^T + b + (alpha / r) · (x A^T) B^T`, with `A: (r, in)` drawn Kaiming-uniform and
//! `B: (out, r)` zero at creation, so a fresh adapter leaves the model unchanged. Adapters live in
//! their own [`candle_nn::VarMap`] under `<projection>.lora_A.weight` / `.lora_B.weight`; merging
//! writes `W + (alpha / r) · B A` back under the checkpoint's own key `<projection>.weight`.

use candle_core::{Result, Tensor};
use candle_nn::{Init, Linear, VarBuilder};

/// Which projections get adapters, and their size.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Adapter rank r.
    pub rank: usize,
    /// Scaling numerator: the update is multiplied by `alpha / rank`.
    pub alpha: f64,
    /// Leaf names of the LLM projections that get adapters (`q_proj`, `k_proj`, `v_proj`,
    /// `o_proj`, `gate_proj`, `up_proj`, `down_proj`).
    #[serde(default = "all_targets")]
    pub targets: Vec<String>,
}

/// Every attention and MLP projection of the Qwen2 decoder.
pub fn all_targets() -> Vec<String> {
    [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    .map(String::from)
    .to_vec()
}

impl LoraConfig {
    /// `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Whether projection `leaf` (e.g. `q_proj`) gets an adapter.
    pub fn targets(&self, leaf: &str) -> bool {
        self.targets.iter().any(|t| t == leaf)
    }
}

/// Where adapters are created: the config and a builder (normally over a `VarMap`).
#[derive(Clone)]
pub struct LoraBuilder<'a> {
    /// Sizes and targets.
    pub cfg: LoraConfig,
    /// Builder at the root; adapters are created under the projection's checkpoint path.
    pub vb: VarBuilder<'a>,
}

/// A low-rank update of one projection.
#[derive(Debug, Clone)]
struct Adapter {
    a: Tensor, // (r, in)
    b: Tensor, // (out, r)
    scale: f64,
}

/// A linear projection named as in the checkpoint, with an optional LoRA adapter.
#[derive(Debug, Clone)]
pub struct Proj {
    name: String,
    base: Linear,
    adapter: Option<Adapter>,
}

impl Proj {
    /// Build `vb`'s `weight` (`(out, in)`) and, when `bias`, `bias` (`(out,)`); add an adapter when
    /// `lora` targets `leaf`.
    pub fn new(
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        leaf: &str,
        vb: VarBuilder,
        lora: Option<&LoraBuilder>,
    ) -> Result<Self> {
        let vb = vb.pp(leaf);
        let name = vb.prefix();
        let base = candle_nn::linear_b(in_dim, out_dim, bias, vb)?;
        let adapter = match lora {
            Some(l) if l.cfg.targets(leaf) => {
                if l.cfg.rank == 0 {
                    candle_core::bail!("LoRA rank must be positive");
                }
                let lvb = l.vb.root().pp(&name);
                let bound = 1.0 / (in_dim as f64).sqrt();
                let a = lvb.pp("lora_A").get_with_hints(
                    (l.cfg.rank, in_dim),
                    "weight",
                    Init::Uniform {
                        lo: -bound,
                        up: bound,
                    },
                )?;
                let b = lvb.pp("lora_B").get_with_hints(
                    (out_dim, l.cfg.rank),
                    "weight",
                    Init::Const(0.0),
                )?;
                Some(Adapter {
                    a,
                    b,
                    scale: l.cfg.scale(),
                })
            }
            _ => None,
        };
        Ok(Self {
            name,
            base,
            adapter,
        })
    }

    /// The checkpoint path of this projection (without `.weight`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether an adapter is attached.
    pub fn has_adapter(&self) -> bool {
        self.adapter.is_some()
    }

    /// `W + scale · B A` when an adapter is attached, as `(checkpoint key, weight)`.
    pub fn merged_weight(&self) -> Result<Option<(String, Tensor)>> {
        match self.merged_onto(self.base.weight())? {
            Some(w) => Ok(Some((format!("{}.weight", self.name), w))),
            None => Ok(None),
        }
    }

    /// `base + scale · B A` (computed in f32, returned in `base`'s dtype) when an adapter is
    /// attached: the merge onto another copy of this projection's weight (the f32 master of a
    /// model whose own weight is a bf16 compute copy).
    pub fn merged_onto(&self, base: &Tensor) -> Result<Option<Tensor>> {
        let Some(ad) = &self.adapter else {
            return Ok(None);
        };
        let f32 = candle_core::DType::F32;
        let delta = (ad.b.to_dtype(f32)?.matmul(&ad.a.to_dtype(f32)?)? * ad.scale)?; // (out, in)
        Ok(Some((base.to_dtype(f32)? + delta)?.to_dtype(base.dtype())?))
    }

    /// `x: (..., in)` → `(..., out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // A frozen base weight (LoRA's, a frozen LLM's) gets no gradient computed.
        let y = crate::linear::linear(&self.base, x)?;
        match &self.adapter {
            None => Ok(y),
            Some(ad) => {
                let a = ad.a.to_dtype(x.dtype())?;
                let b = ad.b.to_dtype(x.dtype())?;
                let low = x.broadcast_matmul(&a.t()?)?; // (..., r)
                let up = low.broadcast_matmul(&b.t()?)?; // (..., out)
                y + (up * ad.scale)?
            }
        }
    }
}

/// PEFT's prefix of adapter keys: `PeftModel.base_model` (the `LoraModel`) `.model` (the wrapped
/// `Qwen2_5_VLForConditionalGeneration`), then the module path.
pub const PEFT_PREFIX: &str = "base_model.model.";
/// PEFT's adapter config file.
pub const PEFT_CONFIG_FILE: &str = "adapter_config.json";
/// PEFT's adapter weights file.
pub const PEFT_WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The PEFT key of an adapter tensor named as in this crate (`<projection>.lora_A.weight`):
/// `base_model.model.<projection>.lora_A.weight`, the name `PeftModel.save_pretrained` writes
/// (the adapter name `default` removed) for the transformers-4.51 module path
/// (`model.layers.N.self_attn.q_proj`).
pub fn peft_key(name: &str) -> String {
    format!("{PEFT_PREFIX}{name}")
}

/// The inverse of [`peft_key`].
pub fn from_peft_key(key: &str) -> Option<&str> {
    key.strip_prefix(PEFT_PREFIX)
}

/// PEFT's `target_modules` for `cfg`: a regular expression that PEFT full-matches against module
/// names, restricted to the decoder (`model.layers.N.self_attn.*` / `model.layers.N.mlp.*`), since
/// the leaf names `gate_proj`, `up_proj`, `down_proj` also name the vision blocks' MLP, which
/// carries no adapter here.
pub fn peft_target_modules(cfg: &LoraConfig) -> String {
    let group = |leaves: &[&'static str]| -> Vec<&'static str> {
        leaves.iter().copied().filter(|l| cfg.targets(l)).collect()
    };
    let attn = group(&["q_proj", "k_proj", "v_proj", "o_proj"]);
    let mlp = group(&["gate_proj", "up_proj", "down_proj"]);
    let mut alts = Vec::new();
    if !attn.is_empty() {
        alts.push(format!("self_attn\\.({})", attn.join("|")));
    }
    if !mlp.is_empty() {
        alts.push(format!("mlp\\.({})", mlp.join("|")));
    }
    format!("model\\.layers\\.\\d+\\.({})", alts.join("|"))
}

/// `adapter_config.json` of a PEFT LoRA adapter of `cfg` with `dropout`, on `base_model`.
pub fn peft_adapter_config(cfg: &LoraConfig, dropout: f64, base_model: &str) -> serde_json::Value {
    let alpha = if cfg.alpha.fract() == 0.0 && cfg.alpha.abs() < 1e15 {
        serde_json::json!(cfg.alpha as i64)
    } else {
        serde_json::json!(cfg.alpha)
    };
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": peft_target_modules(cfg),
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "use_rslora": false,
        "use_dora": false,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
    })
}

/// Writes a PEFT adapter folder: [`PEFT_CONFIG_FILE`] ([`peft_adapter_config`]) and
/// [`PEFT_WEIGHTS_FILE`] with `adapters` (named as in this crate) under their [`peft_key`].
pub fn write_peft(
    dir: &std::path::Path,
    cfg: &LoraConfig,
    dropout: f64,
    base_model: &str,
    adapters: &std::collections::HashMap<String, Tensor>,
) -> crate::Result<()> {
    let io = |path: &std::path::Path| {
        let path = path.to_path_buf();
        move |source| crate::Error::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let p = dir.join(PEFT_CONFIG_FILE);
    let text = serde_json::to_string_pretty(&peft_adapter_config(cfg, dropout, base_model))
        .map_err(|e| crate::Error::Config(e.to_string()))?
        + "\n";
    std::fs::write(&p, text).map_err(io(&p))?;
    let p = dir.join(PEFT_WEIGHTS_FILE);
    let named: std::collections::HashMap<String, Tensor> = adapters
        .iter()
        .map(|(k, v)| (peft_key(k), v.clone()))
        .collect();
    candle_core::safetensors::save(&named, &p).map_err(|e| crate::Error::Checkpoint {
        path: p.clone(),
        message: format!("cannot write: {e}"),
    })
}

/// The adapter tensors of a PEFT [`PEFT_WEIGHTS_FILE`], named as in this crate; a key without
/// the PEFT prefix or not ending in `.lora_A.weight` / `.lora_B.weight` is an error naming it.
pub fn read_peft_weights(
    path: &std::path::Path,
    device: &candle_core::Device,
) -> crate::Result<std::collections::HashMap<String, Tensor>> {
    let t = candle_core::safetensors::load(path, device).map_err(|e| crate::Error::Checkpoint {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut out = std::collections::HashMap::new();
    for (k, v) in t {
        let name = from_peft_key(&k)
            .filter(|n| n.ends_with(".lora_A.weight") || n.ends_with(".lora_B.weight"))
            .ok_or_else(|| crate::Error::Checkpoint {
                path: path.to_path_buf(),
                message: format!(
                    "`{k}` is not a PEFT LoRA key ({PEFT_PREFIX}<module>.lora_A/B.weight)"
                ),
            })?;
        out.insert(name.to_string(), v);
    }
    Ok(out)
}

/// Replaces the `A` matrices among `vars` (`<projection>.lora_A.weight`, `(r, in)`) by
/// Kaiming-uniform draws (bound `1/√in`, PEFT's `kaiming_uniform_(a=√5)`) from a stream seeded
/// by `seed` and the name, so that a fresh adapter is reproducible (candle's own CPU random
/// generator cannot be seeded). `B` stays zero.
pub fn seed_adapters(vars: &candle_nn::VarMap, seed: u64) -> crate::Result<()> {
    let data = vars
        .data()
        .lock()
        .map_err(|_| crate::Error::Config("adapter store poisoned".into()))?;
    for (name, var) in data.iter() {
        if !name.ends_with(".lora_A.weight") {
            continue;
        }
        let t = var.as_tensor();
        let bound = 1.0 / (t.dim(1)? as f64).sqrt();
        let v = crate::train::seeded_uniform(name, t.dims(), bound, seed, t.dtype(), t.device())?;
        var.set(&v)?;
    }
    Ok(())
}
