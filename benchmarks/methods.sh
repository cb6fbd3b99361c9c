#!/usr/bin/env bash
# The method comparison of BENCHMARKS.md and the README: every student method, three seeds each,
# as DVC experiments over the committed default pipeline, then one table with `kdmtl report`.
#
#     benchmarks/methods.sh                      # kd ew dwa uw gradnorm mgda, seeds 0 1 2
#     METHODS="kd ew" SEEDS="0 1" benchmarks/methods.sh
#
# Run from the repository root after `dvc repro` and a commit of its outputs: the experiments then
# rerun only train_student and evaluate. Writes reports/methods.md, delta_mtl.png and curves.png.
set -euo pipefail

methods=${METHODS:-kd ew dwa uw gradnorm mgda}
seeds=${SEEDS:-0 1 2}

for method in $methods; do
  for seed in $seeds; do
    dvc exp run --queue -S "student.method=$method" -S "student.seed=$seed"
  done
done
started=$(date +%s)
dvc exp run --run-all -j 1 || echo "some experiments failed: the report leaves them out"
echo "experiments ran in $(( $(date +%s) - started )) s"
kdmtl report
