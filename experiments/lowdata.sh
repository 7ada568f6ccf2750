#!/usr/bin/env bash
# Baseline vs prototype-distilled 2D student at several training-set sizes and seeds, on the
# phantom, with one teacher bank for all runs. Finished runs (results.json present) are skipped,
# so an interrupted grid resumes. Prints the pooled table at the end.
#   experiments/lowdata.sh [BANK] [OUT]      (defaults: runs/teacher/prototypes.pt runs/lowdata)
# Environment: FRACTIONS="0.1 1.0" SEEDS="0 1 2" EXTRA="model.name=FPN"
set -euo pipefail
cd "$(dirname "$0")/.."
BANK=${1:-runs/teacher/prototypes.pt}
OUT=${2:-runs/lowdata}
LD=${LD:-.venv/bin/lightning-distill}
mkdir -p "$OUT"
[ -f "$BANK" ] || { echo "no bank at $BANK: run 'make train-teacher' first" >&2; exit 2; }
for f in ${FRACTIONS:-0.1 1.0}; do
  for s in ${SEEDS:-0 1 2}; do
    for m in baseline distilled; do
      dir="$OUT/${m}_f${f}_s${s}"
      [ -f "$dir/results.json" ] && continue
      if [ "$m" = baseline ]; then w=0; else w=1; fi
      $LD fit experiments/student.yaml output_dir="$dir" seed="$s" data.train_fraction="$f" \
        distill.weight="$w" distill.prototypes="$BANK" trainer.enable_progress_bar=false ${EXTRA:-} > "$dir.log" 2>&1 \
        || { echo "run $dir failed, see $dir.log" >&2; exit 1; }
      echo "done $dir"
    done
  done
done
$LD report --grid "$OUT"/*/
