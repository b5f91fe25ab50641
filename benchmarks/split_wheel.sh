#!/usr/bin/env bash
# Fetch the wheels benchmarks/gpu.sh installs on an offline GPU machine, and split the big one.
#
#   bash benchmarks/split_wheel.sh [DEST]        # DEST defaults to .whl/ (git-ignored)
#
# onnxruntime-gpu 1.31.1 (CUDA 13) is a ~244 MiB wheel, larger than what one call to the GPU
# machine may carry, so it is split into parts (PART_SIZE, default 50M) named
# onnxruntime_gpu-...whl.part-aa, -ab, ...; gpu.sh joins them with cat and checks the result
# against the .sha256 written here. The target is the GPU image's Python: CPython 3.12,
# manylinux x86_64. Extra packages to fetch (no dependencies) can follow as NAME==VERSION args.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/.whl}"
shift || true
VERSION="${ORT_GPU_VERSION:-1.31.1}"
PART_SIZE="${PART_SIZE:-50M}"
PYTHON="${PYTHON:-python3}"

mkdir -p "$DEST"
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$DEST" "onnxruntime-gpu==$VERSION" "$@"

shopt -s nullglob
wheels=("$DEST"/onnxruntime_gpu-"$VERSION"-*.whl)
if [[ ${#wheels[@]} -ne 1 ]]; then
    echo "error: expected one onnxruntime_gpu-$VERSION wheel in $DEST, found ${#wheels[@]}" >&2
    exit 1
fi
wheel="${wheels[0]}"
echo "Requires-Dist of $(basename "$wheel") (must already be on the GPU image or be fetched too):"
unzip -p "$wheel" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' || true

rm -f "$wheel".part-*
(cd "$(dirname "$wheel")" && sha256sum "$(basename "$wheel")" > "$(basename "$wheel").sha256")
split -b "$PART_SIZE" "$wheel" "$wheel.part-"
rm "$wheel"
echo "Split into:"
ls -l "$wheel".part-* "$wheel.sha256"
cat <<EOF

Next (see benchmarks/README.md, "GPU"): carry one part per call to the GPU machine and copy it to
a folder outside the repository there (e.g. /tmp/whl), then run
    bash benchmarks/gpu.sh --wheels /tmp/whl
EOF
