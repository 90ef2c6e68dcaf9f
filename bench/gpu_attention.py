"""GPU benchmark: the exact attention kernels this machine has, at FLUX.1-dev's attention shape (1024 px: 4,096
image + 512 text tokens, 24 heads of 128, bf16), for training (forward and backward) and generation (forward).

Kernels: PyTorch's scaled_dot_product_attention backends (flash, memory-efficient, cuDNN; math as the reference),
and diffusers' attention backends whose libraries are installed here (flash-attn 2's `flash`, flash-attn 3's
`_flash_3`). Approximate kernels (SageAttention's quantised ones) are left out: only exact attention may replace
what the tests compare with the stock pipelines. Each row: milliseconds (median of `--repeats` after warm-up) and
the largest difference from float32 math attention. A kernel that fails (the cuDNN backward fault the trainer
avoids, train/attention.py) is reported as failed, and the others go on.

    python bench/gpu_attention.py [--tokens 4608] [--repeats 20]
    python bench/gpu_attention.py --tiny      # small shapes on the CPU: checks the script

Last line: fastest_training=<kernel> fastest_generation=<kernel>.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def sdpa(backend):
    def attend(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v)
    return attend


def diffusers_backend(name: str):
    """One of diffusers' attention backends, called as its transformers call it ([batch, tokens, heads, dim])."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    def attend(q, k, v):
        out = dispatch_attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), backend=name)
        return out.transpose(1, 2)
    return attend


def kernels(device: torch.device) -> dict:
    found = {"sdpa flash": sdpa(SDPBackend.FLASH_ATTENTION), "sdpa efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
             "sdpa math": sdpa(SDPBackend.MATH)}
    if device.type == "cuda":
        found["sdpa cudnn"] = sdpa(SDPBackend.CUDNN_ATTENTION)
        if importlib.util.find_spec("flash_attn") is not None:
            found["flash-attn 2"] = diffusers_backend("flash")
        if importlib.util.find_spec("flash_attn_interface") is not None:
            found["flash-attn 3"] = diffusers_backend("_flash_3")
    return found


def timed(work, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats + 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        work()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times[3:]) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096 + 512)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tiny", action="store_true", help="small shapes on the CPU (checks the script)")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    heads, dim, tokens = (2, 16, 64) if args.tiny else (24, 128, args.tokens)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    generator = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(1, heads, tokens, dim, device=device, dtype=dtype, generator=generator)
               for _ in range(3))
    with sdpa_kernel([SDPBackend.MATH]):
        reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    print(f"device: {'CPU' if args.tiny else torch.cuda.get_device_name()}; {heads} heads x {dim}, {tokens} tokens, "
          f"{dtype}; torch {torch.__version__}")
    print(f"{'kernel':16} {'train ms':>9} {'generate ms':>12} {'max error':>10}")
    rows = {}
    for name, attend in kernels(device).items():
        try:
            out = attend(q, k, v)
            error = (out.float() - reference).abs().max().item()
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]

            def train_step():
                attend(*leaves).sum().backward()
            training = timed(train_step, args.repeats, device)
            with torch.no_grad():
                generating = timed(lambda: attend(q, k, v), args.repeats, device)
        except Exception as failure:  # a kernel this GPU, shape or build cannot run, or a known fault
            print(f"{name:16} failed: {type(failure).__name__}: {str(failure).splitlines()[0][:90]}")
            continue
        rows[name] = (training, generating)
        print(f"{name:16} {training:9.3f} {generating:12.3f} {error:10.2e}", flush=True)
    exact = {name: times for name, times in rows.items() if name != "sdpa math"} or rows
    print(f"fastest_training={min(exact, key=lambda n: exact[n][0]).replace(' ', '_')} "
          f"fastest_generation={min(exact, key=lambda n: exact[n][1]).replace(' ', '_')}")


if __name__ == "__main__":
    main()
