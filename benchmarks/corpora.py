"""Corpora the benchmarks use: the built-in one, and one from another domain built from text
already on the machine (no download), each split into train and held-out bytes.

- ``pydoc``: Python's pydoc topics (bitlm.builtin_split; the last 10% held out).
- ``vimdoc``: Vim's help files (``/usr/share/vim/vim*/doc/*.txt``, ~9.5 MB of technical English
  prose); where Vim is absent, the Python standard library's source (``*.py``), code rather
  than prose. Files in sorted order; the last 10% of the bytes held out.
"""

from __future__ import annotations

import glob
import sysconfig
from pathlib import Path


def builtin() -> tuple[bytes, bytes, str]:
    from bitlm import builtin_split

    train, val = builtin_split()
    return train, val, "Python pydoc topics (built in)"


def other_domain(limit_bytes: int = 16_000_000) -> tuple[bytes, bytes, str]:
    """(train, held out, description) of the second corpus."""
    files = sorted(glob.glob("/usr/share/vim/vim*/doc/*.txt"))
    source = "Vim help files (/usr/share/vim/vim*/doc/*.txt)"
    if not files:
        files = sorted(glob.glob(str(Path(sysconfig.get_paths()["stdlib"]) / "**" / "*.py"), recursive=True))
        source = "Python standard library source (*.py)"
    data = bytearray()
    for f in files:
        data += Path(f).read_bytes()
        if len(data) >= limit_bytes:
            break
    cut = int(len(data) * 0.9)
    return bytes(data[:cut]), bytes(data[cut:]), f"{source}, {len(files)} files, {len(data):,} bytes"


CORPORA = {"pydoc": builtin, "vimdoc": other_domain}
