#!/usr/bin/env bash
# The end-to-end science check (docs/results.md): does the pipeline recover what the phantom plants?
# Builds a 500-study phantom (1,000-1,400 px sources) and its store at all five resolutions, then
# sweeps smallcnn over 160..480 px and writes the report to results/phantom-science/.
#
#   bash bench/science_check.sh            # seeds 0,1,2 (about 30 minutes on 2 CPU cores)
#   SEEDS=0 bash bench/science_check.sh    # one seed
#   WORK=/data/sci bash bench/science_check.sh
#
# Re-running resumes: the phantom and store are reused, finished trials are not run again, and
# extra seeds or resolutions only add their own trials.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=${WORK:-scratch/science}
SEEDS=${SEEDS:-0,1,2}
RESOLUTIONS=${RESOLUTIONS:-160,240,320,400,480}

if [ ! -f "$WORK/phantom/phantom.json" ]; then
  "$PY" -m preprocessing phantom --out "$WORK/phantom" --studies 500 --seed 0 \
      --min-size 1000 --max-size 1400 --workers "$(nproc)"
fi
if [ ! -f "$WORK/store/manifest.json" ]; then
  "$PY" -m preprocessing build --image-root "$WORK/phantom" --csv "$WORK/phantom/train.csv" \
      --csv "$WORK/phantom/valid.csv" --out "$WORK/store" --resolutions 160,240,320,400,480 --no-ray
fi
# From random weights (no ImageNet weights for smallcnn): no frozen-body epoch, a larger body LR and
# a smaller batch than the thesis protocol so the few hundred studies give enough optimizer steps; no
# augmentation, whose bilinear warps blur the finest phantom texture (docs/results.md).
"$PY" -m orchestrator.sweep --name science --store "$WORK/store" --storage "$WORK/sweeps" \
  --results-dir results/phantom-science \
  --resolutions "$RESOLUTIONS" --models smallcnn --seeds "$SEEDS" --weights none \
  --epochs-frozen 0 --epochs-unfrozen 6 --batch-studies 8 --lr-body 1e-3 --lr-head 1e-2 --no-augment \
  --cpus-per-trial "$(nproc)" --workers 1 --progress-interval 60
