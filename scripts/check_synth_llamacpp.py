#!/usr/bin/env python3
"""Loads `caldera synth` files with llama.cpp (through llama-cpp-python) and evaluates a
few tokens, for every architecture synth writes: a check that the files follow llama.cpp's
names, keys, shapes and types.

    cargo build -p caldera
    python3 scripts/check_synth_llamacpp.py                      # tiny shapes, all types
    python3 scripts/check_synth_llamacpp.py --arch lfm2 --shape real --quant q4_k_m

Each file is written to a temporary folder, loaded in a child process (llama.cpp aborts
the process on some errors) and, unless --no-eval, fed a short prompt whose last logits
must be finite and varied. `--shape real` writes each architecture's real shape (GiBs;
one at a time, deleted after); with --no-eval only the load is checked, which maps the
file without reading the weights. Prints one line per file and exits 1 if any failed.
Not part of the test suite: it needs llama-cpp-python and a built caldera binary.
"""

import argparse
import os
import subprocess
import sys
import tempfile

ARCHS = ["qwen3", "qwen3moe", "qwen35", "qwen35moe", "nemotron_h", "lfm2", "gpt-oss"]
MOE = {"qwen3moe", "qwen35moe", "gpt-oss"}
REAL_SHAPE = {
    "qwen3": "8b",
    "qwen3moe": "30b-a3b",
    "qwen35": "27b",
    "qwen35moe": "35b-a3b",
    "nemotron_h": "8b",
    "lfm2": "2.6b",
    "gpt-oss": "20b",
}
QUANTS = ["q4_0", "q4_k_m", "q8_0", "mxfp4_moe"]

CHILD = r"""
import sys, math
import llama_cpp
path, do_eval = sys.argv[1], sys.argv[2] == "1"
m = llama_cpp.Llama(model_path=path, n_ctx=64, n_batch=64, n_threads=2,
                    logits_all=True, verbose=True)
arch = m.metadata.get("general.architecture")
info = f"{arch}: vocab {m.n_vocab()}, embd {m.n_embd()}"
if do_eval:
    toks = m.tokenize(b"hello world, tiny model", add_bos=True, special=False)[:6]
    m.eval(toks)
    row = list(m.scores[len(toks) - 1])
    if not all(math.isfinite(v) for v in row):
        print("RESULT non-finite logits"); sys.exit(3)
    mean = sum(row) / len(row)
    std = (sum((v - mean) ** 2 for v in row) / len(row)) ** 0.5
    if not std > 1e-3:
        print(f"RESULT constant logits (std {std})"); sys.exit(3)
    info += f", {len(toks)} tokens evaluated, last logits std {std:.3f}"
print("RESULT " + info)
"""


def default_caldera():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for profile in ("release", "debug"):
        p = os.path.join(root, "target", profile, "caldera")
        if os.path.exists(p):
            return p
    return "caldera"


def check(caldera, arch, shape, quant, folder, do_eval):
    path = os.path.join(folder, f"{arch}-{shape}-{quant}.gguf")
    w = subprocess.run(
        [caldera, "synth", "--arch", arch, "--shape", shape, "--quant", quant, path],
        capture_output=True,
        text=True,
    )
    if w.returncode != 0:
        return False, "synth failed: " + w.stderr.strip().splitlines()[-1]
    try:
        r = subprocess.run(
            [sys.executable, "-c", CHILD, path, "1" if do_eval else "0"],
            capture_output=True,
            text=True,
            timeout=1800,
        )
    finally:
        os.remove(path)
    out = r.stdout + r.stderr
    result = [l[7:] for l in out.splitlines() if l.startswith("RESULT ")]
    if r.returncode == 0 and result:
        return True, result[-1]
    errors = [l for l in out.splitlines() if "error" in l.lower() or "failed" in l.lower()]
    why = errors[-3:] if errors else out.strip().splitlines()[-3:]
    return False, f"exit {r.returncode}: " + " | ".join(why)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--caldera", default=default_caldera(), help="the caldera binary")
    ap.add_argument("--arch", action="append", choices=ARCHS, help="repeatable; default all")
    ap.add_argument("--quant", action="append", choices=QUANTS,
                    help="repeatable; default all (mxfp4_moe for MoE architectures only)")
    ap.add_argument("--shape", choices=["tiny", "real"], default="tiny")
    ap.add_argument("--no-eval", action="store_true", help="only load the files")
    ap.add_argument("--dir", help="where to write the files (default: a temporary folder)")
    a = ap.parse_args()

    import llama_cpp  # noqa: F401  (fail early, with the import error, when it is missing)

    print(f"llama-cpp-python {llama_cpp.__version__}, caldera {a.caldera}")
    failed = 0
    with tempfile.TemporaryDirectory(dir=a.dir) as folder:
        for arch in a.arch or ARCHS:
            shape = "tiny" if a.shape == "tiny" else REAL_SHAPE[arch]
            for quant in a.quant or QUANTS:
                if quant == "mxfp4_moe" and arch not in MOE:
                    continue
                ok, msg = check(a.caldera, arch, shape, quant, folder, not a.no_eval)
                failed += not ok
                status = "ok  " if ok else "FAIL"
                print(f"{status} {arch:<10} {shape:<8} {quant:<9} {msg}", flush=True)
    print("all loaded" if failed == 0 else f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
