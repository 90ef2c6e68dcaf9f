"""Which attention kernels training runs on."""

from __future__ import annotations

from torch.nn.attention import SDPBackend, sdpa_kernel

TRAINING_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def training_attention():
    """A context in which scaled_dot_product_attention may use every backend but cuDNN's.

    cuDNN's fused attention backward failed on an H200 (torch 2.11, CUDA 13, cuDNN 9) at the first step of every
    bf16 FLUX.1-dev LoRA run: "mha_graph.execute(...).is_good()", surfacing as CUBLAS_STATUS_EXECUTION_FAILED
    without CUDA_LAUNCH_BLOCKING (bench/gpu_run.sh). PyTorch knows the fault (pytorch/pytorch#190321, "has
    workaround": this one), and others have seen the same backward give NaN gradients. Flash and memory-efficient
    attention ran those steps. Generation keeps cuDNN's kernels: its forward ran."""
    return sdpa_kernel(TRAINING_ATTENTION)
