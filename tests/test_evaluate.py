"""pipelines/evaluate.py: the held-out text rebuilt from its windows, read by the model through
sliding windows that score every byte once, with context."""

import pytest
import torch

from pipelines.evaluate import sliding_bpb, sliding_windows


@pytest.mark.parametrize("length", [1, 9, 127, 128, 129, 255, 256, 257, 300, 511, 1000])
def test_every_byte_is_scored_once_in_order_with_context(length):
    text = bytes((i * 37 + 11) % 256 for i in range(length))
    windows = sliding_windows([text, b"xy"], 256, 128)
    scored, firsts = b"", []
    for window, first in windows:  # the window's bytes (bits are made where it is scored)
        assert isinstance(window, bytes) and len(window) <= 256
        scored += window[first:]
        firsts.append(first)
    assert scored == text + b"xy"
    n = len(windows) - 1  # the last window is the short text's
    assert firsts[0] == 0 and all(f >= 128 for f in firsts[1:n]) and firsts[n] == 0


def test_context_lowers_the_bits_of_a_trained_model(checkpoints):
    """The same held-out bytes cost the trained model fewer bits when each is read with the
    text before it (context 0 is the windows alone, cut where the sliding step puts them)."""
    from bitlm import BitTransformerLM, evaluate, text_to_bits

    model = BitTransformerLM.from_pretrained(checkpoints / "good").eval()
    width = model.config.max_seq_len // 9
    text = ("Pack my box with five dozen liquor jugs. The quick brown fox jumps over the lazy dog. " * 20).encode()
    slid = sliding_bpb(model, [text])
    cold = torch.tensor(text_to_bits(text[: len(text) // width * width].decode())).view(-1, 9 * width)
    assert slid["context_bytes"] == width // 2
    assert slid["bpb"] < evaluate(model, cold)["val_bpb"]
