"""train.tread_ratio: TREAD token routing (Krause et al., 2025): while training, a random share of the image
tokens skips a span of the denoiser's blocks and joins the others again after it, so those blocks compute on fewer
tokens; the loss is still taken over every token. Steps get cheaper, at some cost in what the LoRA learns, which
the identity-in-the-loop scores show (bench/tread.py). Images are always drawn with every token through every block.

Built for the families whose blocks keep image and text tokens apart (FLUX.1, SD3, Qwen-Image: Family.route_layout).
The route is a pair of hooks on the family's blocks, not a copy of its forward: the first block of the span keeps
the chosen tokens and the rotary embedding's rows for them, the blocks inside it get those rows too, and the last one
puts the routed tokens back where they were. The tokens are drawn from the run's
generator (whose state every checkpoint keeps), once per forward, so a resumed run routes as the uninterrupted one.
"""

from __future__ import annotations

import torch

from lookalike.errors import LookalikeError


class TokenRoute:
    def __init__(self, layout, ratio: float, first: int, last: int):
        """Route `ratio` of the image tokens around blocks first..last (indices into the layout's blocks; a
        negative one counts from the end, as in Python)."""
        count = len(layout.blocks)
        within = -count <= first < count and -count <= last < count
        if not within or first % count > last % count:
            raise LookalikeError(f"train.tread_blocks = [{first}, {last}]: this base's denoiser has {count} blocks "
                                 f"(0 to {count - 1}); name a first block at or before the last, both within them")
        self.layout, self.ratio = layout, ratio
        self.first, self.last = first % count, last % count
        self.generator: torch.Generator | None = None
        self.kept: torch.Tensor | None = None  # the image tokens this forward's route keeps, in order
        self.skipped: torch.Tensor | None = None  # every image token as it entered the span
        blocks = layout.blocks[self.first:self.last + 1]
        self.handles = [blocks[0].register_forward_pre_hook(self._enter, with_kwargs=True)]
        self.handles += [block.register_forward_pre_hook(self._inside, with_kwargs=True) for block in blocks[1:]]
        self.handles.append(blocks[-1].register_forward_hook(self._leave, with_kwargs=True))

    def next_forward(self, generator: torch.Generator) -> None:
        """The next forward draws its own tokens from `generator` (a backward pass's recomputation reuses them)."""
        self.generator, self.kept = generator, None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _enter(self, block, args, kwargs):
        if not block.training:  # drawing an image: every token through every block
            return None
        image = _argument(args, kwargs, self.layout.image)
        if self.kept is None:
            tokens = image.shape[1]
            keep = max(1, tokens - round(tokens * self.ratio))
            self.kept = torch.randperm(tokens, generator=self.generator)[:keep].sort().values.to(image.device)
        self.skipped = image
        args, kwargs = _replaced(args, kwargs, self.layout.image, image.index_select(1, self.kept))
        return self._inside(block, args, kwargs) or (args, kwargs)

    def _inside(self, block, args, kwargs):
        if not block.training or self.layout.rotary is None:
            return None
        rotary = _argument(args, kwargs, self.layout.rotary)
        if self.layout.rotary_rows == "image of a pair":
            rotary = (rotary[0].index_select(0, self.kept), rotary[1])
        else:
            text_tokens = _argument(args, kwargs, self.layout.text).shape[1]
            rows = torch.cat([torch.arange(text_tokens, device=self.kept.device), text_tokens + self.kept])
            rotary = tuple(part.index_select(0, rows) for part in rotary)
        return _replaced(args, kwargs, self.layout.rotary, rotary)

    def _leave(self, block, args, kwargs, output):
        if not block.training:
            return None
        text, routed = output
        return text, self.skipped.index_copy(1, self.kept, routed)


def _argument(args, kwargs, where: tuple[str, int]):
    name, position = where
    return kwargs[name] if name in kwargs else args[position]


def _replaced(args, kwargs, where: tuple[str, int], value):
    name, position = where
    if name in kwargs:
        return args, {**kwargs, name: value}
    return (*args[:position], value, *args[position + 1:]), kwargs
