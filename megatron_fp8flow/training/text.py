"""Real text that every machine with this package has, as byte-level tokens (vocab 256).

Corpora: ``python-docs``, the reference documentation of the language (``pydoc_data.topics``,
~0.5 MB of English prose and grammar; the default); ``python-stdlib``, those topics plus the
standard library's own modules (no tests; ~11 MB of code, docstrings and comments), for runs
that would otherwise pass over the small one many times; and ``python-torch``, those plus the
Python source of PyTorch itself (a requirement of this package, so installed from the package
registry with it; no tests; ~57 MB in all), for convergence runs of tens of millions of tokens
that should see each byte about once. The text depends on the Python and PyTorch versions
installed: runs that are compared should write their data on machines alike (``fp8flow data``
prints a fingerprint of the tokens to check). Any of them can be written as a Megatron indexed
dataset (``fp8flow data``), which both the compact loop and Megatron's ``pretrain()`` read
through ``data_path``.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

CORPORA = ("python-docs", "python-stdlib", "python-torch")
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "testing", "idlelib"}


def _as_tokens(text: str) -> torch.Tensor:
    data = text.encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone() if data else torch.empty(0, dtype=torch.uint8)


def documents(name: str = "python-docs") -> List[torch.Tensor]:
    """The corpus as uint8 documents in a fixed order: one per documentation topic, then (for
    python-stdlib) one per standard-library module file, by path."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; expected one of {', '.join(CORPORA)}")
    from pydoc_data.topics import topics

    docs = [_as_tokens(topics[k]) for k in sorted(topics)]
    if name in ("python-stdlib", "python-torch"):
        docs += _source_files(Path(sysconfig.get_paths()["stdlib"]))
    if name == "python-torch":
        docs += _source_files(Path(torch.__file__).parent)
    return docs


def _source_files(root: Path) -> List[torch.Tensor]:
    """The non-empty .py files under ``root`` by path, tests and vendored packages left out."""
    docs = []
    for path in sorted(p for p in root.rglob("*.py") if not _SKIP_DIRS & set(p.relative_to(root).parts)):
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():  # empty __init__ files are not documents
            docs.append(_as_tokens(text))
    return docs


def corpus(name: str = "python-docs") -> torch.Tensor:
    """All documents as one uint8 stream, two newlines between documents."""
    sep = _as_tokens("\n\n")
    parts: List[torch.Tensor] = []
    for i, doc in enumerate(documents(name)):
        parts += [sep, doc] if i else [doc]
    return torch.cat(parts)


def write_indexed_dataset(prefix: str, name: str = "python-docs") -> Dict[str, int]:
    """``prefix``.bin / ``prefix``.idx: the corpus as a Megatron indexed dataset (uint8 tokens,
    one sequence per document), for ``data_path``. Returns the document and token counts."""
    import numpy

    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    docs = [d for d in documents(name) if len(d)]
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=numpy.uint8)
    for doc in docs:
        builder.add_document(doc.numpy(), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    digest = hashlib.sha256()
    for doc in docs:
        digest.update(doc.numpy().tobytes())
        digest.update(b"\0")
    return {"documents": len(docs), "tokens": sum(len(d) for d in docs), "sha256": digest.hexdigest()[:16]}


def read_indexed_datasets(data_path: Sequence[str], vocab_size: Optional[int] = None) -> torch.Tensor:
    """The tokens of Megatron indexed datasets (``data_path`` as Megatron takes it, prefixes
    without weights), every document in order, as one int64 stream."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    paths = [data_path] if isinstance(data_path, str) else list(data_path)
    if len(paths) > 1 and _is_number(paths[0]):
        raise ValueError(f"data_path {paths}: weighted blends are for Megatron's pretrain() (--megatron); the "
                         "compact loop reads plain prefixes")
    parts = []
    for prefix in paths:
        for f in (f"{prefix}.bin", f"{prefix}.idx"):
            if not Path(f).is_file():
                raise FileNotFoundError(f"data_path {prefix!r}: {f} not found (make one with `fp8flow data {prefix}`)")
        ds = IndexedDataset(prefix)
        parts += [torch.from_numpy(ds[i].astype("int64")) for i in range(len(ds))]
    tokens = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
    if vocab_size is not None and len(tokens) and int(tokens.max()) >= vocab_size:
        raise ValueError(f"data_path {paths}: token id {int(tokens.max())} is outside the vocabulary "
                         f"(vocab_size {vocab_size})")
    return tokens


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def split_fractions(split: Optional[str]) -> Tuple[float, float]:
    """Megatron's ``split`` ("949,50,1": train, validation, test weights) as the train and
    validation fractions; None: 95% / 5%."""
    if split is None:
        return 0.95, 0.05
    weights = [float(w) for w in str(split).replace("/", ",").split(",")]
    if len(weights) > 3 or any(w < 0 for w in weights) or not sum(weights):
        raise ValueError(f"split {split!r}: expected up to three non-negative weights, e.g. '949,50,1'")
    weights += [0.0] * (3 - len(weights))
    return weights[0] / sum(weights), weights[1] / sum(weights)


class ByteBatches:
    """Random windows of ``seq + 1`` tokens: training windows from the first ``split`` of the
    tokens, validation windows from the part after it (the rest is held out). ``tokens``:
    the stream to read (default: the python-docs corpus)."""

    def __init__(self, seq: int, batch: int, seed: int = 0, split: float = 0.95,
                 tokens: Optional[torch.Tensor] = None, valid_fraction: Optional[float] = None):
        data = (corpus() if tokens is None else tokens).long()
        cut = int(len(data) * split)
        end = len(data) if valid_fraction is None else cut + int(len(data) * valid_fraction)
        self.train, self.valid = data[:cut], data[cut:end]
        for what, part in (("training", self.train), ("validation", self.valid)):
            if len(part) < seq + 2:
                raise ValueError(f"the {what} split holds {len(part)} tokens, fewer than one sequence of "
                                 f"{seq} + 1: use more text or a shorter seq_length")
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
