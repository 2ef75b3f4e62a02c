#!/usr/bin/env python3
"""Times llama.cpp's CPU backend (through llama-cpp-python) the way `caldera bench`
times caldera: a prompt of P token ids drawn from the vocabulary, then N greedy decode
steps, median of R repetitions. Used to put caldera's CPU figures beside llama.cpp's on
the same machine at the same moment (docs/BENCHMARKS.md).

    pip install llama-cpp-python   # builds llama.cpp from source (about 10 minutes)
    python3 scripts/bench_llamacpp.py MODEL.gguf [-p 128] [-n 128] [-t 2] [-r 3]
"""
import argparse, random, statistics, time

import llama_cpp

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("-p", type=int, default=128)
ap.add_argument("-n", type=int, default=128)
ap.add_argument("-t", type=int, default=2)
ap.add_argument("-r", type=int, default=3)
a = ap.parse_args()

m = llama_cpp.Llama(model_path=a.model, n_ctx=a.p + a.n + 8, n_batch=512, n_threads=a.t,
                    n_threads_batch=a.t, verbose=False, logits_all=False)
vocab = m.n_vocab()
rng = random.Random(0)
prompt = [rng.randrange(vocab) for _ in range(a.p)]
pp, tg = [], []
for _ in range(a.r):
    m.reset()
    m._ctx.kv_cache_clear() if hasattr(m._ctx, "kv_cache_clear") else None
    t = time.perf_counter()
    m.eval(prompt)
    pp.append(a.p / (time.perf_counter() - t))
    tok = prompt[-1]
    t = time.perf_counter()
    for _ in range(a.n):
        m.eval([tok])
        tok = int(m.scores[m.n_tokens - 1].argmax())
    tg.append(a.n / (time.perf_counter() - t))
print(f"llama.cpp {a.model}: pp{a.p} {statistics.median(pp):.1f} tok/s, tg{a.n} {statistics.median(tg):.1f} tok/s, {a.t} threads")
