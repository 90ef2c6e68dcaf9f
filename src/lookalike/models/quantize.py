"""The frozen base transformer stored quantised while a LoRA trains on top of it in full precision.

Both kinds go through diffusers' own quantization configs, applied as the weights load, and peft wraps the
quantised layers with its LoRA layers: nf4 through bitsandbytes (4-bit NormalFloat, CUDA only), int8 and fp8
through torchao (weight-only: weights stored in 8 bits, dequantised for each matmul, on any device).
"""

from __future__ import annotations

from lookalike.errors import LookalikeError

INSTALL = "pip install 'lookalike[quantize]'"


def check_quantization(kind: str, setting: str = "train.base_quantization") -> None:
    """Refuse, before anything loads, a quantization this machine cannot run, saying what would."""
    import importlib.util

    import torch

    if kind == "none":
        return
    if kind == "nf4":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise LookalikeError(f"{setting} = 'nf4' needs bitsandbytes: {INSTALL}")
        if not torch.cuda.is_available():
            raise LookalikeError(f"{setting} = 'nf4' needs a CUDA GPU (bitsandbytes quantises on the GPU); "
                                 "on this machine use 'int8' or 'fp8' (torchao) or 'none'")
    elif importlib.util.find_spec("torchao") is None:
        raise LookalikeError(f"{setting} = {kind!r} needs torchao: {INSTALL}")


def quantization_config(kind: str, compute_dtype):
    """diffusers' quantization config for `kind` (nf4, int8, fp8), or None for 'none'."""
    if kind == "none":
        return None
    if kind == "nf4":
        from diffusers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    from diffusers import TorchAoConfig
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    return TorchAoConfig({"int8": Int8WeightOnlyConfig, "fp8": Float8WeightOnlyConfig}[kind]())
