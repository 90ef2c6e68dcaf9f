#!/usr/bin/env bash
# The packages bench/gpu_train_step.py, bench/gpu_generate.py and bench/score_cost.py need that the lent GPU
# machines lack (their Python 3.12 has torch, peft, accelerate, transformers, typer and rich), downloaded here as
# wheels into .whl/ (git-ignored) to travel with `carry`. On the GPU machine:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qsx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
platforms=()
for n in 2_28 2_27 2_24 2_17; do platforms+=(--platform "manylinux_${n}_x86_64"); done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 -d .whl \
    diffusers==0.42.1 torchao==0.18.0 bitsandbytes==0.50.2 pydantic==2.14.3 pydantic-core==2.50.4 \
    typing-inspection==0.4.5 annotated-types==0.8.0 importlib-metadata facenet-pytorch==2.6.0
du -sh .whl
# bench/score_cost.py's reference photos are the repository's own (tests/data/faces/obama).
