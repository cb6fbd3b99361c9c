#!/usr/bin/env bash
# The method comparison of BENCHMARKS.md and the README: every student method, three seeds each,
# with SegNet teachers and students, then with MTAN teachers and students, as DVC experiments over
# the committed default pipeline; then one table per set of teachers with `kdmtl report`.
#
#     benchmarks/methods.sh                          # every row below, seeds 0 1 2, params' epochs
#     STUDENT_EPOCHS=10 benchmarks/methods.sh        # a shorter student schedule, for every row
#     METHODS="kd url" MTAN_METHODS="" SEEDS="0 1" benchmarks/methods.sh
#
# A method is a `student.method` (kd, url, ew, dwa, uw, gradnorm, mgda); METHOD+outputs adds the
# distillation of the teachers' predictions with the weights of OUTPUTS below. Run from the
# repository root after `dvc repro` and a commit of its outputs: the SegNet experiments then rerun
# only train_student and evaluate; the first MTAN experiment trains the MTAN teachers and extracts
# their features, which the others take from DVC's run cache. Experiments are queued seed by seed,
# so a sweep stopped early has every row for its first seeds. Writes reports/methods.md,
# delta_mtl.png and curves.png.
set -euo pipefail

methods=${METHODS:-kd ew dwa uw gradnorm mgda url kd+outputs url+outputs}
mtan_methods=${MTAN_METHODS:-ew kd url}
seeds=${SEEDS:-0 1 2}
outputs=(
  -S student.kd_outputs.weights.semseg=1.0
  -S student.kd_outputs.weights.depth=1.0
  -S student.kd_outputs.weights.normal=1.0
  -S student.kd_outputs.temperature=2.0
)
common=()
if [[ -n ${STUDENT_EPOCHS:-} ]]; then
  common+=(-S "student.epochs=$STUDENT_EPOCHS")
fi

queue() {  # queue ARCH METHOD SEED
  local arch=$1 method=${2%+outputs} seed=$3
  local args=(-S "model.arch=$arch" -S "student.method=$method" -S "student.seed=$seed")
  if [[ $2 == *+outputs ]]; then
    args+=("${outputs[@]}")
  fi
  dvc exp run --queue "${common[@]}" "${args[@]}"
}

for seed in $seeds; do
  for method in $methods; do
    queue segnet "$method" "$seed"
  done
  for method in $mtan_methods; do
    queue mtan "$method" "$seed"
  done
done
started=$(date +%s)
dvc exp run --run-all -j 1 || echo "some experiments failed: the report leaves them out"
echo "experiments ran in $(( $(date +%s) - started )) s"
kdmtl report
