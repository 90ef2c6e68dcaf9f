"""lookalike: teach FLUX.1-dev one person's face with LoRA, and prove how well it learned."""

__version__ = "0.1.0"
