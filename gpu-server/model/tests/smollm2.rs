//! SmolLM2-135M-Instruct Q4_1 against llama.cpp: the same prompt tokens and the same greedy
//! tokens (fixture made by `tests/fixtures/llamacpp_reference.py`), and a cached prefix gives
//! the same logits as recomputing it. Needs the GGUF that `scripts/setup.sh` fetches; without
//! it the tests print SKIP and return.

#![allow(clippy::unwrap_used)] // tests may unwrap (workspace rule)

use std::path::PathBuf;

use candle_core::Tensor;
use kvmesh_gpu_server_model::{KvPool, Loaded, SeqInput, load, max_abs_diff};
use serde_json::Value;

fn model() -> Option<Loaded> {
    let path = std::env::var_os("KVMESH_SMOLLM2")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    if !path.exists() {
        assert!(
            std::env::var_os("KVMESH_NO_SKIP").is_none(),
            "{} not found under scripts/test.sh (KVMESH_NO_SKIP)",
            path.display()
        );
        eprintln!("SKIP: {} not found (run scripts/setup.sh)", path.display());
        return None;
    }
    Some(load(&path).expect("SmolLM2 loads"))
}

fn fixture() -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/smollm2_llamacpp_greedy.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn argmax(row: &[f32]) -> u32 {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i as u32)
        .unwrap()
}

#[test]
fn tokenizer_matches_llama_cpp() {
    let Some(m) = model() else { return };
    for c in fixture()["cases"].as_array().unwrap() {
        let prompt = c["prompt"].as_str().unwrap();
        assert_eq!(
            m.tokenizer.encode(prompt).unwrap(),
            ids(&c["prompt_tokens"]),
            "prompt {prompt:?}"
        );
    }
}

#[test]
fn chat_template_matches_the_reference_rendering() {
    let Some(m) = model() else { return };
    for c in fixture()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"] == "chat")
    {
        let msg = kvmesh_gpu_server_model::ChatMessage {
            role: "user".into(),
            content: c["user"].as_str().unwrap().into(),
        };
        assert_eq!(
            m.template.as_ref().unwrap().render(&[msg]).unwrap(),
            c["prompt"].as_str().unwrap()
        );
    }
}

/// A mismatch is allowed only where this engine's own top choice beats llama.cpp's by less than
/// this. Q8_1 activation rounding makes logits of two correct Q4_1 engines differ: changing only
/// the float summation order of this engine's matmul moves its logits by a few tenths on these
/// prompts, and the mismatches measured sit at own-gaps up to 0.21.
const NEAR_TIE: f32 = 0.3;

/// Teacher-forced comparison with llama.cpp's greedy output: each prompt, followed by
/// llama.cpp's own greedy tokens, goes through one forward, and at every one of those positions
/// this engine's greedy choice must equal llama.cpp's, or be a near tie in this engine. (A
/// free-running comparison stops at the first near tie, after which the two engines write
/// different texts; teacher forcing checks every reference token on llama.cpp's path.)
#[test]
fn greedy_tokens_match_llama_cpp() {
    let Some(m) = model() else { return };
    let (mut equal, mut total) = (0, 0);
    for c in fixture()["cases"].as_array().unwrap() {
        let prompt = c["prompt"].as_str().unwrap();
        let want = ids(&c["greedy"]);
        let gaps = c["top_gap"].as_array().unwrap();
        let mut tokens = ids(&c["prompt_tokens"]);
        let first = tokens.len() - 1;
        tokens.extend_from_slice(&want[..want.len() - 1]);
        let blocks: Vec<u32> = (0..64).collect();
        let mut pool = KvPool::new(m.model.config(), 64, 16);
        let seq = SeqInput {
            tokens: &tokens,
            start: 0,
            blocks: &blocks,
            all_logits: true,
        };
        let logits = m.model.forward(&[seq], &mut pool).unwrap()[0]
            .to_vec2::<f32>()
            .unwrap();
        for (i, &w) in want.iter().enumerate() {
            let row = &logits[first + i];
            let top = argmax(row);
            total += 1;
            if top == w {
                equal += 1;
                continue;
            }
            let gap = row[top as usize] - row[w as usize];
            assert!(
                gap < NEAR_TIE,
                "prompt {prompt:?}: token {i}: this engine prefers {top} to llama.cpp's {w} by \
                 {gap} (llama.cpp's own margin {})",
                gaps[i]
            );
            eprintln!(
                "prompt {prompt:?}: near tie at token {i}: {top} over llama.cpp's {w} by {gap} \
                 (llama.cpp's margin {})",
                gaps[i]
            );
        }
    }
    eprintln!("{equal} of {total} reference tokens equal, the rest near ties");
    // Measured in the dev-profile test build on this VM: 185 of 192 equal.
    assert!(
        equal * 100 >= total * 95,
        "only {equal} of {total} tokens equal"
    );
}

#[test]
fn cached_prefix_gives_the_same_logits() {
    // The engine's prefix hit: a later request adopts the blocks an earlier one wrote and runs
    // only its suffix. Against recomputing the prefix (into other blocks) and running the same
    // suffix step: the prefix's K and V are the same bits, so the suffix's logits are too.
    let Some(m) = model() else { return };
    let c = &fixture()["cases"][2];
    let p = ids(&c["prompt_tokens"]);
    assert!(p.len() > 32 + 1, "the case needs a suffix after two blocks");
    let mut pool = KvPool::new(m.model.config(), 16, 16);
    let step = |pool: &mut KvPool, from: usize, to: usize, blocks: &[u32]| -> Tensor {
        let l = m
            .model
            .forward(
                &[SeqInput {
                    tokens: &p[from..to],
                    start: from,
                    blocks,
                    all_logits: true,
                }],
                pool,
            )
            .unwrap();
        l[0].clone()
    };
    // The first request, whole prompt in one step, into blocks 0, 1, 2.
    let first = step(&mut pool, 0, p.len(), &[0, 1, 2]);
    // Recompute: the prefix into blocks 7 and 11, then the suffix.
    step(&mut pool, 0, 32, &[7, 11, 5]);
    let recomputed = step(&mut pool, 32, p.len(), &[7, 11, 5]);
    for (a, b) in [(0u32, 7u32), (1, 11)] {
        assert_eq!(
            pool.block_bytes(a),
            pool.block_bytes(b),
            "block {a}'s K/V written by one step differ from the prefix recomputed alone"
        );
    }
    // The hit: blocks 0 and 1 adopted, the suffix run into a fresh third block.
    let cached = step(&mut pool, 32, p.len(), &[0, 1, 13]);
    let d = max_abs_diff(&recomputed, &cached).unwrap();
    assert!(d < 1e-3, "cached-prefix logits differ by {d}");
    // Against the first request's own rows for the suffix: a step this short attends on the
    // paged kernel, the whole prompt on the matmul path, so they agree to within the Q8
    // rounding of activations; the greedy token of every row is the same.
    let whole = first.narrow(0, 32, p.len() - 32).unwrap();
    for r in 0..p.len() - 32 {
        let row = |t: &Tensor| t.get(r).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(argmax(&row(&whole)), argmax(&row(&cached)), "row {r}");
    }
}
