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
# The cooperative-matrix kernels, where CALDERA_LAVAPIPE_NEXT names a launcher of a
# lavapipe that has them (scripts/lavapipe-next.sh prints it): the tiled matmul's CPU
# twin checks, `verify` on two fixtures and a 670-token prefill against the CPU, under
# it, required to run (~3 minutes on 2 cores).
if [[ -n "${CALDERA_LAVAPIPE_NEXT:-}" ]]; then
  echo "== cooperative-matrix kernels through $CALDERA_LAVAPIPE_NEXT"
  env CALDERA_REQUIRE_COOPMAT=1 \
    CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="$CALDERA_LAVAPIPE_NEXT" \
    cargo test -p caldera-vulkan --test mmt --test mvc "$@"
  env CALDERA_REQUIRE_COOPMAT=1 \
    CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="$CALDERA_LAVAPIPE_NEXT" \
    cargo test -p caldera --test vulkan_models "$@" -- vulkan_verifies_with_coopmat \
    vulkan_prefill_matches_cpu
fi
# The HTTP server against the official openai SDK, and a bounded load test.
"$root/scripts/test_serve.sh"
