#!/usr/bin/env bash
# Issues 16 and 17's GPU rows: a training step and an image of each newer family's full-size model (random bf16
# weights, its published architecture) at 1024 px (SD 1.5 at 512), beside what `train --dry-run` estimates;
# about 9 minutes.
# A second call of a lent machine, after bench/gpu_run.sh: prepare here with bench/gpu_wheels.sh, then call the
# device tool with command "bash bench/gpu_run_families.sh", carry [".whl"], timeout_s 600. Logs under $OUT.
set -uo pipefail
out=${OUT:-/tmp/gpu_run}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:src:bench PYTHONUNBUFFERED=1
for model in flux2-klein-4b z-image qwen-image sdxl; do
    timeout 80 python3 bench/gpu_train_step.py --model "$model" --bases bf16,nf4 --resolutions 1024 --steps 5 \
        --warmup 2 2>&1 | tee "$out/train_step_$model.log"
done
timeout 40 python3 bench/gpu_train_step.py --model sd15 --bases bf16 --resolutions 512 --steps 5 --warmup 2 2>&1 \
    | tee "$out/train_step_sd15.log"
for model in flux2-klein-4b z-image qwen-image sdxl; do
    timeout 60 python3 bench/gpu_generate.py --model "$model" --images 2 2>&1 | tee "$out/generate_$model.log"
done
timeout 30 python3 bench/gpu_generate.py --model sd15 --resolution 512 --images 2 2>&1 | tee "$out/generate_sd15.log"
