//! Model shapes and the training recipe.

use serde::{Deserialize, Serialize};

/// A Llama-3-style decoder shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub name: String,
    pub vocab: usize,
    pub dim: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn_dim: usize,
    pub rope_theta: f32,
    pub norm_eps: f32,
}

impl ModelConfig {
    /// About 1.7 M parameters: trains at several steps per second on two CPU cores.
    pub fn tiny() -> ModelConfig {
        ModelConfig {
            name: "tiny".into(),
            vocab: crate::data::VOCAB,
            dim: 192,
            layers: 4,
            heads: 6,
            kv_heads: 2,
            ffn_dim: 512,
            rope_theta: 500_000.0,
            norm_eps: 1e-5,
        }
    }

    // The three shapes below are Table 3 of "The Llama 3 Herd of Models" (Meta, 2024); they
    // are used for sizing only.
    pub fn llama3_8b() -> ModelConfig {
        Self::llama3("8b", 4096, 32, 32, 8, 14_336)
    }

    pub fn llama3_70b() -> ModelConfig {
        Self::llama3("70b", 8192, 80, 64, 8, 28_672)
    }

    pub fn llama3_405b() -> ModelConfig {
        Self::llama3("405b", 16_384, 126, 128, 8, 53_248)
    }

    fn llama3(name: &str, dim: usize, layers: usize, heads: usize, kv_heads: usize, ffn_dim: usize) -> ModelConfig {
        ModelConfig {
            name: name.into(),
            vocab: 128_256,
            dim,
            layers,
            heads,
            kv_heads,
            ffn_dim,
            rope_theta: 500_000.0,
            norm_eps: 1e-5,
        }
    }

    pub fn named(name: &str) -> Option<ModelConfig> {
        match name {
            "tiny" => Some(Self::tiny()),
            "8b" => Some(Self::llama3_8b()),
            "70b" => Some(Self::llama3_70b()),
            "405b" => Some(Self::llama3_405b()),
            _ => None,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.dim / self.heads
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.dim == 0 || self.heads == 0 || self.kv_heads == 0 || self.layers == 0 || self.vocab == 0 {
            return Err("every dimension must be positive".into());
        }
        if self.dim % self.heads != 0 {
            return Err(format!("dim {} is not a multiple of heads {}", self.dim, self.heads));
        }
        if self.heads % self.kv_heads != 0 {
            return Err(format!("heads {} is not a multiple of kv_heads {}", self.heads, self.kv_heads));
        }
        if self.head_dim() % 2 != 0 {
            return Err(format!("head dimension {} must be even for rotary embeddings", self.head_dim()));
        }
        Ok(())
    }

    /// Every parameter tensor in the order of the flat parameter vector.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, hd) = (self.dim, self.head_dim());
        let mut out = vec![("tok_embeddings".to_string(), vec![self.vocab, d])];
        for l in 0..self.layers {
            let p = |n: &str| format!("layers.{l}.{n}");
            out.push((p("attention_norm"), vec![d]));
            out.push((p("attention.wq"), vec![self.heads * hd, d]));
            out.push((p("attention.wk"), vec![self.kv_heads * hd, d]));
            out.push((p("attention.wv"), vec![self.kv_heads * hd, d]));
            out.push((p("attention.wo"), vec![d, self.heads * hd]));
            out.push((p("ffn_norm"), vec![d]));
            out.push((p("feed_forward.w1"), vec![self.ffn_dim, d]));
            out.push((p("feed_forward.w3"), vec![self.ffn_dim, d]));
            out.push((p("feed_forward.w2"), vec![d, self.ffn_dim]));
        }
        out.push(("norm".to_string(), vec![d]));
        out.push(("output".to_string(), vec![self.vocab, d]));
        out
    }

    pub fn param_count(&self) -> u64 {
        self.param_shapes().iter().map(|(_, s)| s.iter().product::<usize>() as u64).sum()
    }
}

/// Bytes of checkpoint state one rank owns under ZeRO sharding with `world` ranks: an fp32
/// master copy of its parameter slice plus AdamW's two fp32 moments.
pub fn state_bytes_per_rank(params: u64, world: u64) -> u64 {
    params.div_ceil(world.max(1)) * 4 * 3
}

/// The optimisation recipe: AdamW, linear warm-up, cosine decay, then a linear anneal to zero.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    pub steps: u64,
    pub lr_peak: f32,
    pub lr_min: f32,
    pub warmup_steps: u64,
    /// The last `anneal_steps` steps take the learning rate linearly to zero.
    pub anneal_steps: u64,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub grad_clip: f32,
    /// Sequences per optimizer step across all ranks; each rank takes an equal share.
    pub global_batch: usize,
    pub seq_len: usize,
    /// The token embeddings are frozen: never updated, their optimizer state never changes (as
    /// when fine-tuning on top of a pretrained vocabulary).
    #[serde(default)]
    pub freeze_embeddings: bool,
}

impl Recipe {
    /// The learning rate used by step `step` (1-based).
    pub fn lr(&self, step: u64) -> f32 {
        let warm = self.warmup_steps.max(1);
        if step <= self.warmup_steps {
            return self.lr_peak * step as f32 / warm as f32;
        }
        let decay_end = self.steps.saturating_sub(self.anneal_steps).max(self.warmup_steps);
        let cosine = |s: u64| {
            let span = (decay_end - self.warmup_steps).max(1) as f32;
            let t = ((s - self.warmup_steps) as f32 / span).min(1.0);
            self.lr_min + 0.5 * (self.lr_peak - self.lr_min) * (1.0 + (std::f32::consts::PI * t).cos())
        };
        if step <= decay_end {
            return cosine(step);
        }
        let start = cosine(decay_end);
        let left = self.steps.saturating_sub(step) as f32;
        start * left / self.anneal_steps.max(1) as f32
    }

    /// The first step of the annealing phase.
    pub fn anneal_start(&self) -> u64 {
        self.steps.saturating_sub(self.anneal_steps) + 1
    }

    pub fn validate(&self, world: usize) -> Result<(), String> {
        if self.steps == 0 {
            return Err("steps must be positive".into());
        }
        if self.anneal_steps > self.steps || self.warmup_steps > self.steps {
            return Err("warm-up and anneal must fit in the run".into());
        }
        if self.seq_len < 2 || self.global_batch == 0 {
            return Err("seq_len must be at least 2 and global_batch positive".into());
        }
        if world == 0 || self.global_batch % world != 0 {
            return Err(format!("global batch {} is not divisible by {world} ranks", self.global_batch));
        }
        if !(self.lr_peak.is_finite() && self.lr_peak > 0.0) {
            return Err("lr_peak must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe() -> Recipe {
        Recipe {
            steps: 100,
            lr_peak: 1e-3,
            lr_min: 1e-4,
            warmup_steps: 10,
            anneal_steps: 20,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
            global_batch: 12,
            seq_len: 64,
            freeze_embeddings: false,
        }
    }

    #[test]
    fn schedule_warms_decays_and_anneals_to_zero() {
        let r = recipe();
        assert!((r.lr(5) - 5e-4).abs() < 1e-9);
        assert!((r.lr(10) - 1e-3).abs() < 1e-9);
        assert!(r.lr(40) < r.lr(20) && r.lr(40) > r.lr(80));
        assert!((r.lr(80) - 1e-4).abs() < 1e-7, "cosine ends at lr_min: {}", r.lr(80));
        assert!(r.lr(90) < r.lr(81));
        assert_eq!(r.lr(100), 0.0);
        assert_eq!(r.anneal_start(), 81);
    }

    #[test]
    fn llama3_shapes_have_their_published_sizes() {
        // 8.0 B, 70.6 B and 405.9 B parameters by the paper's shapes (untied embeddings).
        let b = |c: ModelConfig| c.param_count() as f64 / 1e9;
        assert!((b(ModelConfig::llama3_8b()) - 8.03).abs() < 0.05, "{}", b(ModelConfig::llama3_8b()));
        assert!((b(ModelConfig::llama3_70b()) - 70.55).abs() < 0.2, "{}", b(ModelConfig::llama3_70b()));
        assert!((b(ModelConfig::llama3_405b()) - 405.8).abs() < 1.0, "{}", b(ModelConfig::llama3_405b()));
        for c in [ModelConfig::tiny(), ModelConfig::llama3_8b(), ModelConfig::llama3_405b()] {
            c.validate().unwrap();
        }
        assert!(ModelConfig::tiny().kv_heads < ModelConfig::tiny().heads);
    }
}
