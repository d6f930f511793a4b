//! AdamW over one rank's owned slice of the flat parameter vector (ZeRO stage 1/2: each rank
//! keeps the optimizer state for, and updates, only the parameters it owns).

use crate::config::Recipe;
use crate::model::ParamRange;

pub use ckpt_kernels::owned_range;

pub struct AdamW {
    /// First element of the owned slice in the flat vector.
    pub start: usize,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    /// Whether weight decay applies to each owned element.
    decay: Vec<bool>,
    /// Elements that are never updated (frozen parameters keep their value and moments).
    frozen: Vec<bool>,
}

impl AdamW {
    pub fn new(range: std::ops::Range<usize>, params: &[ParamRange]) -> AdamW {
        let mut decay = vec![false; range.len()];
        for p in params {
            let lo = p.start.max(range.start);
            let hi = (p.start + p.len).min(range.end);
            if lo < hi {
                decay[lo - range.start..hi - range.start].fill(p.decay);
            }
        }
        let frozen = vec![false; range.len()];
        AdamW { start: range.start, m: vec![0.0; range.len()], v: vec![0.0; range.len()], decay, frozen }
    }

    /// Freezes the owned elements of the parameters `which` accepts.
    pub fn freeze(&mut self, params: &[ParamRange], which: impl Fn(&ParamRange) -> bool) {
        let end = self.start + self.frozen.len();
        for p in params.iter().filter(|p| which(p)) {
            let lo = p.start.max(self.start);
            let hi = (p.start + p.len).min(end);
            if lo < hi {
                self.frozen[lo - self.start..hi - self.start].fill(true);
            }
        }
    }

    /// Zeroes the gradient of frozen elements, so that they count neither in the clipping norm
    /// nor anywhere else.
    pub fn mask_frozen(&self, grad: &mut [f32]) {
        for (g, frozen) in grad.iter_mut().zip(&self.frozen) {
            if *frozen {
                *g = 0.0;
            }
        }
    }

    /// One update of `params` (this rank's slice) with gradient `grad` for step `step` (1-based),
    /// after scaling the gradient by `clip`.
    pub fn step(&mut self, params: &mut [f32], grad: &[f32], step: u64, recipe: &Recipe, clip: f32) {
        let lr = recipe.lr(step);
        let (b1, b2) = (recipe.beta1, recipe.beta2);
        let bc1 = 1.0 - b1.powi(step.min(i32::MAX as u64) as i32);
        let bc2 = 1.0 - b2.powi(step.min(i32::MAX as u64) as i32);
        for i in 0..params.len() {
            if self.frozen[i] {
                continue;
            }
            let g = grad[i] * clip;
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * g;
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * g * g;
            let update = (self.m[i] / bc1) / ((self.v[i] / bc2).sqrt() + recipe.eps);
            let decay = if self.decay[i] { recipe.weight_decay * params[i] } else { 0.0 };
            params[i] -= lr * (update + decay);
        }
    }
}

/// The factor that scales a gradient of global L2 norm `norm` down to at most `max_norm`.
pub fn clip_factor(norm: f32, max_norm: f32) -> f32 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decay_applies_only_to_matrices() {
        let params = vec![
            ParamRange { name: "w".into(), start: 0, len: 4, decay: true },
            ParamRange { name: "g".into(), start: 4, len: 4, decay: false },
        ];
        let mut opt = AdamW::new(2..6, &params);
        let recipe = crate::config::Recipe {
            steps: 10,
            lr_peak: 0.1,
            lr_min: 0.1,
            warmup_steps: 0,
            anneal_steps: 0,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.5,
            grad_clip: 0.0,
            global_batch: 1,
            seq_len: 2,
            freeze_embeddings: false,
        };
        let mut p = vec![1.0f32; 4];
        opt.step(&mut p, &[0.0; 4], 1, &recipe, 1.0);
        assert!(p[0] < 1.0 && p[1] < 1.0, "decayed: {p:?}");
        assert_eq!(&p[2..], &[1.0, 1.0], "norm gains are not decayed");
        // A frozen parameter keeps its value and its moments, whatever its gradient.
        let mut opt = AdamW::new(2..6, &params);
        opt.freeze(&params, |p| p.name == "w");
        let mut p = vec![1.0f32; 4];
        opt.step(&mut p, &[0.5; 4], 1, &recipe, 1.0);
        assert_eq!(&p[..2], &[1.0, 1.0], "the frozen elements moved");
        assert_eq!((&opt.m[..2], &opt.v[..2]), (&[0.0, 0.0][..], &[0.0, 0.0][..]));
        assert!(p[2] < 1.0 && opt.m[2] != 0.0, "the others train: {p:?}");
    }
}
