#!/usr/bin/env bash
# The newest bases' GPU rows (SD3.5 Large, Krea 2, Qwen-Image 2.1): a training step of each full-size transformer
# (random bf16 weights, its published architecture) at 1024 px beside what `train --dry-run` estimates, and an
# image; then FLUX.1-dev with a LoKr (factor 16) instead of the LoRA, with and without checkpointing; about 6
# minutes. A call of a lent machine of its own, after bench/gpu_run.sh and gpu_run_families.sh:
# prepare here with bench/gpu_wheels.sh, then call the device tool with command "bash bench/gpu_run_newest.sh",
# carry [".whl"], timeout_s 600. Logs under $OUT.
set -uo pipefail
out=${OUT:-/tmp/gpu_run}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:src:bench PYTHONUNBUFFERED=1
for model in sd3.5-large krea2-raw qwen-image-2.1; do
    timeout 80 python3 bench/gpu_train_step.py --model "$model" --bases bf16,nf4 --resolutions 1024 --steps 5 \
        --warmup 2 2>&1 | tee "$out/train_step_$model.log"
    timeout 60 python3 bench/gpu_generate.py --model "$model" --images 2 2>&1 | tee "$out/generate_$model.log"
done
timeout 60 python3 bench/gpu_train_step.py --adapter lokr --lokr-factor 16 --bases bf16 --resolutions 1024 \
    --steps 5 --warmup 2 2>&1 | tee "$out/train_step_lokr.log"
