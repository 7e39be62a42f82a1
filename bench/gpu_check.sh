#!/usr/bin/env bash
# The prepared GPU check (docs/gpu.md): install the carried wheels, then run `python -m bench.gpu_check`
# with a time budget on at most 8 cores; prints ONE JSON document and writes it to $OUT/gpu_check.json
# and each measured group to $OUT/groups/ when $OUT is set. Groups already in
# bench/results/groups-<gpu>/ are not measured again, so a second call continues the first.
#
#   bash bench/gpu_check.sh                 # on a GPU machine, from the repository root
#   bash bench/gpu_check.sh --tiny --device cpu   # extra arguments go to bench.gpu_check
#
# The wheels (ray, efficientnet-pytorch and the ray[tune] requirements a bare image lacks) come
# from .whl/, filled beforehand with `python bench/device_wheels.py` on a machine with network.
# Limits: GPU_CHECK_BUDGET_S (default 420) is the Python budget; the whole run is killed at
# GPU_CHECK_LIMIT_S (default 470) so it always ends inside 8 minutes, the JSON of the sections
# done by then still written.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-420}
LIMIT=${GPU_CHECK_LIMIT_S:-470}
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
# inductor's compiled kernels in an ignored folder of the checkout: a warm machine reuses them.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.device/inductor}
# One GPU of an 8-GPU node gets 8 cores: measure the loader with no more.
CORES=""
if command -v taskset >/dev/null && [ "$(nproc)" -gt 8 ]; then CORES="taskset -c 0-7"; fi

t0=$(date +%s)
if compgen -G ".whl/*.whl" >/dev/null; then
  SITE=${GPU_CHECK_SITE:-/tmp/site}
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
       --target "$SITE" .whl/*.whl; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    # ray's command-line entry points (the sweep does not need them, a user may)
    export PATH="$SITE/bin:$PATH"
  else
    echo "gpu_check.sh: installing .whl/*.whl failed; going on with what the image has" >&2
  fi
else
  echo "gpu_check.sh: no .whl/ folder; ray and efficientnet-pytorch must already be installed" >&2
fi
used=$(( $(date +%s) - t0 ))
echo "gpu_check.sh: wheels ready after ${used} s" >&2

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout -k 10 $(( LIMIT - used )) $CORES "$PY" -m bench.gpu_check --budget-s $(( BUDGET - used )) "$@"
rc=$?
if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
  echo "gpu_check.sh: stopped at the ${LIMIT} s limit; \$OUT/gpu_check.json holds the sections finished, \$OUT/groups/ the groups" >&2
fi
exit $rc
