#!/usr/bin/env bash
# The test command: fetches the test models when missing, then runs every test of the
# workspace (unit, integration, CLI end-to-end on the real models and the HF fixtures),
# and the CPU dot-product tests again with the SIMD paths switched off, so every
# fallback is tested on every machine.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export CALDERA_MODELS=${CALDERA_MODELS:-$root/models}
"$root/scripts/fetch-models.sh" >/dev/null
cd "$root"
cargo test --workspace "$@"
for off in CALDERA_NO_VNNI CALDERA_NO_SIMD; do
  echo "== caldera-format dot products with $off=1"
  env "$off=1" cargo test -p caldera-format --test quant_dot --test quant_formats "$@"
done
# The HTTP server against the official openai SDK, and a bounded load test.
"$root/scripts/test_serve.sh"
