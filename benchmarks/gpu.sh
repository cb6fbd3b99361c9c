#!/usr/bin/env bash
# The pipeline at GPU speed, at the paper's width (SegNet [64, 128, 256, 512, 512], 288x384, built-in
# scenes): samples/s of each stage (prepare, a teacher, its extraction, the student with kd from
# the cache and online) in fp32 and bf16; then, with untrained teachers, student epoch times (ew,
# kd from the cache streamed, kd with the features resident in GPU memory, kd with online
# teachers) and the write cost of extraction (forward alone, extraction, the writer alone in MB/s
# against the teacher's output rate), in the default precision (bf16 where the GPU has it).
#
#     benchmarks/gpu.sh                                       # on a GPU, under 10 minutes
#     DEVICE=cpu SAMPLES=4 REPEATS=1 EPOCHS=2 PRECISIONS="fp32 bf16" benchmarks/gpu.sh  # a CPU
#
# Runs from any folder, with kdmtl installed (the README's Quick start); needs nothing from
# `dvc repro`. Prints Markdown for BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")"

device=${DEVICE:-cuda}
samples=${SAMPLES:-32}
repeats=${REPEATS:-3}
epochs=${EPOCHS:-3}
read -r -a precisions <<< "${PRECISIONS:-fp32 bf16}"

python - <<PY
import torch
if "$device".startswith("cuda"):
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
else:
    print(f"device: cpu ({torch.get_num_threads()} threads), torch {torch.__version__}")
PY
python stages.py --samples "$samples" --epochs "$epochs" --device "$device" \
  "${precisions[@]/#/--precision=}"
echo
python student.py speed --paper --samples "$samples" --device "$device" \
  --epochs "$epochs" --repeats "$repeats"
echo
python extract.py --paper --samples "$samples" --device "$device" --repeats "$repeats"
