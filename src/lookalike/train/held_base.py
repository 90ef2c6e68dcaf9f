"""The frozen denoiser a warm sweep worker keeps between runs, so that a sweep loads its base once.

A run takes the base, adds its LoRA, trains, and gives the base back. What the run added (the LoRA layers,
accelerate's mixed-precision forward, gradient checkpointing, compiled blocks) is taken off again, and the base is
kept only if it is then the model it was when loaded: the same modules, the same parameter and buffer storages in
the same dtypes and devices, no hooks or instance-level forwards added. Anything else, and the next run loads it
afresh, as a run in a process of its own would.
"""

from __future__ import annotations

import gc
from pathlib import Path


def base_key(folder: Path, component: str, dtype, quantization: str) -> tuple:
    """What a loaded denoiser is a copy of: its folder's files (name, size, modification time), the dtype and the
    quantisation it was loaded with. A base folder rebuilt or replaced between runs is loaded again."""
    files = sorted((str(path.relative_to(folder)), path.stat().st_size, path.stat().st_mtime_ns)
                   for path in (folder / component).rglob("*") if path.is_file())
    return str(folder.resolve()), component, str(dtype), quantization, tuple(files)


def _fingerprint(model) -> tuple:
    modules = tuple((name, type(module).__name__, "forward" in vars(module), "_hf_hook" in vars(module),
                     len(module._forward_hooks), len(module._forward_pre_hooks), len(module._backward_hooks),
                     module._compiled_call_impl is not None, bool(getattr(module, "gradient_checkpointing", False)))
                    for name, module in model.named_modules())
    tensors = tuple((name, tensor.data_ptr(), tensor.dtype, tensor.device, tuple(tensor.shape))
                    for name, tensor in [*model.named_parameters(), *model.named_buffers()])
    return modules, tensors


class HeldBase:
    """At most one loaded denoiser, lent to one run at a time."""

    def __init__(self):
        self.key: tuple | None = None
        self.model = None
        self.as_loaded: tuple | None = None  # the fingerprint of the model as it was loaded
        self.flags: dict[str, bool] = {}  # each module's training mode, each parameter's requires_grad

    def holds(self, key: tuple) -> bool:
        return self.model is not None and self.key == key

    def take(self, key: tuple, load):
        """The held model if it is `key`'s, else `load()`'s (the held one dropped first: one base in memory)."""
        if self.holds(key):
            model, self.model = self.model, None
            return model
        self.drop()
        model = load()
        self.key, self.as_loaded = key, _fingerprint(model)
        self.flags = {**{f"module:{name}": m.training for name, m in model.named_modules()},
                      **{f"parameter:{name}": p.requires_grad for name, p in model.named_parameters()}}
        return model

    def give_back(self, model) -> None:
        """Take the run's additions off `model` and keep it for the next run, if it is then as it was loaded."""
        _strip(model)
        for name, module in model.named_modules():
            module.train(self.flags.get(f"module:{name}", module.training))
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(self.flags.get(f"parameter:{name}", parameter.requires_grad))
        if _fingerprint(model) != self.as_loaded:
            self.drop()
            return
        self.model = model

    def drop(self) -> None:
        self.model = self.key = self.as_loaded = None
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _strip(model) -> None:
    """Undo what a run did to its denoiser, each by its own library's undo where it has one."""
    if hasattr(model, "peft_config"):
        model.unload_lora()  # diffusers: every LoRA layer replaced by the layer it wrapped
    vars(model).pop("_hf_peft_config_loaded", None)
    # accelerate.prepare under mixed precision wraps the model's forward in autocast, as an instance attribute
    # (its _original_forward kept beside it): removing both leaves the class's forward.
    vars(model).pop("forward", None)
    vars(model).pop("_original_forward", None)
    if getattr(model, "is_gradient_checkpointing", False):
        model.disable_gradient_checkpointing()
    for module in model.modules():
        module._compiled_call_impl = None  # train.compile's regional compilation (nn.Module.compile)
