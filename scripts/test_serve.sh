#!/usr/bin/env bash
# The server's compatibility and load tests: builds `caldera`, installs the `openai` SDK
# (which brings httpx) from PyPI when missing, then drives `caldera serve` on
# SmolLM2-135M-Instruct (CPU backend, 4 slots) with scripts/test_openai_sdk.py (the
# official SDK: chat, streaming, a tool-call round trip, errors) and scripts/load_test.py
# (LOAD_REQUESTS requests, default 500, at concurrency 32: no 5xx, no leaked slot, flat
# RSS). .ci/run calls it after scripts/test.sh; both print "N passed, M failed".
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export CALDERA_MODELS=${CALDERA_MODELS:-$root/models}
"$root/scripts/fetch-models.sh" >/dev/null
cd "$root"
if ! python3 -c 'import openai, httpx' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check openai httpx
fi
cargo build -p caldera
export CALDERA_BIN=${CALDERA_BIN:-$root/target/debug/caldera}
echo "== OpenAI SDK against caldera serve"
t0=$SECONDS
python3 scripts/test_openai_sdk.py
echo "== load test ($((SECONDS - t0)) s so far)"
python3 scripts/load_test.py --requests "${LOAD_REQUESTS:-500}" --concurrency 32
echo "== server tests took $((SECONDS - t0)) s"
