#!/usr/bin/env bash
# rft's GPU lane: the tests marked `gpu` (tests/gpu/, and the LoRA sync's merge at
# gpt-oss shapes in tests/test_lora_sync.py), on one CUDA GPU, against the patched
# OpenRLHF 0.9.3, then the bounds of tests/gpu/metric_bounds.txt on the metrics the
# step wrote. CI has no GPU; run this on a GPU node.
#
#   bash tests/gpu/run_gpu_lane.sh                    # in the training env (setup_node.sh)
#   WHEELS=/path/to/wheels bash tests/gpu/run_gpu_lane.sh   # offline: the pinned stack from wheels
#   bash tests/gpu/run_gpu_lane.sh -k flex            # arguments go to pytest
#   bash tests/gpu/run_gpu_lane.sh --help             # this text; checks and installs nothing
#
# Settings (environment):
#   PYTHON       interpreter with torch+CUDA                       (default: python3)
#   WHEELS       folder of wheels: openrlhf 0.9.3, deepspeed 0.18.5, transformers 4.57.6, peft,
#                and whatever else the interpreter lacks. Installed with --no-deps into
#                STACK_DIR, which goes first on PYTHONPATH; the interpreter is left alone.
#                openrlhf ships a cp311 wheel only: on another Python its (pure-Python)
#                files are unpacked instead of pip-installed.   (default: unset = use PYTHON's)
#   STACK_DIR    where WHEELS are installed          (default: build/gpu-lane-stack)
#   OUT_DIR      metrics, summary, logs              (default: build/gpu-lane)
#   TORCH_EXTENSIONS_DIR  DeepSpeed's JIT-built ops (FusedAdam), kept between runs
#                                                    (default: build/torch_extensions)
#   TORCH_CUDA_ARCH_LIST  GPU architectures to build ops for (default: the GPU's own)
#
# Output: pytest's report, one PASS/FAIL line per bound, and in OUT_DIR:
# step_metrics.jsonl, gpu_lane_summary.json, flex_vs_eager.json, versions.json, pytest.log.
set -euo pipefail

if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
  exit 0
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
WHEELS="${WHEELS:-}"
STACK_DIR="${STACK_DIR:-$ROOT/build/gpu-lane-stack}"
OUT_DIR="${OUT_DIR:-$ROOT/build/gpu-lane}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/build/torch_extensions}"

die() { echo "run_gpu_lane.sh: $*" >&2; exit 2; }

command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found; set PYTHON=/path/to/python"
command -v patch >/dev/null 2>&1 || die "GNU patch not found (the tests apply patches/series with it); install it (apt-get install patch)"

if [[ -n "$WHEELS" ]]; then
  [[ -d "$WHEELS" ]] || die "WHEELS=$WHEELS is not a folder of wheels"
  shopt -s nullglob
  openrlhf_wheels=("$WHEELS"/openrlhf-*.whl)
  other_wheels=()
  for whl in "$WHEELS"/*.whl; do
    [[ "$(basename "$whl")" == openrlhf-* ]] || other_wheels+=("$whl")
  done
  shopt -u nullglob
  [[ ${#openrlhf_wheels[@]} -eq 1 ]] || die "WHEELS=$WHEELS must hold exactly one openrlhf-*.whl (found ${#openrlhf_wheels[@]})"
  rm -rf "$STACK_DIR.tmp"
  mkdir -p "$STACK_DIR.tmp"
  echo "run_gpu_lane.sh: installing ${#other_wheels[@]} wheels and $(basename "${openrlhf_wheels[0]}") into $STACK_DIR" >&2
  if [[ ${#other_wheels[@]} -gt 0 ]]; then
    "$PYTHON" -m pip install --disable-pip-version-check -q --no-deps --no-index \
      --target "$STACK_DIR.tmp" "${other_wheels[@]}"
  fi
  # openrlhf's wheel is tagged cp311 but holds only Python files: unpack it (package and metadata)
  "$PYTHON" - "${openrlhf_wheels[0]}" "$STACK_DIR.tmp" <<'PY'
import shutil, sys, tempfile, zipfile
from pathlib import Path
wheel, dest = Path(sys.argv[1]), Path(sys.argv[2])
with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as zf:
    zf.extractall(tmp)
    tmp = Path(tmp)
    for data in tmp.glob("*.data"):
        for sub in ("purelib", "platlib"):
            for item in (data / sub).glob("*") if (data / sub).is_dir() else []:
                shutil.move(str(item), dest / item.name)
    for info in tmp.glob("*.dist-info"):
        shutil.move(str(info), dest / info.name)
PY
  rm -rf "$STACK_DIR"
  mv "$STACK_DIR.tmp" "$STACK_DIR"
  export PYTHONPATH="$STACK_DIR${PYTHONPATH:+:$PYTHONPATH}"
fi

mkdir -p "$OUT_DIR" "$TORCH_EXTENSIONS_DIR"
if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  die "no CUDA GPU visible to $PYTHON; the GPU lane needs one (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset})"
fi
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  TORCH_CUDA_ARCH_LIST="$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
  export TORCH_CUDA_ARCH_LIST
fi

"$PYTHON" - "$OUT_DIR/versions.json" <<'PY'
import json, sys
from importlib import metadata
import torch
names = ("openrlhf", "deepspeed", "transformers", "peft", "accelerate", "torch", "flash-attn",
         "tokenizers", "huggingface-hub", "safetensors", "pytest")
versions = {}
for name in names:
    try:
        versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        versions[name] = "absent"
versions.update(python=sys.version.split()[0], cuda=str(torch.version.cuda), gpu=torch.cuda.get_device_name(0))
with open(sys.argv[1], "w") as f:
    json.dump(versions, f, indent=2, sort_keys=True)
for key, value in versions.items():
    print(f"  {key:16s} {value}")
PY

cd "$ROOT"
# every file that holds tests marked gpu
GPU_TESTS=(tests/gpu tests/test_lora_sync.py)
status=0
RFT_GPU_OUT="$OUT_DIR" "$PYTHON" -m pytest "${GPU_TESTS[@]}" -m gpu -v -rfEs -s -o log_level=WARNING -p no:cacheprovider "$@" \
  2>&1 | tee "$OUT_DIR/pytest.log" || status=$?

if [[ -f "$OUT_DIR/step_metrics.jsonl" ]]; then
  "$PYTHON" tests/gpu/check_metrics.py "$OUT_DIR/step_metrics.jsonl" --bounds tests/gpu/metric_bounds.txt || status=1
else
  echo "run_gpu_lane.sh: no $OUT_DIR/step_metrics.jsonl: the training-step test did not get that far" >&2
  status=1
fi
echo "run_gpu_lane.sh: results in $OUT_DIR (exit $status)" >&2
exit "$status"
