//! Shared by the decoder tests.

use candle_core::Tensor;
use kvmesh_gpu_server_model::{KvPool, Loaded, SeqInput};

/// Sequences `a` (at least 40 tokens, blocks 0, 1, 2) and `b` (at least 23, blocks 5, 4, 3) run
/// together: prefill in two chunks each, then three batched decode steps; every step's logits.
pub(crate) fn two_sequences(m: &Loaded, pool: &mut KvPool, a: &[u32], b: &[u32]) -> Vec<Tensor> {
    let (ba, bb) = ([0u32, 1, 2], [5u32, 4, 3]);
    let mut step = |sa: (usize, usize), sb: (usize, usize)| {
        m.model
            .forward(
                &[
                    SeqInput {
                        tokens: &a[sa.0..sa.1],
                        start: sa.0,
                        blocks: &ba,
                        all_logits: true,
                    },
                    SeqInput {
                        tokens: &b[sb.0..sb.1],
                        start: sb.0,
                        blocks: &bb,
                        all_logits: true,
                    },
                ],
                pool,
            )
            .expect("forward")
    };
    let mut out = step((0, 20), (0, 10));
    out.extend(step((20, 37), (10, 20)));
    for i in 0..3 {
        out.extend(step((37 + i, 38 + i), (20 + i, 21 + i)));
    }
    out
}
