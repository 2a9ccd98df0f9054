"""The built-in corpus and windowing: what a fresh clone trains on with no data set up.

The built-in corpus is Python's own ``pydoc_data.topics`` (about 466 KB of English prose and
code that ships with every CPython): its topics, sorted by name, joined by blank lines.
"""

from __future__ import annotations

import numpy as np

from .bits import bytes_to_bits


def builtin_corpus() -> str:
    """The text of ``pydoc_data.topics``, identical on every machine with the same Python."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def builtin_split(val_fraction: float = 0.1) -> tuple[bytes, bytes]:
    """(train, validation) UTF-8 bytes of the built-in corpus: the last ``val_fraction`` held out."""
    data = builtin_corpus().encode("utf-8")
    cut = int(len(data) * (1 - val_fraction))
    return data[:cut], data[cut:]


def byte_windows(data: bytes, window_bytes: int, stride_bytes: int | None = None) -> np.ndarray:
    """Parity-encoded windows (N, 9 * window_bytes) uint8 of ``data``, cut every ``stride_bytes``
    (default: no overlap). Every window starts on a byte boundary."""
    stride_bytes = stride_bytes or window_bytes
    arr = np.frombuffer(data, dtype=np.uint8)
    if arr.size < window_bytes:
        return np.zeros((0, 9 * window_bytes), dtype=np.uint8)
    starts = np.arange(0, arr.size - window_bytes + 1, stride_bytes)
    idx = starts[:, None] + np.arange(window_bytes)[None, :]
    return bytes_to_bits(arr[idx])
