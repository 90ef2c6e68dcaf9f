"""Regional compilation (train.compile, generate.compile): the repeated blocks really are compiled, and the
results are those of eager mode."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lookalike.config import load_config
from lookalike.generate import generate
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
    eager = load_file(train(load_config(tiny_config(train=settings)), "eager"))
    assert compiled_graphs() == 0
    compiled = load_file(train(load_config(tiny_config(train=dict(settings, compile=True))), "compiled"))
    assert compiled_graphs() >= 2, "one graph per kind of block (double, single) at least"
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
