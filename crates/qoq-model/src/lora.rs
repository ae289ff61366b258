//! Linear projections with optional LoRA adapters (Hu et al. 2021; PEFT `lora.Linear` semantics).
//!
//! `y = x W^T + b + (alpha / r) · (x A^T) B^T`, with `A: (r, in)` drawn Kaiming-uniform and
//! `B: (out, r)` zero at creation, so a fresh adapter leaves the model unchanged. Adapters live in
//! their own [`candle_nn::VarMap`] under `<projection>.lora_A.weight` / `.lora_B.weight`; merging
//! writes `W + (alpha / r) · B A` back under the checkpoint's own key `<projection>.weight`.

use candle_core::{Module, Result, Tensor};
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
        let Some(ad) = &self.adapter else {
            return Ok(None);
        };
        let w = self.base.weight();
        let delta = (ad.b.matmul(&ad.a)? * ad.scale)?.to_dtype(w.dtype())?; // (out, in)
        Ok(Some((format!("{}.weight", self.name), (w + delta)?)))
    }

    /// `x: (..., in)` → `(..., out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.base.forward(x)?;
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
