"""Which attention kernels training runs on: on a GPU, the fastest of PyTorch's exact ones at the run's shape,
measured when the run starts.

Only exact attention is a candidate (approximate kernels such as SageAttention's would change what the tests compare
with the stock pipelines), and of PyTorch's own only: flash-attn 3 has no wheels on the package registry, and
flash-attn 4's CUDA libraries (nvidia-cutlass-dsl-libs, 92 MB) reach diffusers 0.42.1 only from the hub
(`flash_4_hub`). bench/gpu_attention.py times every exact kernel a machine has, those libraries included.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

TRAINING_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# A kernel is exact here when its error against float32 math attention is at most this many times the error of
# math attention in the run's own dtype (the rounding every kernel in that dtype has).
EXACT_WITHIN = 4.0


def training_attention(order: list[SDPBackend] = TRAINING_ATTENTION):
    """A context in which scaled_dot_product_attention tries these backends in this order, and never cuDNN's.

    cuDNN's fused attention backward failed on an H200 (torch 2.11, CUDA 13, cuDNN 9) at the first step of every
    bf16 FLUX.1-dev LoRA run: "mha_graph.execute(...).is_good()", surfacing as CUBLAS_STATUS_EXECUTION_FAILED
    without CUDA_LAUNCH_BLOCKING (bench/gpu_run.sh). PyTorch knows the fault (pytorch/pytorch#190321, "has
    workaround": this one), and others have seen the same backward give NaN gradients. Flash and memory-efficient
    attention ran those steps. A failed CUDA kernel can leave the process's CUDA context unusable, so cuDNN is not
    even tried. Generation keeps cuDNN's kernels: its forward ran."""
    return sdpa_kernel(order, set_priority=True)


def fastest_exact(heads: int, head_dim: int, tokens: int, device: torch.device, dtype: torch.dtype,
                  candidates: list[SDPBackend] = TRAINING_ATTENTION[:-1], repeats: int = 5
                  ) -> tuple[list[SDPBackend], dict[str, str]]:
    """The training order of the candidates that run and are exact at this shape, fastest (forward and backward of
    one batch of random queries, keys and values) first, math attention last; and what was found of each (its
    milliseconds, or why it was left out)."""
    generator = torch.Generator(device).manual_seed(0)  # its own: the run's random numbers are not touched
    q, k, v = (torch.randn(1, heads, tokens, head_dim, device=device, dtype=dtype, generator=generator)
               for _ in range(3))
    with sdpa_kernel([SDPBackend.MATH]):
        reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        rounding = (F.scaled_dot_product_attention(q, k, v).float() - reference).abs().max().item()
    timings, found = {}, {}
    for backend in candidates:
        try:
            error = (attend(backend, q, k, v).float() - reference).abs().max().item()
            if error > EXACT_WITHIN * rounding + 1e-6:
                found[backend.name] = f"not exact ({error:.2e} off, math in {dtype} {rounding:.2e})"
                continue
            timings[backend] = _milliseconds(backend, q, k, v, repeats, device)
            found[backend.name] = f"{timings[backend]:.2f} ms"
        except RuntimeError as failure:  # this kernel cannot run this shape, dtype or device
            found[backend.name] = f"cannot run here ({str(failure).splitlines()[0][:80]})"
    return sorted(timings, key=timings.get) + [SDPBackend.MATH], found


def attend(backend: SDPBackend, q, k, v):
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v)


def _milliseconds(backend: SDPBackend, q, k, v, repeats: int, device: torch.device) -> float:
    leaves = [tensor.detach().requires_grad_() for tensor in (q, k, v)]
    times = []
    for _ in range(repeats + 1):  # the first one warms up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        attend(backend, *leaves).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return sorted(times[1:])[len(times[1:]) // 2] * 1000
