#!/usr/bin/env bash
# One lent-GPU session: build the extension with its CUDA kernels, run the GPU suite (CUDA tests, then
# every kernel and the end-to-end denoiser against eager and compiled references), then train for
# whatever time is left. Everything worth keeping lands in OUT.
#   bash scripts/gpu_session.sh OUT TOTAL_SECONDS SUITE_SECONDS [ratchet | comparison STEPS]
# ratchet (default): the training ratchet (scripts/ratchet.py): continue the bundled model's training from
#   training-state/ for the time left; when held-out PSNR improved, the new state, the re-bundled model and
#   the model card's new history row land in the tree; the session log always does. All of them are also
#   copied to OUT/ratchet/ (same paths) for the machine that commits them:
#     bash scripts/gpu_session.sh OUT 585 0 ratchet
# comparison STEPS: train svnr, the no-correlation ablation and the baseline for STEPS steps each and
#   evaluate them (scripts/train_comparison.py; issue 7). On an H200 the small preset at batch 64 ran
#   ~20 it/s, and each run starts in ~40 s; the 1000-step baseline evaluation takes about a minute.
# SUITE_SECONDS 0 skips the suite (e.g. a second call on a warm machine).
# (data/photos must be there: python scripts/make_dataset.py --out data/photos, carried to the machine)
set -uo pipefail
out=${1:?usage: gpu_session.sh OUT TOTAL_SECONDS SUITE_SECONDS [ratchet | comparison STEPS]}
total=${2:-590}
suite=${3:-300}
phase=${4:-ratchet}
start=$(date +%s)
export PYTHONUNBUFFERED=1
command -v nvcc > /dev/null || export PATH="/usr/local/cuda/bin:$PATH"

if ! python3 -m pip install --no-build-isolation --no-deps -q -e . > /tmp/build.log 2>&1; then
    tail -40 /tmp/build.log; exit 1
fi
python3 -m svnr_fast.info
if [ "$suite" -gt 0 ]; then
    python3 benchmarks/gpu_suite.py --out "$out" --budget-s "$suite"
    rm -f "$out/timings.jsonl"     # the CSV holds the same timings
    # host us per op call on the real CUDA path (issue 11; the CPU figures stub the launches)
    python3 benchmarks/bench_host_path.py --json > "$out/host-path-gpu.json" || echo "bench_host_path failed"
fi

left=$(( total - ($(date +%s) - start) - 20 ))
train_args=(--data data/photos --preset small --batch-size 64 --workers 6 --checkpoint-every 500)
case "$phase" in
ratchet)
    # the held-out metric and the bundling take well under a minute after training
    # each step after its sample replayed from a CUDA graph (--cuda-graph, issue 11); until a GPU has run it
    # once, a failure there falls back to eager training for the time left rather than losing the session
    ratchet() {     # SECONDS WORK [more svnr train options]
        python3 scripts/ratchet.py --data data/photos --work "$2" --seconds "$1" --device cuda -- \
            --batch-size 64 --workers 6 --checkpoint-every 500 --eval-every 1000 "${@:3}"
    }
    work="runs/ratchet-$(date +%s)"
    if [ "$left" -gt 150 ]; then
        echo "== the training ratchet: $(( left - 60 )) s of training, captured steps"
        if ! ratchet "$(( left - 60 ))" "$work" --cuda-graph; then
            left=$(( total - ($(date +%s) - start) - 20 ))
            if [ "$left" -gt 150 ]; then
                echo "== --cuda-graph failed (above): the ratchet in eager mode, $(( left - 60 )) s of training"
                ratchet "$(( left - 60 ))" "$work-eager"
            fi
        fi
        mkdir -p "$out/ratchet"
        cp --parents training-state/svnr-small.safetensors training-state/svnr-small-log.jsonl \
            svnr_fast/weights/svnr-small.safetensors svnr_fast/weights/svnr-small.md "$out/ratchet/" 2>/dev/null
    else
        echo "== ratchet skipped: ${left} s left"
    fi ;;
comparison)
    steps=${5:?comparison needs STEPS}
    if [ "$left" -lt 240 ]; then echo "== comparison skipped: ${left} s left, too little for 3 models"; exit 0; fi
    echo "== comparison: 3 models x ${steps} steps, then svnr eval (${left} s left)"
    python3 scripts/train_comparison.py --out runs/comparison --steps "$steps" --device cuda \
        --max-minutes "$(( left / 4 / 60 + 1 ))" --eval-out "$out/comparison" -- "${train_args[@]}" \
        --warmup-steps 200 --eval-every 0
    for name in svnr ablation baseline; do
        mkdir -p "$out/comparison/$name"
        cp runs/comparison/$name/model.safetensors runs/comparison/$name/log.jsonl "$out/comparison/$name/" 2>/dev/null
    done ;;
*) echo "unknown phase $phase (ratchet | comparison STEPS)"; exit 2 ;;
esac
echo "== session done in $(( $(date +%s) - start )) s"
