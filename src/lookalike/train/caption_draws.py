"""What caption a subject example trains with at a step: one of its orders of tags (train.tag_shuffle), then
perhaps the empty caption (train.caption_dropout). Every draw comes from the run's generator, so a resumed run draws
what an uninterrupted one would; text embeddings are cached, so the orders are fixed before training and each is
encoded once."""

from __future__ import annotations

import math

import torch


def tag_orders(caption: str, count: int, seed: int) -> list[str]:
    """Up to `count` distinct orders of the caption's comma-separated tags, the first tag (the trigger word's)
    kept first, drawn from `seed`; the caption itself when there is nothing to shuffle or count is 0."""
    first, *rest = (tag.strip() for tag in caption.split(","))
    if count == 0 or len(rest) < 2:
        return [caption]
    generator = torch.Generator().manual_seed(seed)
    orders: dict[str, None] = {}
    while len(orders) < min(count, math.factorial(len(rest))):
        order = torch.randperm(len(rest), generator=generator).tolist()
        orders.setdefault(", ".join([first, *(rest[i] for i in order)]), None)
    return list(orders)


def drop_captions(captions: list[str], probability: float, generator: torch.Generator) -> list[str]:
    """Each caption replaced by the empty one with `probability` (train.caption_dropout), drawn from the run's
    generator (nothing is drawn at 0, so runs without dropout draw as before)."""
    if not probability:
        return captions
    dropped = (torch.rand(len(captions), generator=generator) < probability).tolist()
    return ["" if drop else caption for caption, drop in zip(captions, dropped)]


class CaptionDraws:
    """The captions of a run's subject examples, as trained: each one's tag orders and the dropout rate."""

    def __init__(self, captions: list[str], tag_shuffle: int, dropout: float, seed: int):
        self.orders = {caption: tag_orders(caption, tag_shuffle, seed) for caption in dict.fromkeys(captions)}
        self.shuffle = tag_shuffle > 0
        self.dropout = dropout

    def texts(self) -> list[str]:
        """Every caption an example may train with, to encode before the loop."""
        return [order for orders in self.orders.values() for order in orders] + ([""] if self.dropout else [])

    def draw(self, captions: list[str], generator: torch.Generator) -> list[str]:
        """The captions these examples train with at this step (nothing is drawn for what is off)."""
        if self.shuffle:
            captions = [orders[int(torch.randint(len(orders), (), generator=generator))]
                        for orders in (self.orders[caption] for caption in captions)]
        return drop_captions(captions, self.dropout, generator)
