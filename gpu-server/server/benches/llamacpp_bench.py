#!/usr/bin/env python3
"""The llama.cpp side of the gpu-server benchmarks (same GGUF, same machine, 2 threads).

  /tmp/llamacpp-venv/bin/python gpu-server/server/benches/llamacpp_bench.py \
      .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf

Measures what kvmesh-gpu-bench measures, with llama-cpp-python 0.3.36:
prefill tok/s of a 512-token prompt (one batch), decode tok/s over 128 tokens, TTFT of a
repeated 2,000-token prompt (llama-cpp-python keeps the previous sequence's KV and reuses the
longest common prefix, so the repeat only evaluates the last token), and tokens/s of 4
streams of 128 tokens (llama-cpp-python serves one sequence at a time, so they run one after
another). Prints JSON.
"""
import json
import sys
import time

import numpy as np
import llama_cpp
import llama_cpp.llama

# llama.cpp's AMX weight repacking ("extra buffer types") crashes on this VM (SIGSEGV in
# ggml_backend_amx_mul_mat); turn it off so the plain AVX-512/AVX2 CPU kernels run.
_default_params = llama_cpp.llama_model_default_params


def _no_extra_bufts():
    p = _default_params()
    p.use_extra_bufts = False
    return p


llama_cpp.llama_model_default_params = _no_extra_bufts
llama_cpp.llama.llama_cpp.llama_model_default_params = _no_extra_bufts
from llama_cpp import Llama  # noqa: E402

REPS = 3


def stats(v):
    v = sorted(v)
    return {"median": v[len(v) // 2], "min": v[0], "max": v[-1], "n": len(v)}


def toks(n, salt, vocab):
    return [((i * 7919 + salt * 104729) % (vocab - 300)) + 200 for i in range(n)]


def greedy_next(llm):
    return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))


def main():
    llm = Llama(model_path=sys.argv[1], n_ctx=4096, n_threads=2, n_threads_batch=2,
                n_batch=512, n_ubatch=512, verbose=False)
    vocab = llm.n_vocab()
    llm.reset(); llm.eval(toks(64, 99, vocab))
    prefill = []
    for r in range(REPS):
        llm.reset()
        p = toks(512, r, vocab)
        t0 = time.perf_counter(); llm.eval(p); prefill.append(512 / (time.perf_counter() - t0))
    decode = []
    for r in range(REPS):
        llm.reset(); llm.eval(toks(16, 10 + r, vocab))
        t0 = time.perf_counter()
        for _ in range(128):
            llm.eval([greedy_next(llm)])
        decode.append(128 / (time.perf_counter() - t0))
    long = toks(2000, 42, vocab)
    llm.reset()
    t0 = time.perf_counter(); llm.eval(long); greedy_next(llm); cold = time.perf_counter() - t0
    warm = []
    for _ in range(REPS):
        # What llama-cpp-python's generate() does on a repeated prompt: keep the common prefix
        # and re-evaluate the last token.
        t0 = time.perf_counter()
        llm.n_tokens = len(long) - 1
        llm._ctx.kv_cache_seq_rm(-1, len(long) - 1, -1)
        llm.eval(long[-1:]); greedy_next(llm)
        warm.append((time.perf_counter() - t0) * 1000)
    conc = []
    for r in range(REPS):
        t0 = time.perf_counter(); n = 0
        for i in range(4):
            llm.reset(); llm.eval(toks(32, 100 + r * 4 + i, vocab))
            for _ in range(128):
                llm.eval([greedy_next(llm)]); n += 1
        conc.append(n / (time.perf_counter() - t0))
    print(json.dumps({
        "engine": "llama-cpp-python 0.3.36",
        "threads": 2,
        "prefill_512_tok_per_s": stats(prefill),
        "decode_128_tok_per_s": stats(decode),
        "ttft_2000_cold_ms": cold * 1000,
        "ttft_2000_cached_ms": stats(warm),
        "concurrent_4x128_tok_per_s": stats(conc),
    }, indent=1))


if __name__ == "__main__":
    main()
