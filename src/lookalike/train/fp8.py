"""train.fp8_compute: the frozen base's linear layers multiply in float8 (torchao's float8 training), the LoRA in
bf16 or float32 beside them, as diffusers' scripts train with --do_fp8_training.

The weights stay in bf16: each matmul casts its input, weight and (backward) output gradient to float8 with one
scale per tensor, computed as it runs. That is faster on GPUs with float8 tensor cores and saves no memory (unlike
train.base_quantization = 'fp8', which stores the weights in float8 and computes in bf16).
"""

from __future__ import annotations

import importlib.util

FLOAT8_CAPABILITY = (8, 9)  # Ada Lovelace, Hopper and newer: the GPUs with float8 tensor cores


def fp8_problem(precision: str, capability: tuple[int, int] | None) -> str | None:
    """Why this run cannot compute in float8, or None. `capability`: the CUDA GPU's compute capability; None on the
    CPU, whose float8 matmul (PyTorch's own) runs everywhere, slowly, which the tests use."""
    if importlib.util.find_spec("torchao") is None:
        return "train.fp8_compute = true needs torchao: pip install torchao"
    if precision != "bf16":
        return (f"train.fp8_compute = true casts the base's bf16 weights to float8 for each matmul, and this run's "
                f"precision is {precision!r}: set train.mixed_precision = 'bf16'")
    if capability is not None and capability < FLOAT8_CAPABILITY:
        return (f"train.fp8_compute = true needs a GPU with float8 tensor cores (compute capability 8.9 or newer: "
                f"Ada, Hopper, Blackwell); this GPU's is {capability[0]}.{capability[1]}: leave fp8_compute unset")
    return None


def computes_in_fp8(name: str, module) -> bool:
    """The layers diffusers' scripts convert (train_dreambooth_lora_flux2.py, module_filter_fn): every linear layer
    but the output projection, whose sides are multiples of 16 (float8 matmuls take no others)."""
    import torch

    return (isinstance(module, torch.nn.Linear) and name != "proj_out"
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def convert_to_fp8_compute(denoiser) -> int:
    """Make the denoiser's eligible linear layers compute in float8 (before its LoRA is added, as the scripts do:
    the LoRA wraps the float8 layer and computes in its own precision). Returns how many layers were converted."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    chosen = [name for name, module in denoiser.named_modules() if computes_in_fp8(name, module)]
    # pad_inner_dim: the scripts' setting; a matmul whose inner side is no multiple of 16 is padded, not refused.
    convert_to_float8_training(denoiser, module_filter_fn=lambda module, name: computes_in_fp8(name, module),
                               config=Float8LinearConfig(pad_inner_dim=True))
    return len(chosen)
