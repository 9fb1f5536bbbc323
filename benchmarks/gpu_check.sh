#!/usr/bin/env bash
# The GPU path, measured in one prepared run (issue 13): the CUDA-only tests (including "no
# host sync per CEM step"), training throughput per numeric path and auto's pick, CEM's
# overhead, and two epochs of the paper's CIFAR-10 protocol (configs/paper/cifar10.yaml: the
# first without CEM's loss, the second with it) with the data on the device. Prints figures;
# every benchmark's last line is one JSON object. About 10 minutes on one H100-class GPU.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, on a CUDA machine
#   QUICK=1 bash benchmarks/gpu_check.sh    # smaller benchmark sizes (about 4 minutes)
#
# Data: CIFAR-10 is found as usual ($SPLITCEM_DATA, ./data, ../shared/datasets); a shared/
# folder inside the checkout is used too. Outputs go to $OUT (default runs/gpu_check).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import torch, pydantic, typer, splitcem" 2>/dev/null; then
  echo "error: $PY cannot import torch and splitcem's dependencies; run make setup first, or" \
       "point PYTHON at an environment that has them (PYTHON=/path/to/python bash $0)" >&2
  exit 2
fi
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
if [ -d shared/datasets ] && [ -z "${SPLITCEM_SHARED:-}" ]; then
  export SPLITCEM_SHARED="$PWD/shared" SPLITCEM_DATA="${SPLITCEM_DATA:-$PWD/shared/datasets}"
fi
section() { printf '\n== %s (%s)\n' "$1" "$(date +%T)"; }

section "device"
"$PY" - <<'EOF'
import torch
assert torch.cuda.is_available(), "no CUDA device: this script measures the GPU path"
from splitcem.runtime import resolve_numeric_path
p = resolve_numeric_path("auto", "auto", "cuda")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()} "
      f"(compute capability {torch.cuda.get_device_capability()}); auto: {p.describe()}")
EOF

section "CUDA-only tests"
"$PY" -m pytest -q -k cuda -rs -s tests 2>&1 | tail -n 25 || echo "CUDA TESTS FAILED (above)"

if [ -n "${QUICK:-}" ]; then TT="--images 4096 --repeats 3"; CO="--reps 10 --limit-train 10000 --repeats 3"
else TT="--images 16384 --repeats 5"; CO="--reps 20 --limit-train 0 --repeats 5"; fi

section "train_throughput --device cuda"
"$PY" benchmarks/train_throughput.py --device cuda $TT | tee "$OUT/train_throughput.txt"

section "cem_overhead --device cuda (loss step, refit, epoch pairs)"
"$PY" benchmarks/cem_overhead.py --device cuda --refit $CO | tee "$OUT/cem_overhead.txt"

section "configs/paper/cifar10.yaml, 2 epochs (epoch 2 with CEM's loss active)"
rm -rf "$OUT/paper_cifar10"
"$PY" -m splitcem.cli train configs/paper/cifar10.yaml --device cuda -q \
  --set train.epochs=2 --out "$OUT/paper_cifar10"
"$PY" - "$OUT/paper_cifar10/metrics.json" <<'EOF'
import json, sys
rec = json.load(open(sys.argv[1]))
n = rec["numerics"]
print(f"numerics: {n['path']} ({n['reason']})")
for h in rec["train"]["history"]:
    print(f"epoch {h['epoch']}: train {h['train_seconds']:.1f} s ({h['images_per_second']:.0f} "
          f"img/s) + epoch end {h['epoch_end_seconds']:.2f} s (CEM refit "
          f"{h.get('cem/refit_ms', float('nan')):.0f} ms), CEM loss "
          f"{'on' if 'loss/cem' in h else 'off'}")
last = rec["train"]["history"][-1]
print(json.dumps({"paper_epoch_s_with_cem": round(last["train_seconds"] + last["epoch_end_seconds"], 2),
                  "paper_epoch_images_per_s": round(last["images_per_second"], 1),
                  "paper_240_epochs_h_estimate": round(240 * (last["train_seconds"] + last["epoch_end_seconds"]) / 3600, 2),
                  "path": n["path"]}))
EOF
section "done"
