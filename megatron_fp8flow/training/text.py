"""Real text that ships with Python itself: the reference documentation of the language
(``pydoc_data.topics``, ~460 kB of English prose and grammar), as byte-level tokens (vocab 256)."""

from __future__ import annotations

from typing import Tuple

import torch


def corpus() -> torch.Tensor:
    """All topics, in a fixed order, as uint8 tokens."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()


class ByteBatches:
    """Random windows of ``seq + 1`` tokens from the training 95% (the rest is held out)."""

    def __init__(self, seq: int, batch: int, seed: int = 0, split: float = 0.95):
        data = corpus().long()
        cut = int(len(data) * split)
        self.train, self.valid = data[:cut], data[cut:]
        self.seq, self.batch = seq, batch
        self.gen = torch.Generator().manual_seed(seed)

    def _windows(self, source: torch.Tensor, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(source) - self.seq - 1, (self.batch,), generator=gen)
        rows = torch.stack([source[s : s + self.seq + 1] for s in starts.tolist()])
        return rows[:, :-1], rows[:, 1:]

    def next(self):
        return self._windows(self.train, self.gen)

    def validation(self, seed: int = 1234):
        return self._windows(self.valid, torch.Generator().manual_seed(seed))
