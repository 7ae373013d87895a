#!/usr/bin/env bash
# The GPU check in one command, for a bare GPU machine with no network (see benchmarks/gpu/README.md):
#   benchmarks/gpu/run.sh OUT [check.py options]      e.g.  benchmarks/gpu/run.sh "$OUT" --budget 420
# 1. installs the wheels carried in .whl/ (transformers >= 5.23, datasets, ...) and this project, without
#    dependencies, into a private folder (never the machine's own site-packages);
# 2. runs benchmarks/gpu/check.py (pytest -m gpu, an end-to-end run, the throughput benchmark), whose results
#    and logs land in OUT/results, then packs them into OUT/gpu-check.tar.gz beside OUT/summary.json.
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu/run.sh OUT [check.py options]}
shift
cd "$(dirname "$0")/../.."
mkdir -p "$OUT"
export UPCYCLE_CACHE=${UPCYCLE_CACHE:-$PWD/.gpu-assets}
# shellcheck source=benchmarks/gpu/install.sh
source benchmarks/gpu/install.sh || exit 3
"$PY" benchmarks/gpu/check.py --out "$OUT/results" "$@"
status=$?
cp "$OUT/results/summary.json" "$OUT/summary.json" 2>/dev/null
tar czf "$OUT/gpu-check.tar.gz" -C "$OUT" results && rm -rf "$OUT/results"
exit $status
