"""Byte-level text from the Python standard library's own sources: real text on every machine."""
from __future__ import annotations

import os
import sysconfig
from typing import List, Tuple

import torch


def stdlib_files() -> List[str]:
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".py"))
    if not files:
        raise RuntimeError(f"no Python sources found under {root}")
    return files


def load_corpus(max_bytes: int = 2_000_000, heldout_every: int = 10) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train, heldout) uint8 token streams; every ``heldout_every``-th file is held out."""
    train, heldout = bytearray(), bytearray()
    for i, path in enumerate(stdlib_files()):
        with open(path, "rb") as f:
            data = f.read()
        (heldout if i % heldout_every == heldout_every - 1 else train).extend(data)
        if len(train) + len(heldout) >= max_bytes:
            break
    return (torch.frombuffer(train, dtype=torch.uint8).long(), torch.frombuffer(heldout, dtype=torch.uint8).long())


def batches(stream: torch.Tensor, batch: int, seq: int, generator: torch.Generator):
    """Endless random (inputs, targets) windows of ``seq`` bytes."""
    while True:
        starts = torch.randint(0, stream.numel() - seq - 1, (batch,), generator=generator)
        idx = starts.unsqueeze(1) + torch.arange(seq + 1)
        window = stream[idx]
        yield window[:, :-1], window[:, 1:]
