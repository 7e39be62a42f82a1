#!/usr/bin/env bash
# The worked example of results/phantom-models/README.md: a phantom, its store at 32 and 64 px,
# a sweep of smallcnn, resnet18 and resnet34 from random weights, and the report. Re-running
# resumes (the phantom, the store and finished trials are reused).
#
#   WORK=scratch/phantom-models bash results/phantom-models/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
WORK=${WORK:-scratch/phantom-models}

if [ ! -f "$WORK/phantom/phantom.json" ]; then
  "$PY" -m preprocessing phantom --out "$WORK/phantom" --studies 100 --valid-fraction 0.3 \
      --min-size 600 --max-size 800 --seed 0 --workers 2
fi
if [ ! -f "$WORK/store/manifest.json" ]; then
  "$PY" -m preprocessing build --image-root "$WORK/phantom" --csv "$WORK/phantom/train.csv" \
      --csv "$WORK/phantom/valid.csv" --out "$WORK/store" --resolutions 32,64 --no-ray
fi
"$PY" -m orchestrator.sweep --name phantom-models --store "$WORK/store" --storage "$WORK/sweeps" \
  --resolutions 32,64 --models smallcnn,resnet18,resnet34 --seeds 0,1 --weights none \
  --epochs-frozen 0 --epochs-unfrozen 3 --batch-studies 8 --lr-body 1e-3 --lr-head 1e-2 \
  --no-augment --cpus-per-trial 1 --workers 0 --log none --progress lines --no-aggregate
"$PY" -m analysis.aggregate --sweep "$WORK/sweeps/phantom-models" --results-dir results/phantom-models
