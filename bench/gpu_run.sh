#!/usr/bin/env bash
# Issue 35's GPU matrix in one call of a lent machine (H100 or H200), logs under $OUT; about 9 minutes. Prepare here
# first with bench/gpu_wheels.sh, then call the device tool with: command "bash bench/gpu_run.sh", carry [".whl"],
# timeout_s 600. Each part has its own time limit, so that one that runs long still leaves the others time; the
# parts come in the order of what is least known.
#   1. FLUX.1-dev LoRA steps at 1024 px, rank 16, batch 1, no checkpointing: bf16, bf16 compiled, fp8 compute,
#      fp8 compute compiled (s/step, peak GB beside the dry-run's estimate, MFU);
#   2. the exact attention kernels at FLUX.1-dev's shape, training and generation;
#   3. a 28-step 1024 px image, eager and compiled;
#   4. a warm sweep of 3 runs against 3 processes on a FLUX.1-dev-sized base (start-up per run);
#   5. what earlier calls left unmeasured: the base offloaded block by block (issue 19).
# Measured before (2026-11-30, H200, bench/gpu_figures.json): bf16 0.550 s/step, fp8 weight-only 0.659, nf4; an
# image 4.93 s eager, 3.80 s compiled; scoring's share 0.017.
set -uo pipefail
out=${OUT:-/tmp/gpu_run}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:src:bench PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, diffusers, peft, torchao; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'torchao', torchao.__version__)" | tee -a "$out/gpu.txt"
timeout 230 python3 bench/gpu_train_step.py --bases bf16,fp8c,bf16+compile,fp8c+compile --resolutions 1024 \
    --checkpointing off --steps 8 --warmup 3 2>&1 | tee "$out/train_step.log"
timeout 40 python3 bench/gpu_attention.py 2>&1 | tee "$out/attention.log"
timeout 90 python3 bench/gpu_generate.py --images 2 2>&1 | tee "$out/generate.log"
timeout 150 python3 bench/gpu_sweep.py --steps 5 --rounds 1 2>&1 | tee "$out/sweep.log"
timeout 60 python3 bench/gpu_train_step.py --bases bf16+offload --resolutions 1024 --checkpointing on --steps 4 \
    --warmup 1 2>&1 | tee "$out/train_step_offload.log"
