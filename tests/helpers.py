"""Helpers several test modules share: runs that check exact resume, LoRAs and denoisers to compare with,
the stock pipelines' images, file digests, and the measured figures the memory tests hold estimates to."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from lookalike.config import load_config
from lookalike.generate import generate
from lookalike.models.base import base_info, load_component, resolve_base
from lookalike.models.families import folder_family
from lookalike.models.families.flux1 import ensure_tiny_model
from lookalike.models.lora import add_lora, lora_state_dict, save_lora
from lookalike.train.trainer import train


def _train_process(config_path, run, *extra):
    return subprocess.Popen([sys.executable, "-m", "lookalike", "train", str(config_path), "--run", run, *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def assert_a_killed_run_resumes_exactly(path, steps: int, killed_after: str):
    """A run killed (SIGKILL, as a process) once its checkpoint `killed_after` exists, then resumed, ends with
    the weights of an uninterrupted run, every step logged once, no more checkpoints kept than asked. The
    uninterrupted run and the resume train in this process: the same code as `lookalike train [--resume]`."""
    config = load_config(path)
    runs = config.workspace / "runs"
    train(config, "straight")

    killed = _train_process(path, "killed")
    checkpoint = runs / "killed" / "checkpoints" / killed_after
    deadline = time.time() + 240
    while not checkpoint.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert checkpoint.exists(), "the run never reached its second checkpoint"
    assert not (runs / "killed" / "lora.safetensors").exists(), "the run finished before it could be killed"

    train(config, "killed", resume=True)

    a = load_file(runs / "straight" / "lora.safetensors")
    b = load_file(runs / "killed" / "lora.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    logged = [json.loads(line)["step"] for line in (runs / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, steps + 1)), "metrics.jsonl must hold every step exactly once after a resume"
    assert len(list((runs / "killed" / "checkpoints").glob("step-*"))) <= config.train.checkpoints_keep


# How a user asks the stock pipeline for guidance 4: Qwen-Image's true CFG needs a negative prompt; Qwen-Image 2.1
# draws without guidance.
STOCK_GUIDANCE = {"qwen-image": {"true_cfg_scale": 4.0, "negative_prompt": " "}, "qwen-image21": {}}


def stock_arguments(family) -> dict:
    """How a user asks the family's stock pipeline for an image at guidance 4 from the tiny text encoders (32
    tokens, where its __call__ takes a length); everything else at the pipeline's own defaults."""
    takes_length = "max_sequence_length" in inspect.signature(family.pipeline_class().__call__).parameters
    return dict(STOCK_GUIDANCE.get(family.name, {"guidance_scale": 4.0}),
                **({"max_sequence_length": 32} if takes_length else {}))


def denoiser_with_a_lora(folder, component: str):
    """The base's denoiser with a seeded rank-4 LoRA of the diffusers preset that changes something (peft starts
    its B matrices at zero)."""
    denoiser = load_component(folder, component)
    torch.manual_seed(0)
    add_lora(denoiser, 4, 4.0, "diffusers")
    with torch.no_grad():
        for name, parameter in denoiser.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    return denoiser


def train_sampled_run(tiny_config, base: str, model: dict | None = None, **settings):
    """A 10-step run of `base` (with [model] `model` and [train] `settings`) with samples at steps 5 and 10 (checked),
    and its first image drawn by lookalike at guidance 4 (where the base takes guidance): (the LoRA file, that image's
    pixels)."""
    config = load_config(tiny_config(model={"base": base, **(model or {})}, data={"crop": "center"},
                                     train={"max_train_steps": 10, "learning_rate": 1e-2, "sample_every": 5,
                                            "sample_steps": 2, **settings},
                                     generate={"num_inference_steps": 3, "guidance_scales": [4.0]}))
    lora = train(config, "r")
    samples = sorted(p.name for p in (lora.parent / "samples").glob("*.png"))
    assert samples == ["step-000005_p0.png", "step-000010_p0.png"]
    stem = "p00_s0_g4" if base_info(base).guidance else "p00_s0"
    return lora, np.asarray(Image.open(generate(config, run="r") / f"{stem}.png")).astype(int)


def stock_image(base: str, lora_file=None, through_denoiser: bool = False, **arguments) -> np.ndarray:
    """The image the stock pipeline of `base` draws for the first prompt and seed at 64 px in 3 steps, with the
    LoRA file loaded by load_lora_weights (or none); `through_denoiser`: by its denoiser's load_lora_adapter
    (diffusers' loader for a LoKr, which most pipelines' load_lora_weights do not pass on)."""
    family = folder_family(resolve_base(base))
    pipe = family.pipeline_class().from_pretrained(resolve_base(base))
    if lora_file is not None and through_denoiser:
        getattr(pipe, family.denoiser).load_lora_adapter(str(lora_file.parent), weight_name=lora_file.name,
                                                         prefix=family.denoiser)
    elif lora_file is not None:
        pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt="a photo of sks", height=64, width=64, num_inference_steps=3,
                 generator=torch.Generator("cpu").manual_seed(0), **arguments).images[0]
    return np.asarray(image.convert("RGB")).astype(int)  # Qwen-Image 2.1 draws RGBA; lookalike keeps the colour


def random_lora(path, rank, alpha, target, seed, base="tiny", std=0.05):
    """A LoRA of the tiny transformer with random A and B (a trained LoRA's B is not zero either)."""
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(ensure_tiny_model(), subfolder="transformer")
    add_lora(transformer, rank, alpha, target)
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in transformer.named_parameters():
        if "lora_" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * std
    save_lora(path, lora_state_dict(transformer), transformer.peft_config["default"],
              {"base_model": base, "rank": rank, "alpha": alpha})
    return path


def fused_weights(lora=None):
    """The transformer's linear weights after diffusers loads and fuses the LoRA file (none: the base)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(ensure_tiny_model())
    if lora is not None:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    return {k: v.clone() for k, v in pipe.transformer.state_dict().items() if k.endswith(".weight")}


MEASURING = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")


# What a training step adds to the resident size at its peak (VmHWM, reset before it), `step` run twice: in a
# process run with MEASURING, whose allocations of 64 KB and more are mapped and unmapped one by one (glibc
# otherwise keeps freed memory resident), that is the step's own peak.
PEAK_OF_A_STEP = """
import ctypes, re
def status(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
def peak_of(step):
    step()  # the optimizer's state and the kernels' caches exist from here on
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM
    before = status("VmRSS")
    step()
    return status("VmHWM") - before
"""


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
