#!/usr/bin/env bash
# Issue 16's GPU rows: a training step and an image of each newer family's full-size model (random bf16
# weights, its published architecture) at 1024 px, beside what `train --dry-run` estimates; about 8 minutes.
# A second call of a lent machine, after bench/gpu_run.sh: prepare here with bench/gpu_wheels.sh, then call the
# device tool with command "bash bench/gpu_run_families.sh", carry [".whl"], timeout_s 600. Logs under $OUT.
set -uo pipefail
out=${OUT:-/tmp/gpu_run}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:src:bench PYTHONUNBUFFERED=1
for model in flux2-klein-4b z-image qwen-image; do
    timeout 90 python3 bench/gpu_train_step.py --model "$model" --bases bf16,nf4 --resolutions 1024 --steps 5 \
        --warmup 2 2>&1 | tee "$out/train_step_$model.log"
done
for model in flux2-klein-4b z-image qwen-image; do
    timeout 80 python3 bench/gpu_generate.py --model "$model" --images 2 2>&1 | tee "$out/generate_$model.log"
done
