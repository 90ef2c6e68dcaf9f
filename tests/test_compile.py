"""Regional compilation (train.compile, generate.compile): the repeated blocks really are compiled, and the
results are those of eager mode."""

import io
import re

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from safetensors.torch import load_file

from lookalike.config import load_config
from lookalike.generate import generate
from lookalike.train.compilation import COMPILE_PAYS_FROM_STEPS, compiles
from lookalike.train.trainer import train

pytestmark = pytest.mark.slow  # trains, serves or starts lookalike processes: `make test` only


@pytest.fixture
def compiled_graphs():
    """A function counting the graphs torch.compile has made since the test began."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield lambda: torch._dynamo.utils.counters["stats"]["unique_graphs"]
    torch._dynamo.reset()


def test_compiled_training_ends_with_the_eager_lora(tiny_config, compiled_graphs):
    settings = {"max_train_steps": 3, "learning_rate": 1e-2, "gradient_checkpointing": True}
    eager = load_file(train(load_config(tiny_config(train=settings)), "eager"))  # compile = auto: not on the CPU
    assert compiled_graphs() == 0
    console = Console(file=io.StringIO(), width=200)
    compiled = load_file(train(load_config(tiny_config(train=dict(settings, compile=True))), "compiled",
                               console=console))
    assert compiled_graphs() >= 2, "one graph per kind of block (double, single) at least"
    shown = console.file.getvalue()
    assert "repeated blocks compile at the first step" in shown
    progress = [line for line in shown.splitlines() if line.startswith("train compiled ")]
    assert progress and all(re.search(r"first step \d+\.\ds \(compiling\)", line) for line in progress), shown
    assert eager.keys() == compiled.keys()
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], atol=1e-5, rtol=1e-4)


def test_compiled_generation_draws_the_eager_image(tiny_config, tmp_path, compiled_graphs):
    def image(name: str, compile: bool):
        config = load_config(tiny_config(f"{name}.toml", **{"": {"workspace": str(tmp_path / name)}},
                                         generate={"compile": compile, "num_inference_steps": 3}))
        return np.asarray(Image.open(generate(config) / "p00_s0_g5.png"), dtype=np.int16)

    eager = image("eager", False)
    compiled = image("compiled", True)
    assert compiled_graphs() >= 2
    assert np.abs(compiled - eager).max() <= 2, "the same image, up to rounding"


@pytest.mark.parametrize("settings, device, expected", [
    ({}, "cuda", True),  # a GPU run long enough to pay for its compile
    ({}, "cpu", False),
    ({"max_train_steps": COMPILE_PAYS_FROM_STEPS - 1}, "cuda", False),
    ({"base_quantization": "int8"}, "cuda", False),  # settings torch.compile cannot train: left off, not refused
    ({"offload": True}, "cuda", False),
    ({"adapter": "lokr"}, "cuda", False),
    ({"compile": True}, "cpu", True),  # as set
    ({"compile": False}, "cuda", False),
])
def test_compile_auto_compiles_long_gpu_runs_it_can_train(tiny_config, settings, device, expected):
    train_settings = {"max_train_steps": COMPILE_PAYS_FROM_STEPS, **settings}
    assert compiles(load_config(tiny_config(train=train_settings)).train, device) is expected
