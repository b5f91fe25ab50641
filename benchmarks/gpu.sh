#!/usr/bin/env bash
# The GPU benchmark in one script, for a single H100/H200 machine with no network (< 8 minutes).
#
#   bash benchmarks/gpu.sh [--dry-run] [--wheels DIR] [--out DIR] [--archive FILE] [--skip-cpu-tests]
#
# Steps: 1 join split wheels (NAME.whl.part-aa, -ab, ... -> NAME.whl, checked against NAME.whl.sha256)
#        2 install every wheel in --wheels offline (pip --no-index) into a private folder that is
#          put first on PYTHONPATH, so onnxruntime-gpu shadows a CPU-only onnxruntime there
#        3 describe the machine (CPU, GPU, versions, providers) into OUT/machine.json
#        4 CPU checks: the CUDA code path with onnxruntime mocked (tests/runtime/test_cuda_path.py)
#        5 probe: is the ORT CUDA provider really active? (no GPU: stop here; --dry-run: stop here)
#        6 CUDA tests (pytest -m cuda)
#        7 GPU benchmark on the CUDA provider: ResNet-50 batch 1 and 32, the BERT encoder;
#          fp32 (plain export, default preset) vs fp16 vs int8, torch eager on CUDA, and each
#          preset's compiled GraphModule on CUDA in PyTorch; per-node provider placement
# Results go to OUT (default benchmarks/results/gpu; with --dry-run a temporary folder).
# --archive FILE additionally packs OUT into one .tar.gz (handy where few files can be fetched).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DRY_RUN=0
SKIP_CPU_TESTS=0
WHEELS="${WHEELS:-$ROOT/.whl}"
OUT=""
ARCHIVE=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --wheels) WHEELS="$2"; shift ;;
        --out) OUT="$2"; shift ;;
        --archive) ARCHIVE="$2"; shift ;;
        --skip-cpu-tests) SKIP_CPU_TESTS=1 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [[ -z "$OUT" ]]; then
    if [[ $DRY_RUN -eq 1 ]]; then OUT="$(mktemp -d -t fxc-gpu-dryrun.XXXXXX)"; else OUT="$ROOT/benchmarks/results/gpu"; fi
fi
mkdir -p "$OUT"
# The GPU image's python3 holds PyTorch; here a project venv may.
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
WORK="$(mktemp -d -t fxc-gpu-work.XXXXXX)"
SITE="${FXC_SITE:-$WORK/site}"  # FXC_SITE keeps the installed wheels for a later run
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)
LOG="$OUT/gpu_log.txt"
: > "$LOG"
step() { printf '\n== [%4ss] %s\n' "$(( $(date +%s) - START ))" "$*" | tee -a "$LOG"; }
run() { "$@" 2>&1 | tee -a "$LOG"; return "${PIPESTATUS[0]}"; }

step "1/7 join split wheels in $WHEELS"
shopt -s nullglob
for first in "$WHEELS"/*.whl.part-aa; do
    wheel="${first%.part-aa}"
    name="$(basename "$wheel")"
    parts=("$wheel".part-*)
    cat "${parts[@]}" > "$WORK/$name"  # the glob sorts aa, ab, ac... in order
    if [[ -f "$wheel.sha256" ]]; then
        want="$(cut -d' ' -f1 < "$wheel.sha256")"
        got="$(sha256sum "$WORK/$name" | cut -d' ' -f1)"
        if [[ "$want" != "$got" ]]; then
            echo "error: $name joined from ${#parts[@]} parts does not match $name.sha256: a part is missing or truncated; copy all of ${parts[*]##*/} again" | tee -a "$LOG" >&2
            exit 1
        fi
    elif ! "$PYTHON" -m zipfile -t "$WORK/$name" > /dev/null 2>&1; then
        echo "error: $name joined from ${#parts[@]} parts is not a valid wheel: a part is missing or truncated" | tee -a "$LOG" >&2
        exit 1
    fi
    echo "joined ${#parts[@]} parts -> $name ($(du -m "$WORK/$name" | cut -f1) MiB)" | tee -a "$LOG"
done
wheels=("$WHEELS"/*.whl "$WORK"/*.whl)

step "2/7 install wheels offline"
if [[ ${#wheels[@]} -gt 0 ]]; then
    printf '  %s\n' "${wheels[@]##*/}" | tee -a "$LOG"
    if run "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --find-links "$WHEELS" --find-links "$WORK" --target "$SITE" "${wheels[@]}"; then
        export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    elif [[ $DRY_RUN -eq 1 ]]; then
        # e.g. cp312 wheels for the GPU image checked on a machine with another Python
        echo "dry run: these wheels do not install here ($("$PYTHON" -V)); continuing with the installed packages" | tee -a "$LOG"
        export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "error: installing the wheels from $WHEELS failed (see above); they must match $("$PYTHON" -V) on this machine" | tee -a "$LOG" >&2
        exit 1
    fi
else
    echo "no wheels in $WHEELS: using the packages already installed" | tee -a "$LOG"
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi

step "3/7 machine"
run "$PYTHON" - "$OUT/machine.json" <<'EOF'
import json, sys
sys.path.insert(0, "benchmarks")
import common, onnxruntime as ort, torch
info = common.machine_description()
info["onnxruntime_file"] = ort.__file__
info["torch_cuda"] = torch.version.cuda
print(json.dumps(info, indent=1))
open(sys.argv[1], "w").write(json.dumps(info, indent=1) + "\n")
EOF

step "4/7 CPU checks: the CUDA path with onnxruntime mocked"
if [[ $SKIP_CPU_TESTS -eq 1 ]]; then
    echo "skipped (--skip-cpu-tests: the caller runs tests/runtime/test_cuda_path.py itself)" | tee -a "$LOG"
else
    run "$PYTHON" -m pytest -q -p no:cacheprovider tests/runtime/test_cuda_path.py -m "not cuda"
fi

step "5/7 probe the CUDA execution provider"
set +e
run "$PYTHON" - <<'EOF'
import sys, warnings
import onnx
from onnx import TensorProto, helper
import onnxruntime as ort
from fxcompress.runtime.session import create_session
if "CUDAExecutionProvider" not in ort.get_available_providers():
    print(f"onnxruntime {ort.__version__} at {ort.__file__} has no CUDA provider (providers: {ort.get_available_providers()})")
    sys.exit(1)
graph = helper.make_graph([helper.make_node("MatMul", ["x", "x"], ["y"])], "probe",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    runtime = create_session(model, "cuda")
print(f"session providers: {runtime.providers}")
sys.exit(0 if runtime.provider == "cuda" else 1)
EOF
probe=$?
set -e
if [[ $probe -ne 0 ]]; then
    echo "no GPU: stopping before CUDA steps (the ONNX Runtime CUDA provider is not active here)" | tee -a "$LOG"
    [[ $DRY_RUN -eq 1 ]] && exit 0 || exit 1
fi
if [[ $DRY_RUN -eq 1 ]]; then
    echo "dry run: the CUDA provider is active, stopping before CUDA steps" | tee -a "$LOG"
    exit 0
fi

# From here on a failing step is recorded and the next one still runs: partial GPU results beat none.
failed=()
step "6/7 CUDA tests"
run "$PYTHON" -m pytest -q -p no:cacheprovider -m cuda tests/runtime/test_cuda_path.py tests/runtime/test_session.py -rs -s \
    || failed+=("CUDA tests")

step "7/7 GPU benchmark"
presets="$("$PYTHON" -c 'from fxcompress.passes.presets import PRESETS; print(",".join(p for p in ("default", "fp16", "int8") if p in PRESETS))')"
common=(--provider cuda --presets "$presets" --peers eager,plain --torch-graphmodule --rounds 5 --block 10 --out "$OUT" --resume)
# One model per call, each under its own time limit, so one slow model cannot starve the rest.
for spec in "resnet50 1 150" "bert_encoder 1 120" "resnet50 32 120"; do
    read -r model batch limit <<< "$spec"
    run timeout "$limit" "$PYTHON" benchmarks/run.py "${common[@]}" --models "$model" --batch "$batch" \
        || failed+=("$model batch $batch (exit $?, 124 = over ${limit}s)")
done
if [[ -n "$ARCHIVE" ]]; then
    tar czf "$ARCHIVE" -C "$(dirname "$OUT")" "$(basename "$OUT")"
    echo "packed $OUT into $ARCHIVE" | tee -a "$LOG"
fi
if [[ ${#failed[@]} -gt 0 ]]; then
    step "done with failures: ${failed[*]}; results so far in $OUT"
    exit 1
fi
step "done: results in $OUT"
