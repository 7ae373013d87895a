#!/bin/bash
# Python's garbage collector in `upcycle convert` (upcycle/collector.py): this checkout's code against another's,
# clone and --noise 0.01 of a dense model, alternated over 3 rounds (order swapped in round 2); each line: wall s,
# user s, system s, peak RSS kB (/usr/bin/time). Usage, from the repository root:
#   bash benchmarks/collector_ab.sh DENSE_MODEL BASE_CODE
# BASE_CODE: a folder with the other version's `upcycle/` and `upcycle_cli/` (e.g. `git archive <commit> upcycle cli
# | tar -x -C BASE && ln -s cli BASE/upcycle_cli`).
set -u
SRC=$1 BASE=$2 HERE=$(mktemp -d) OUT=$(mktemp -d)
ln -s "$PWD/upcycle" "$HERE/upcycle" && ln -s "$PWD/cli" "$HERE/upcycle_cli"
run() {
  code=$1; shift
  rm -rf "$OUT/moe"
  if [ "$code" = this ]; then pp=$HERE; else pp=$BASE; fi
  PYTHONPATH=$pp /usr/bin/time -f "%e %U %S %M" upcycle convert "$SRC" "$OUT/moe" "$@" --force >/dev/null 2>"$OUT/err"
  echo "$code $* : $(tail -1 "$OUT/err")"
}
for r in 1 2 3; do
  if [ $r = 2 ]; then order="this base"; else order="base this"; fi
  for c in $order; do run "$c" --experts 8 --top-k 2; done
  for c in $order; do run "$c" --experts 8 --top-k 2 --noise 0.01; done
done
rm -rf "$HERE" "$OUT"
