"""Drafting for speculative decoding (bitlm.generate verifies the drafts): which bytes to
propose after a context (the bytes that followed its latest earlier match, then the chain of
the reference's likeliest next bytes) and how many to propose in the next model call."""

from __future__ import annotations

# Drafts continue a context match of at least this many bytes (one byte is a weak guess), else
# the chain of the reference's likeliest next bytes (training data's bigrams; free, often right).
DRAFT_MIN_MATCH = 2
GREEDY_DRAFT = 8  # iter_generate's drafts per call, by default, for greedy decoding
PAUSE_STEPS = 4  # plain steps before drafting again, after a lone draft was rejected


def lookup_draft(history: bytes, k: int, n_max: int = 4, n_min: int = 1) -> bytes:
    """Prompt-lookup drafting: the ``k`` bytes that followed the latest earlier occurrence of
    the longest suffix of ``history`` (``n_max`` bytes down to ``n_min``) that occurred before."""
    for n in range(min(n_max, len(history) - 1), n_min - 1, -1):
        at = history.rfind(history[-n:], 0, len(history) - 1)
        if at >= 0:
            return history[at + n : at + n + k]
    return b""


def propose_drafts(history: bytes, k: int, likeliest: bytes) -> bytes:
    """``k`` drafted bytes: what followed the latest earlier match of the context's last
    DRAFT_MIN_MATCH+ bytes (lookup_draft), continued (or, with no match, begun) by the chain of
    the reference's likeliest next bytes, ``likeliest[a]`` the likeliest byte after byte a."""
    out = bytearray(lookup_draft(history, k, n_min=DRAFT_MIN_MATCH))
    last = out[-1] if out else history[-1]
    while len(out) < k:
        last = likeliest[last]
        out.append(last)
    return bytes(out)


def next_draft_count(k_now: int, kept_all: bool, k: int) -> int:
    """Drafts for the next call after one of ``k_now``: 2 more (up to ``k``) when all were kept,
    else 1 fewer; 0 pauses drafting (a call that verifies a draft costs more than a plain step)."""
    return min(k, k_now + 2) if kept_all else k_now - 1
