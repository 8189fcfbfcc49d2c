//! Turning a row of logits into the next token: greedy at temperature 0, otherwise
//! temperature, top-k and top-p (nucleus) sampling from a per-request seeded generator.

use rand::Rng;
use rand::rngs::StdRng;

/// Sampling parameters of one request, already validated by the caller.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    /// 0 means no limit.
    pub top_k: usize,
    pub seed: Option<u64>,
    pub max_tokens: usize,
    /// Ignore the model's stop tokens (benchmarks that need exact lengths).
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            max_tokens: 16,
            ignore_eos: false,
        }
    }
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// The next token for `logits` under `p`.
pub fn sample(logits: &[f32], p: &SamplingParams, rng: &mut StdRng) -> u32 {
    if p.temperature <= 0.0 || p.top_k == 1 || logits.is_empty() {
        return argmax(logits);
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if p.top_k > 0 {
        idx.truncate(p.top_k);
    }
    let max = logits[idx[0]];
    let mut probs: Vec<f32> = idx
        .iter()
        .map(|&i| ((logits[i] - max) / p.temperature).exp())
        .collect();
    let sum: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|x| *x /= sum);
    if p.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, &x) in probs.iter().enumerate() {
            acc += x;
            if acc >= p.top_p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
    }
    let total: f32 = probs.iter().sum();
    let mut r = rng.random::<f32>() * total;
    for (k, &x) in probs.iter().enumerate() {
        if r < x {
            return idx[k] as u32;
        }
        r -= x;
    }
    idx[probs.len() - 1] as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn greedy_and_seeded_sampling() {
        let logits = [0.1, 3.0, 2.9, -1.0];
        let mut rng = StdRng::seed_from_u64(1);
        let greedy = SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        };
        assert_eq!(sample(&logits, &greedy, &mut rng), 1);
        let k2 = SamplingParams {
            top_k: 2,
            seed: Some(3),
            ..SamplingParams::default()
        };
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..50)
                .map(|_| sample(&logits, &k2, &mut rng))
                .collect::<Vec<_>>()
        };
        let a = draw(3);
        assert_eq!(a, draw(3), "same seed, same draws");
        assert!(
            a.iter().all(|&t| t == 1 || t == 2),
            "top_k=2 keeps the two best"
        );
        assert!(a.contains(&1) && a.contains(&2));
        let nucleus = SamplingParams {
            top_p: 0.3,
            ..SamplingParams::default()
        };
        let mut rng = StdRng::seed_from_u64(9);
        assert!((0..50).all(|_| sample(&logits, &nucleus, &mut rng) == 1));
    }
}
