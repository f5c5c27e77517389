#!/usr/bin/env bash
# One lent-GPU session: build the extension with its CUDA kernels, run the GPU suite (CUDA tests, then
# every kernel and the end-to-end denoiser against eager and compiled references), then train the
# bundled model for whatever time is left. Everything worth keeping lands in OUT.
#   bash scripts/gpu_session.sh OUT TOTAL_SECONDS SUITE_SECONDS
# (data/photos must be there: python scripts/make_dataset.py --out data/photos)
set -uo pipefail
out=${1:?usage: gpu_session.sh OUT TOTAL_SECONDS SUITE_SECONDS}
total=${2:-590}
suite=${3:-300}
start=$(date +%s)
export PYTHONUNBUFFERED=1
command -v nvcc > /dev/null || export PATH="/usr/local/cuda/bin:$PATH"

if ! python3 -m pip install --no-build-isolation --no-deps -q -e . > /tmp/build.log 2>&1; then
    tail -40 /tmp/build.log; exit 1
fi
python3 -m svnr_fast.info
python3 benchmarks/gpu_suite.py --out "$out" --budget-s "$suite"
rm -f "$out/timings.jsonl"     # the CSV holds the same timings

left=$(( total - ($(date +%s) - start) - 20 ))
echo "== training the bundled model for ${left} s"
if [ "$left" -gt 90 ]; then
    python3 scripts/train_on_gpu.py --seconds "$left" --out runs/bundled -- \
        --data data/photos --preset small --batch-size 64 --workers 6 --eval-every 1000 --checkpoint-every 2000
    cp runs/bundled/best.safetensors runs/bundled/log.jsonl "$out/" 2>/dev/null
fi
echo "== session done in $(( $(date +%s) - start )) s"
