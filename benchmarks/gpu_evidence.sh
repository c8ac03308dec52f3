#!/usr/bin/env bash
# The evidence on the classroom checkpoints (checkpoints/), on one GPU:
#   grad     the gradient study (benchmarks/bench_gradients.py: 64 samples, 3 LoRA inits, 3 clip modes):
#            about 45 s per run alone on an H100, 9 runs, so about 7 minutes (measured: README);
#   compare  the equal-compute comparison along frontiers (benchmarks/bench_compare.py) in its larger regime
#            (batch 32, 60 s of each arm's step time, every arm, 4 lrs, 3 seeds, both rewards), one run at
#            a time. Not sized for one device session: each run pays start-up and evaluation besides its
#            training; the runs it finishes are reported (--report_only).
#
#     bash benchmarks/gpu_evidence.sh OUT [REAL_STATS.npz] [SECTIONS]     # SECTIONS: grad (default), compare, grad,compare
#     EVIDENCE_DRY=1 bash benchmarks/gpu_evidence.sh /tmp/ev "" grad,compare   # a CPU smoke run of the same steps, tiny sizes
#
# OUT gets models/ (the installed classroom checkpoints and every run), gradients/ and compare/ (copies of
# the results), and the logs. REAL_STATS: the evaluator's real-image statistics (models/evaluator/real_stats.npz
# of an earlier run) so that CIFAR-10 need not be read; without it, $SHORTFT_CIFAR (or --data_root's default)
# must hold CIFAR-10 for the comparison. A benchmark that runs past EVIDENCE_LIMIT_S is stopped:
# bench_gradients has written results.json after every run, and bench_compare then reports the runs it
# finished (--report_only). Do not run the two side by side on one GPU: processes sharing a GPU
# time-slice it, and an equal-seconds comparison run beside another job measures that job.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash benchmarks/gpu_evidence.sh OUT [REAL_STATS.npz] [SECTIONS]}
stats=${2:-}
sections=${3:-grad}
limit=${EVIDENCE_LIMIT_S:-450}  # seconds for each benchmark before it is stopped
models=$out/models
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
$py train_toy.py --pretrained --stages=ddpm --out_dir="$models" || exit 1
if [ -n "$stats" ]; then cp "$stats" "$models/evaluator/real_stats.npz" || exit 1; fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $py -c "import torch; print('torch', torch.__version__)"; } > "$out/device.txt" 2>&1

grad=(--models="$models" --device=cuda --out="$out/gradients")
# the comparison's larger regime (bigger batch, more steps, every arm; the CPU run is its small version)
compare=(--out_dir="$models" --device=cuda --jobs=1 --seconds=60 --ft_batch=32 --n_eval=512 --eval_every_s=15
         --methods=shortft,shortft_naive,shortft_perfect,draft,draft_lv,alignprop,drtune --lrs=5e-4,1e-3,2e-3,4e-3)
if [ -n "${EVIDENCE_DRY:-}" ]; then
    grad=(--models="$models" --device=cpu --out="$out/gradients" --n=4 --batch=4 --inits=1 --clips=hard)
    compare=(--out_dir="$models" --device=cpu --seconds=2 --n_eval=8 --eval_every_s=1 --seeds=0,1 --lrs=3e-4,1e-3
             --methods=shortft,draft --rewards=classifier:ship --ablations= --inception=false)
fi
if [[ ",$sections," == *,grad,* ]]; then
    timeout "$limit" $py benchmarks/bench_gradients.py "${grad[@]}" > "$out/gradients.log" 2>&1
    echo "gradient study rc $?" >> "$out/gradients.log"
fi
if [[ ",$sections," == *,compare,* ]]; then
    timeout "$limit" $py benchmarks/bench_compare.py "${compare[@]}" > "$out/compare.log" 2>&1
    rc=$?
    if [ $rc -ne 0 ]; then
        echo "bench_compare stopped (rc $rc): the report from the runs it finished" >> "$out/compare.log"
        $py benchmarks/bench_compare.py "${compare[@]}" --report_only >> "$out/compare.log" 2>&1
    fi
    mkdir -p "$out/compare"
    cp "$models"/compare/results.* "$models"/compare/*.png "$out/compare/" 2>/dev/null
    # every run's small files (metrics.json, eval.csv, log.csv), for a report made elsewhere
    (cd "$models" && find compare -name metrics.json -o -name eval.csv -o -name log.csv | tar czf "$out/compare_runs.tar.gz" -T -)
fi
exit 0
