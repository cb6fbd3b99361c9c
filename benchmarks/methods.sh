#!/usr/bin/env bash
# The method comparison of BENCHMARKS.md and the README: every student method, three seeds each,
# with SegNet teachers and students, then with MTAN teachers and students, as DVC experiments over
# the committed default pipeline; then one table per set of teachers with `kdmtl report`.
#
#     benchmarks/methods.sh                          # every row below, seeds 0 1 2, params' epochs
#     STUDENT_EPOCHS=8 benchmarks/methods.sh         # a shorter student schedule, for every row
#     METHODS="kd url" MTAN_METHODS="" WIDE_METHODS="" SEEDS="0 1" benchmarks/methods.sh
#
# A method is a `student.method` (kd, url, ew, dwa, uw, gradnorm, mgda); METHOD+outputs adds the
# distillation of the teachers' predictions with the weights of OUTPUTS below. WIDE_METHODS run
# with a SegNet student wider than its teachers (WIDE_FILTERS channels per level) at the params'
# epochs, whatever STUDENT_EPOCHS says: the row above the teachers, and its control without
# distillation (about 14 minutes each on 2 cores).
#
# Run from the repository root after `dvc repro` and a commit of its outputs, with nothing else
# changed: the SegNet experiments rerun only train_student and evaluate. DVC does not restore stages with
# persistent outputs from its run cache, so each MTAN experiment queued from the commit would
# train the three MTAN teachers again (about 30 minutes on 2 cores): the first MTAN row runs in
# the workspace and trains them, the others are queued from its outputs, and the workspace then
# goes back to the commit. Writes reports/methods.md, delta_mtl.png and curves.png.
set -euo pipefail

methods=${METHODS:-kd ew dwa uw gradnorm mgda url kd+outputs url+outputs}
mtan_methods=${MTAN_METHODS:-ew kd url}
wide_methods=${WIDE_METHODS:-kd ew}
wide_filters=${WIDE_FILTERS:-24,48,96,192}
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
if ! git diff --quiet HEAD; then
  echo "uncommitted changes: commit the pipeline's outputs first (the MTAN rows reset the workspace)"
  exit 1
fi

run_args() {  # run_args ARCH METHOD SEED: the -S options of one experiment
  local method=${2%+outputs}
  args=("${common[@]}" -S "model.arch=$1" -S "student.method=$method" -S "student.seed=$3")
  if [[ $2 == *+outputs ]]; then
    args+=("${outputs[@]}")
  fi
}

wide_args() {  # wide_args METHOD SEED: a wider SegNet student, at the params' epochs
  args=(-S "model.arch=segnet" -S "student.model={arch:segnet,filters:[$wide_filters]}"
    -S "student.method=$1" -S "student.seed=$2")
}

run_all() {
  local started
  started=$(date +%s)
  dvc exp run --run-all -j 1 || echo "some experiments failed: the report leaves them out"
  echo "experiments ran in $(( $(date +%s) - started )) s"
}

for seed in $seeds; do  # seed by seed: a sweep stopped early has every row for its first seeds
  for method in $methods; do
    run_args segnet "$method" "$seed"
    dvc exp run --queue "${args[@]}"
  done
  for method in $wide_methods; do
    wide_args "$method" "$seed"
    dvc exp run --queue "${args[@]}"
  done
done
run_all

first=true
for seed in $seeds; do
  for method in $mtan_methods; do
    run_args mtan "$method" "$seed"
    if $first; then
      dvc exp run "${args[@]}"  # in the workspace: trains the MTAN teachers
      first=false
    else
      dvc exp run --queue "${args[@]}"
    fi
  done
done
if ! $first; then
  run_all
  git checkout HEAD -- params.yaml dvc.lock metrics plots
  dvc checkout
fi
kdmtl report
