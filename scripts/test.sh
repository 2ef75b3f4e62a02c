#!/usr/bin/env bash
# The test command: fetches the test models when missing, then runs every test of the
# workspace (unit, integration, CLI end-to-end on the real models and the HF fixtures).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export CALDERA_MODELS=${CALDERA_MODELS:-$root/models}
"$root/scripts/fetch-models.sh" >/dev/null
cd "$root"
cargo test --workspace "$@"
