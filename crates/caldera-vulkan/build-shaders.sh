#!/usr/bin/env bash
# Compiles every compute shader under shaders/ to the committed SPIR-V in shaders/spv/.
#
#   ./build-shaders.sh          recompile into shaders/spv/
#   ./build-shaders.sh --check  recompile into a temp dir; fail if any committed .spv
#                               differs, is missing, or is stale (CI runs this)
#
# Each kernel is built twice: NAME.sg.spv reduces with subgroup arithmetic,
# NAME.sh.spv with shared memory only (the fallback for devices without it).
# Needs glslc (Debian 12: `apt-get install glslc`, shaderc 2023.2). The bytes depend
# on the glslc version: regenerate and check with the same one.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src="$here/shaders"
out="$src/spv"
check=0
if [[ "${1:-}" == "--check" ]]; then
    check=1
elif [[ $# -gt 0 ]]; then
    echo "usage: $0 [--check]" >&2
    exit 2
fi

if ! command -v glslc >/dev/null; then
    echo "glslc not found: apt-get install glslc" >&2
    exit 2
fi

dest="$out"
if [[ $check == 1 ]]; then
    dest="$(mktemp -d)"
    trap 'rm -rf "$dest"' EXIT
fi
mkdir -p "$dest"

flags=(--target-env=vulkan1.1 -O -fshader-stage=compute -I "$src")
for f in "$src"/*.comp; do
    name="$(basename "$f" .comp)"
    glslc "${flags[@]}" -DUSE_SUBGROUP=1 "$f" -o "$dest/$name.sg.spv"
    glslc "${flags[@]}" -DUSE_SUBGROUP=0 "$f" -o "$dest/$name.sh.spv"
done

if [[ $check == 1 ]]; then
    status=0
    for f in "$dest"/*.spv; do
        name="$(basename "$f")"
        if ! cmp -s "$f" "$out/$name"; then
            echo "stale or missing: shaders/spv/$name (run build-shaders.sh)" >&2
            status=1
        fi
    done
    for f in "$out"/*.spv; do
        name="$(basename "$f")"
        if [[ ! -e "$dest/$name" ]]; then
            echo "no source for shaders/spv/$name (delete it)" >&2
            status=1
        fi
    done
    if [[ $status == 0 ]]; then
        echo "shaders: committed SPIR-V matches $(glslc --version | head -1)"
    fi
    exit $status
fi
echo "shaders: compiled $(ls "$dest"/*.spv | wc -l) SPIR-V files into shaders/spv/"
