#!/usr/bin/env bash
# Chats with SmolLM2-135M-Instruct on the CPU: fetches the model when missing, builds
# caldera in release mode, and starts `caldera run` (extra arguments are passed on,
# e.g. -p "What is the capital of France?" --temp 0).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
models=$("$root/scripts/fetch-models.sh")
cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p caldera
exec "$root/target/release/caldera" run "$models/SmolLM2-135M-Instruct.Q4_1.gguf" "$@"
