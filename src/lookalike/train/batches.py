"""Which examples each step trains on, drawn from the run's generator (the state goes into every checkpoint, so a
resumed run draws what an uninterrupted one would)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class BatchOrder:
    """Examples of one size: a new permutation every epoch, batches taken from it in turn (a batch may span two
    epochs)."""

    size: int
    batch_size: int
    order: list[int] = field(default_factory=list)
    position: int = 0
    epoch: int = 0

    def next(self, generator: torch.Generator) -> list[int]:
        picked: list[int] = []
        while len(picked) < self.batch_size:
            if self.position >= len(self.order):
                self.order = torch.randperm(self.size, generator=generator).tolist()
                self.position, self.epoch = 0, self.epoch + 1
            take = min(self.batch_size - len(picked), len(self.order) - self.position)
            picked += self.order[self.position:self.position + take]
            self.position += take
        return picked

    def state_dict(self) -> dict[str, Any]:
        return {"order": torch.tensor(self.order, dtype=torch.long), "position": self.position, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order, self.position, self.epoch = state["order"].tolist(), state["position"], state["epoch"]


@dataclass
class BucketBatches:
    """Examples of several sizes (aspect-ratio buckets): every epoch, each bucket's examples in a new order are cut
    into batches, which then come in a new order. A batch never mixes sizes, and every example is in one batch of
    each epoch; a bucket's last batch, if short, is filled up with the first examples of that bucket's order."""

    buckets: list[list[int]]  # the indices of each size's examples
    batch_size: int
    batches: list[list[int]] = field(default_factory=list)
    position: int = 0
    epoch: int = 0

    def next(self, generator: torch.Generator) -> list[int]:
        if self.position >= len(self.batches):
            self.batches = []
            for members in self.buckets:
                order = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
                for start in range(0, len(order), self.batch_size):
                    batch = order[start:start + self.batch_size]
                    while len(batch) < self.batch_size:  # a short last batch (or a bucket smaller than a batch)
                        batch += order[:self.batch_size - len(batch)]
                    self.batches.append(batch)
            self.batches = [self.batches[i] for i in torch.randperm(len(self.batches), generator=generator).tolist()]
            self.position, self.epoch = 0, self.epoch + 1
        self.position += 1
        return self.batches[self.position - 1]

    def state_dict(self) -> dict[str, Any]:
        return {"batches": torch.tensor(self.batches, dtype=torch.long).reshape(-1, self.batch_size),
                "position": self.position, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches, self.position, self.epoch = state["batches"].tolist(), state["position"], state["epoch"]


def batch_order(sizes: list[tuple[int, int]], batch_size: int) -> BatchOrder | BucketBatches:
    """The order for examples of these sizes: one size, the plain order; several, batches per bucket."""
    buckets: dict[tuple[int, int], list[int]] = {}
    for index, size in enumerate(sizes):
        buckets.setdefault(size, []).append(index)
    if len(buckets) == 1:
        return BatchOrder(len(sizes), batch_size)
    return BucketBatches([buckets[size] for size in sorted(buckets)], batch_size)
