"""The bit codec: text <-> UTF-8 bytes <-> 9 bits per byte, and run-length compression.

Every byte becomes 9 bits: its 8 data bits, most significant first, then an even-parity bit
(the XOR of the 8 data bits, so each 9-bit group has an even number of ones). Everything here
is vectorized with numpy lookup tables and ``packbits``; there are no per-bit Python loops.

Inputs may be Python lists, numpy arrays or torch tensors, 1-D (one sequence) or 2-D (a batch
of equal-length sequences). Functions that return bits return the same kind they were given.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

BITS_PER_BYTE = 9
DATA_BITS = 8

# _BYTE_TO_BITS[b] is the 9-bit code of byte b: 8 data bits MSB-first, then even parity.
_DATA = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1)  # (256, 8)
_BYTE_TO_BITS = np.concatenate([_DATA, _DATA.sum(1, keepdims=True) % 2], axis=1).astype(np.uint8)
_PARITY = _BYTE_TO_BITS[:, 8].copy()
BYTE_BITS = torch.from_numpy(_BYTE_TO_BITS).long()  # (256, 9): byte value -> its 9 bits, parity set
# Multiplying a little-endian uint64 whose 8 bytes are the bits b0..b7 (0/1, MSB first) by this
# constant moves b_i to bit 63 - i (the shifts 63 - 9i never collide), so ">> 56" is the byte.
_GATHER = np.uint64(0x8040201008040201)


class ParityError(ValueError):
    """A 9-bit group whose parity bit does not match its data bits.

    ``byte_index`` is the index of the first failing byte (within its sequence), and
    ``sequence_index`` the row of a batch it was found in (``None`` for a 1-D input).
    """

    def __init__(self, byte_index: int, sequence_index: int | None = None):
        self.byte_index = byte_index
        self.sequence_index = sequence_index
        where = f"byte {byte_index}" + (f" of sequence {sequence_index}" if sequence_index is not None else "")
        super().__init__(
            f"Parity check failed: {where} fails its parity check (bits "
            f"{byte_index * 9}..{byte_index * 9 + 8}). Use enforce_parity() to repair "
            "generated bits, or bits_to_text(..., errors='replace') to decode anyway."
        )


def _as_numpy_bits(bits: Any) -> np.ndarray:
    """Convert a list / array / tensor of 0/1 values to a uint8 numpy array, checking values."""
    if isinstance(bits, torch.Tensor):
        arr = bits.detach().cpu().numpy()
    else:
        arr = np.asarray(bits)
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.size and not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"bits must be numeric 0/1 values, got dtype {arr.dtype}")
    if arr.size and (arr.max() > 1 or arr.min() < 0 or (arr.dtype.kind == "f" and (arr % 1).any())):
        bad = int(np.flatnonzero(((arr != 0) & (arr != 1)).reshape(-1))[0])
        raise ValueError(f"bits must be 0 or 1; element {bad} is {arr.reshape(-1)[bad]!r}")
    return arr.astype(np.uint8, copy=False)


def _like(arr: np.ndarray, template: Any) -> Any:
    """Return ``arr`` as the same kind of container as ``template``."""
    if isinstance(template, torch.Tensor):
        return torch.from_numpy(np.ascontiguousarray(arr)).to(
            dtype=template.dtype if template.dtype != torch.bool else torch.long,
            device=template.device,
        )
    if isinstance(template, np.ndarray):
        return arr
    return arr.tolist()


def bytes_to_bits(data: bytes | bytearray | np.ndarray) -> np.ndarray:
    """Encode raw bytes as a flat uint8 array of 9 bits per byte (the fast path)."""
    arr = np.frombuffer(bytes(data), dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    return np.take(_BYTE_TO_BITS, arr.astype(np.uint8, copy=False), axis=0).reshape(*arr.shape[:-1], -1)


def byte_tensor_to_bits(data: torch.Tensor) -> torch.Tensor:
    """Bytes (uint8, shape (..., n)) -> bits (long, shape (..., 9n)) on the tensor's own device:
    the 9-bit code of each byte by one table lookup there, so a batch crosses to an accelerator
    as bytes (1/9 of the bits as uint8, 1/72 as int64) and becomes bits on arrival."""
    if data.dtype != torch.uint8:
        raise TypeError(f"byte_tensor_to_bits expects uint8 bytes, got {data.dtype}")
    table = torch.from_numpy(_BYTE_TO_BITS).to(device=data.device, dtype=torch.long)
    return table[data.long()].reshape(*data.shape[:-1], -1)


def text_to_bits(text: str) -> list[int]:
    """Encode ``text`` as UTF-8 and return its 9-bits-per-byte code as a list of ints.

    ``text_to_bits("A")`` is ``[0, 1, 0, 0, 0, 0, 0, 1, 0]``: 0x41 MSB-first, then parity 0.
    """
    if not isinstance(text, str):
        raise TypeError(f"text_to_bits expects a str, got {type(text).__name__}")
    return bytes_to_bits(text.encode("utf-8")).tolist()


def _groups(arr: np.ndarray) -> np.ndarray:
    """Reshape (..., 9n) bits to (..., n, 9), with a clear error for a ragged length."""
    if arr.shape[-1] % BITS_PER_BYTE:
        raise ValueError(
            f"bit sequence length {arr.shape[-1]} is not a multiple of 9 (8 data bits + 1 parity bit per byte)"
        )
    return arr.reshape(*arr.shape[:-1], -1, BITS_PER_BYTE)


def parity_ok(bits: Any) -> np.ndarray:
    """Boolean array (..., n_bytes): True where a byte's parity bit matches its data bits."""
    groups = _groups(_as_numpy_bits(bits))
    return (groups.sum(-1) % 2) == 0


def _pack(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(byte values, parity ok) of a flat, checked 0/1 uint8 array of 9-bit groups."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    n = _groups(arr).shape[0]
    if n == 0:
        return np.zeros(0, np.uint8), np.zeros(0, bool)
    # Each group's 8 data bits, read as one little-endian uint64 (groups are 9 bytes apart).
    words = np.ndarray((n,), dtype="<u8", buffer=arr, strides=(9,))
    values = ((words * _GATHER) >> np.uint64(56)).astype(np.uint8)
    return values, _PARITY[values] == arr[8::9]


def bits_to_bytes(bits: Any, errors: str = "strict") -> bytes | list[bytes]:
    """Decode 9-bit groups to raw bytes, checking parity.

    ``errors="strict"`` raises :class:`ParityError` naming the first bad byte;
    ``errors="replace"`` keeps the data bits of bad bytes as they are (use bits_to_text to
    get U+FFFD for them).
    """
    arr = _as_numpy_bits(bits)
    if arr.ndim == 2:
        return [bits_to_bytes(row, errors) for row in arr]  # type: ignore[misc]
    if arr.ndim != 1:
        raise ValueError(f"expected a 1-D or 2-D bit sequence, got shape {arr.shape}")
    if errors not in ("strict", "replace"):
        raise ValueError(f"errors must be 'strict' or 'replace', got {errors!r}")
    values, ok = _pack(arr)
    if errors == "strict" and not ok.all():
        raise ParityError(int(np.flatnonzero(~ok)[0]))
    return values.tobytes()


def bits_to_text(bits: Any, errors: str = "strict") -> str | list[str]:
    """Decode parity-encoded bits back to text. A 2-D input returns one string per row.

    ``errors="strict"`` raises :class:`ParityError` (first bad byte) or ``UnicodeDecodeError``;
    ``errors="replace"`` decodes corrupt input anyway: bytes that fail parity and invalid
    UTF-8 both become U+FFFD.
    """
    arr = _as_numpy_bits(bits)
    if arr.ndim == 2:
        out = []
        for i, row in enumerate(arr):
            try:
                out.append(bits_to_text(row, errors))
            except ParityError as e:
                raise ParityError(e.byte_index, sequence_index=i) from None
        return out
    if errors not in ("strict", "replace"):
        raise ValueError(f"errors must be 'strict' or 'replace', got {errors!r}")
    if arr.ndim != 1:
        raise ValueError(f"expected a 1-D or 2-D bit sequence, got shape {arr.shape}")
    values, ok = _pack(arr)
    if errors == "strict":
        if not ok.all():
            raise ParityError(int(np.flatnonzero(~ok)[0]))
        return values.tobytes().decode("utf-8")
    # 0xFF never occurs in UTF-8, so it marks the bytes that failed parity unambiguously.
    values[~ok] = 0xFF
    return values.tobytes().decode("utf-8", errors="replace")


def enforce_parity(bits: Any) -> Any:
    """Return ``bits`` with every parity bit set from its byte's 8 data bits (same kind)."""
    arr = _as_numpy_bits(bits).copy()
    groups = _groups(arr)
    groups[..., DATA_BITS] = groups[..., :DATA_BITS].sum(-1) % 2
    return _like(groups.reshape(arr.shape), bits)


# -- run-length compression ------------------------------------------------------------------

_MAX_RUN = 255


def compress_bits(bits: Any) -> Any:
    """Run-length encode a 1-D bit sequence, losslessly for any input.

    The output is a flat sequence of ``(bit, run_length)`` pairs,
    ``[b0, n0, b1, n1, ...]`` with ``1 <= n <= 255``; runs longer than 255 are split into
    several pairs with the same bit. ``[0, 0, 0, 1, 1]`` becomes ``[0, 3, 1, 2]``. Returned as
    the input's kind (tensors as uint8, on the input's device).
    """
    arr = _as_numpy_bits(bits)
    if arr.ndim != 1:
        raise ValueError(f"compress_bits expects a 1-D sequence, got shape {arr.shape}")
    if arr.size == 0:
        return _like_rle(np.zeros(0, dtype=np.uint8), bits)
    starts = np.flatnonzero(np.concatenate([[True], arr[1:] != arr[:-1]]))
    lengths = np.diff(np.append(starts, arr.size))
    values = arr[starts]
    # Split long runs: a run of length L becomes ceil(L/255) pairs.
    pieces = -(-lengths // _MAX_RUN)
    values = np.repeat(values, pieces)
    run_lengths = np.full(values.size, _MAX_RUN, dtype=np.int64)
    last = np.cumsum(pieces) - 1
    run_lengths[last] = lengths - (pieces - 1) * _MAX_RUN
    out = np.stack([values, run_lengths], axis=1).reshape(-1).astype(np.uint8)
    return _like_rle(out, bits)


def decompress_bits(compressed: Any) -> Any:
    """Invert :func:`compress_bits`: expand ``(bit, run_length)`` pairs back to bits."""
    if isinstance(compressed, torch.Tensor):
        arr = compressed.detach().cpu().numpy()
    else:
        arr = np.asarray(compressed)
    arr = arr.astype(np.int64).reshape(-1)
    if arr.size % 2:
        raise ValueError("compressed bits must hold (bit, run_length) pairs: odd length")
    values, lengths = arr[0::2], arr[1::2]
    if ((values != 0) & (values != 1)).any() or (lengths < 1).any() or (lengths > 255).any():
        raise ValueError("compressed bits hold an invalid pair (bit not 0/1 or run not 1..255)")
    out = np.repeat(values.astype(np.uint8), lengths)
    if isinstance(compressed, torch.Tensor):
        return torch.from_numpy(out).long().to(compressed.device)
    return out if isinstance(compressed, np.ndarray) else out.tolist()


def _like_rle(arr: np.ndarray, template: Any) -> Any:
    if isinstance(template, torch.Tensor):
        return torch.from_numpy(arr).to(template.device)
    return arr if isinstance(template, np.ndarray) else arr.tolist()


def rle_bit_stream(bits: Any) -> np.ndarray:
    """The run-length-compressed form of a bit sequence, written as bits.

    Each ``(bit, run_length)`` pair of :func:`compress_bits` becomes one 9-bit group: the run's
    bit, then its length (1..255) in 8 bits, MSB first. ``[1, 1, 1, 0]`` becomes
    ``[1, 0,0,0,0,0,0,1,1,  0, 0,0,0,0,0,0,0,1]``. This is what compression training feeds
    the model (see bitlm.objectives).
    """
    pairs = np.asarray(compress_bits(np.asarray(_as_numpy_bits(bits)).reshape(-1)), dtype=np.uint8)
    values, lengths = pairs[0::2], pairs[1::2]
    groups = np.concatenate([values[:, None], np.unpackbits(lengths[:, None], axis=1)], axis=1)
    return groups.reshape(-1)
