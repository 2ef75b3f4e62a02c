#!/usr/bin/env bash
# A newer lavapipe (Mesa's CPU Vulkan driver) beside the system one, for the kernels that
# Debian 12's Mesa 22.3 cannot run: Debian 13 (trixie) backports' Mesa 26.1 has
# VK_KHR_cooperative_matrix (8x8x8 f16 and i8 shapes), which the cooperative-matrix
# prefill kernels need.
#
#   scripts/lavapipe-next.sh [DIR]     (default DIR: target/lavapipe-next)
#
# Downloads trixie-backports' mesa-vulkan-drivers with its whole dependency closure
# (glibc 2.41, LLVM 19, ... ~60 MB) through a private apt state (the system's apt
# state and sources are untouched), unpacks it under DIR/root and writes DIR/run, a
# launcher that runs a program on that glibc and those libraries with only the new
# lavapipe visible:
#
#   DIR/run target/debug/caldera devices
#   CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER=$PWD/DIR/run cargo test ...
#
# Programs the launched one starts (e.g. a `caldera` subprocess) run on the system's
# libraries again. Needs apt-get and dpkg (Debian / Ubuntu), network access to
# deb.debian.org, and root for apt-get's download step. Prints DIR/run.
set -euo pipefail

dir="${1:-target/lavapipe-next}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
if [[ -x "$dir/run" && -e "$dir/root/usr/share/vulkan/icd.d/lvp_icd.json" ]]; then
    echo "$dir/run"
    exit 0
fi
for tool in apt-get dpkg; do
    if ! command -v "$tool" >/dev/null; then
        echo "lavapipe-next: $tool not found (Debian or Ubuntu needed)" >&2
        exit 2
    fi
done

apt_dir="$dir/apt"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
cat >"$apt_dir/sources.list" <<EOF
deb http://deb.debian.org/debian trixie main
deb http://deb.debian.org/debian trixie-backports main
EOF
opts=(
    -o "Dir::Etc::SourceList=$apt_dir/sources.list"
    -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=$apt_dir/lists"
    -o "Dir::Cache=$apt_dir/cache"
    -o "Dir::State::status=/dev/null"
    -o "Debug::NoLocking=1"
    -o "APT::Sandbox::User=root"
)
apt-get "${opts[@]}" update -qq >/dev/null
# With an empty package status apt downloads the whole closure, glibc included.
apt-get "${opts[@]}" install --download-only -y -qq --no-install-recommends \
    -t trixie-backports mesa-vulkan-drivers >/dev/null

rm -rf "$dir/root"
mkdir -p "$dir/root"
for deb in "$apt_dir"/cache/archives/*.deb; do
    dpkg -x "$deb" "$dir/root"
done
rm -rf "$apt_dir/cache/archives"

root="$dir/root"
for need in usr/lib64/ld-linux-x86-64.so.2 usr/share/vulkan/icd.d/lvp_icd.json \
    usr/lib/x86_64-linux-gnu/libvulkan.so.1; do
    if [[ ! -e "$root/$need" ]]; then
        echo "lavapipe-next: the unpacked packages lack $need" >&2
        exit 1
    fi
done
cat >"$dir/run" <<EOF
#!/bin/sh
# Runs a program on the glibc and Vulkan stack unpacked beside this file (see
# scripts/lavapipe-next.sh). Only the newer lavapipe is visible to it.
exec env VK_ICD_FILENAMES="$root/usr/share/vulkan/icd.d/lvp_icd.json" \\
    VK_DRIVER_FILES="$root/usr/share/vulkan/icd.d/lvp_icd.json" \\
    "$root/usr/lib64/ld-linux-x86-64.so.2" \\
    --library-path "$root/usr/lib/x86_64-linux-gnu:$root/lib/x86_64-linux-gnu" "\$@"
EOF
chmod +x "$dir/run"
echo "$dir/run"
