#!/usr/bin/env bash
# One run of the upcycling study's `gpu` preset on a bare GPU machine (issue 25; benchmarks/README.md):
#   benchmarks/gpu/study.sh OUT [ARMS [SEED]]        e.g.  benchmarks/gpu/study.sh "$OUT" dense,moe-all 0
# Carry .whl/ (as for run.sh) and .gpu-study/, made here once with
#   python benchmarks/upcycle_vs_dense.py --preset cpu --export-corpus .gpu-study
# (cpu's corpus split as token ids and its tokenizer: the GPU machine has no network for Debian's packages).
# Pretrains the parent (deterministic, so every run makes the same one), sweeps and trains the two arms, and writes
# OUT/upcycle_vs_dense_gpu_<arms>_s<seed>.json (rewritten after each finished run: a run cut short keeps what it
# finished), its two PNGs and OUT/study.log. Back here, join the runs:
#   python benchmarks/upcycle_vs_dense.py --merge A.json B.json --results benchmarks/results/upcycle_vs_dense_gpu.json
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu/study.sh OUT [ARMS [SEED]]}
ARMS=${2:-dense,moe-all}
SEED=${3:-0}
PRESET=${UPCYCLE_STUDY_PRESET:-gpu}  # smoke: the same steps at toy size on a CPU
cd "$(dirname "$0")/../.."
if [ ! -f .gpu-study/corpus.json ]; then
  echo "error: .gpu-study/ is missing: make it here with python benchmarks/upcycle_vs_dense.py --preset cpu" \
    "--export-corpus .gpu-study, and carry it" >&2
  exit 2
fi
mkdir -p "$OUT"
# shellcheck source=benchmarks/gpu/install.sh
source benchmarks/gpu/install.sh || exit 3
export UPCYCLE_CACHE=${UPCYCLE_STUDY_CACHE:-/tmp/upcycle-study-cache}
"$PY" benchmarks/upcycle_vs_dense.py --preset "$PRESET" --corpus .gpu-study --arms "$ARMS" --seeds "$SEED" \
  --work "$UPCYCLE_CACHE/work" --no-keep-checkpoints \
  --results "$OUT/upcycle_vs_dense_${PRESET}_${ARMS//,/-}_s$SEED.json" 2>&1 | tee "$OUT/study.log"
exit "${PIPESTATUS[0]}"
