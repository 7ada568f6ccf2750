#!/usr/bin/env bash
# The CHAOS T2 MRI experiment (see teacher.yaml for the patient groups):
#   1. single-slice dataset of every patient (slice of largest left-kidney area), runs/chaos/slices
#   2. 3D teacher on group A volumes -> runs/chaos/teacher/prototypes.pt
#   3. for each seed: 2D baseline and distilled student on group B single slices,
#      tested on group C single slices (results.json) and on every axial slice of the group C
#      volumes (results_allslices.json)
#   4. pooled tables (mean ± std over seeds)
# Finished steps are skipped, so an interrupted run resumes. Environment: CHAOS_DIR, SEEDS.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CHAOS_DIR=${CHAOS_DIR:-../shared/data/chaos_t2_mr}
LD=${LD:-.venv/bin/lightning-distill}
OUT=runs/chaos
if [ ! -f "$CHAOS_DIR/dataset.json" ]; then
  echo "CHAOS data not found at $CHAOS_DIR (set CHAOS_DIR); nothing to do" >&2
  exit 2
fi
[ -f $OUT/slices/dataset.json ] || $LD slices "$CHAOS_DIR" $OUT/slices --max-area left_kidney --overwrite
[ -f $OUT/teacher/prototypes.pt ] || $LD fit experiments/chaos/teacher.yaml trainer.enable_progress_bar=false
for s in ${SEEDS:-0 1 2}; do
  for m in baseline student; do
    dir=$OUT/${m}_s$s
    [ -f $dir/results.json ] || $LD fit experiments/chaos/$m.yaml output_dir=$dir seed=$s \
        distill.prototypes=$OUT/teacher/prototypes.pt trainer.enable_progress_bar=false
    [ -f $dir/results_allslices.json ] || $LD test $dir/checkpoints/best.ckpt data.nifti.root="$CHAOS_DIR" \
        data.nifti.slice_mode=all trainer.enable_progress_bar=false --out $dir/results_allslices.json
  done
done
echo "== group C single slices"
$LD report --grid $OUT/baseline_s*/ $OUT/student_s*/
echo "== group C, every axial slice of the volumes"
$LD report --grid --results-name results_allslices.json $OUT/baseline_s*/ $OUT/student_s*/
echo "== 3D teacher on group C volumes"
$LD report $OUT/teacher
