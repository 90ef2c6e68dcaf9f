"""lookalike: teach a diffusion model (FLUX.1, FLUX.2 [klein], Z-Image, Qwen-Image) one person's face
with LoRA, and prove how well it learned."""

__version__ = "0.1.0"
