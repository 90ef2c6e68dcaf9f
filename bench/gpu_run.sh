#!/usr/bin/env bash
# Issue 9's GPU figures, issue 18's scoring share and issue 19's offloaded base, in one call of a lent machine (H100
# or H200), logs under $OUT. Prepare here first with bench/gpu_wheels.sh, then call the device tool with: command
# "bash bench/gpu_run.sh", carry [".whl"], timeout_s 600. Each part has its own time limit, so that
# one that runs long still leaves the others time.
# Measured on an H200 on 2026-11-30 (bench/gpu_figures.json): bf16 and fp8 at 1024 px, nf4 at 512 and 1024 px, the
# scoring share (0.017) and generation. Not yet: the offloaded and compiled bases, which come first below.
set -uo pipefail
out=${OUT:-/tmp/gpu_run}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:src:bench PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, diffusers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__)" | tee -a "$out/gpu.txt"
# Issue 19: the base offloaded block by block (built in host memory first, which takes a minute or two).
timeout 120 python3 bench/gpu_train_step.py --bases bf16+offload --resolutions 1024 --checkpointing on --steps 4 \
    --warmup 1 2>&1 | tee "$out/train_step_offload.log"
timeout 60 python3 bench/gpu_train_step.py --bases bf16+compile --resolutions 1024 --steps 8 --warmup 2 2>&1 \
    | tee "$out/train_step_compile.log"
# The matrix: its last line is bf16's step at 1024 px without checkpointing.
timeout 150 python3 bench/gpu_train_step.py --bases bf16,nf4,fp8 --steps 8 --warmup 2 2>&1 | tee "$out/train_step.log"
# Issue 18: the share of a run that scoring its samples takes, on this machine's CPU beside that step.
step=$(grep -o 's_per_step=[0-9.]*' "$out/train_step.log" | tail -1 | cut -d= -f2)
timeout 90 python3 bench/score_cost.py ${step:+--step-seconds "$step"} 2>&1 \
    | tee "$out/score_cost.log"
timeout 60 python3 bench/gpu_generate.py --images 2 2>&1 | tee "$out/generate.log"
