#!/usr/bin/env bash
# The trainer itself on a lent GPU, where the benches only time a bare step: `lookalike train` of tiny models on
# CUDA (bf16 autocast, as users train) with each setting only a GPU runs or that runs otherwise there (nf4, fp8,
# adamw8bit, compile, offload, checkpointing, LoKr, EMA, the text encoders), 20 steps with samples and a
# checkpoint each, then `lookalike generate` from one run. A fault like cuDNN's attention backward (found by
# bench/gpu_run.sh on an H200, every bf16 run failing at its first step) shows here as a failed run, named.
# Prepare here with bench/gpu_wheels.sh, then call the device tool with command "bash bench/gpu_cli.sh", carry
# [".whl"], timeout_s 400 (not yet run on a GPU: 4.4 minutes on a 2-core CPU, mostly starting processes). On the CPU
# it runs too (`PATH=.venv/bin:$PATH bash bench/gpu_cli.sh`), where nf4 and adamw8bit are refused by name. Logs under
# $OUT; the last lines say each run's result, and failed=<how many>.
set -uo pipefail
out=${OUT:-/tmp/gpu_cli}
mkdir -p "$out"
export PYTHONPATH=src
if ! python3 -c "import diffusers" 2>/dev/null; then  # the lent machine: the carried wheels
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:src
fi
export PYTHONUNBUFFERED=1
work=$(mktemp -d)
python3 -m lookalike.data.sample_subject "$work/photos" >"$out/photos.log" 2>&1 || { cat "$out/photos.log"; exit 1; }
study() {  # a study of 20 steps on base $1
    cat >"$work/$1.toml" <<TOML
name = "gpu-cli"
workspace = "work"
[model]
base = "$1"
[subject]
token = "hpr"
class_word = "woman"
images = "photos"
[data]
resolution = 64
crop = "center"                 # no face detector needed: the lent machine has none of its weights
[train]
max_train_steps = 20
checkpoint_every = 10
sample_every = 10
score_samples = false
learning_rate = 3e-3
[generate]
prompts = ["a photo of {token}"]
seeds = [0]
guidance_scales = [5.0]
TOML
    echo "$work/$1.toml"
}
failed=0
results=()
train() {  # train() NAME BASE [SETTING ...]: one run, its log in $OUT/NAME.log
    local name=$1 base=$2
    shift 2
    local sets=()
    for setting in "$@"; do sets+=(--set "$setting"); done
    if timeout 120 python3 -m lookalike train "$(study "$base")" --run "$name" "${sets[@]}" >"$out/$name.log" 2>&1; then
        results+=("$name: ok")
    else
        failed=$((failed + 1))
        results+=("$name: FAILED: $(grep -v '^\s*$' "$out/$name.log" | tail -1)")
    fi
}
train bf16 tiny
train nf4 tiny 'train.base_quantization="nf4"'
train fp8 tiny 'train.base_quantization="fp8"'
train adamw8bit tiny 'train.optimizer="adamw8bit"'
train compile tiny train.compile=true
train offload tiny train.offload=true
train checkpointing tiny train.gradient_checkpointing=true
train lokr tiny 'train.adapter="lokr"'
train ema tiny train.ema_decay=0.99
train text-encoder tiny train.train_text_encoder=true
train sd15 tiny-sd15
train sdxl tiny-sdxl
train z-image tiny-z-image
if timeout 60 python3 -m lookalike generate "$work/tiny.toml" --run bf16 >"$out/generate.log" 2>&1; then
    results+=("generate: ok")
else
    failed=$((failed + 1))
    results+=("generate: FAILED: $(grep -v '^\s*$' "$out/generate.log" | tail -1)")
fi
printf '%s\n' "${results[@]}" | tee "$out/results.txt"
echo "failed=$failed"
