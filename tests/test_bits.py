import numpy as np
import pytest
import torch

from bitlm import (
    ParityError,
    bits_to_text,
    bytes_to_bits,
    compress_bits,
    decompress_bits,
    enforce_parity,
    parity_ok,
    text_to_bits,
)

TEXTS = ["", "A", "Hello, world!", "naïve café — 日本語 🎉", "\x00\xff binary-ish \n\t"]


def test_known_code_is_msb_first_with_even_parity():
    assert text_to_bits("A") == [0, 1, 0, 0, 0, 0, 0, 1, 0]  # 0x41: two ones -> parity 0
    assert text_to_bits("C") == [0, 1, 0, 0, 0, 0, 1, 1, 1]  # 0x43: three ones -> parity 1


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_every_container(text):
    bits = text_to_bits(text)
    assert len(bits) == 9 * len(text.encode("utf-8"))
    assert bits_to_text(bits) == text
    assert bits_to_text(np.array(bits)) == text
    assert bits_to_text(torch.tensor(bits)) == text


def test_every_byte_value_round_trips_and_has_even_parity():
    data = bytes(range(256))
    bits = bytes_to_bits(data)
    assert bits.shape == (256 * 9,)
    assert (bits.reshape(256, 9).sum(1) % 2 == 0).all()
    assert parity_ok(bits).all()


def test_batched_decode_returns_one_string_per_row():
    rows = torch.tensor([text_to_bits("abc"), text_to_bits("xyz")])
    assert bits_to_text(rows) == ["abc", "xyz"]


def test_parity_error_names_first_bad_byte():
    bits = text_to_bits("hello")
    bits[3 * 9 + 2] ^= 1  # flip a data bit of byte 3
    bits[4 * 9 + 8] ^= 1  # and the parity bit of byte 4
    with pytest.raises(ParityError) as info:
        bits_to_text(bits)
    assert info.value.byte_index == 3
    assert "byte 3" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_parity_error_in_batch_names_the_row():
    rows = np.array([text_to_bits("ok"), text_to_bits("no")])
    rows[1, 8] ^= 1
    with pytest.raises(ParityError) as info:
        bits_to_text(rows)
    assert (info.value.sequence_index, info.value.byte_index) == (1, 0)


def test_replace_decodes_corrupt_input():
    bits = text_to_bits("abc")
    bits[9 + 8] ^= 1  # byte 1 fails parity
    assert bits_to_text(bits, errors="replace") == "a\ufffdc"
    # invalid UTF-8 with good parity: a lone continuation byte
    assert bits_to_text(bytes_to_bits(b"a\x80b"), errors="replace") == "a\ufffdb"


def test_enforce_parity_repairs_and_keeps_type():
    bits = torch.tensor(text_to_bits("parity"))
    broken = bits.clone()
    broken[8::9] = 1 - broken[8::9]
    fixed = enforce_parity(broken)
    assert isinstance(fixed, torch.Tensor) and torch.equal(fixed, bits)
    as_list = enforce_parity(broken.tolist())
    assert isinstance(as_list, list) and as_list == bits.tolist()
    batch = enforce_parity(np.stack([broken.numpy(), broken.numpy()]))
    assert batch.shape == (2, bits.numel()) and parity_ok(batch).all()


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="multiple of 9"):
        bits_to_text([0] * 10)
    with pytest.raises(ValueError, match="0 or 1"):
        bits_to_text([0, 2] + [0] * 7)
    with pytest.raises(TypeError):
        text_to_bits(b"bytes")


@pytest.mark.parametrize(
    "seq",
    [[], [0], [1], [0, 0, 0, 1, 1, 0, 1, 1, 1], [1] * 1000, [0] * 255 + [1] + [0] * 256],
)
def test_rle_round_trip(seq):
    compressed = compress_bits(seq)
    assert decompress_bits(compressed) == seq


def test_rle_round_trip_random_and_tensor():
    rng = np.random.default_rng(0)
    for p in (0.02, 0.5, 0.98):
        bits = torch.from_numpy((rng.random(5000) < p).astype(np.int64))
        comp = compress_bits(bits)
        assert comp.dtype == torch.uint8
        assert torch.equal(decompress_bits(comp), bits)


def test_rle_format_and_ratio():
    assert compress_bits([0, 0, 0, 1, 1]) == [0, 3, 1, 2]
    assert len(compress_bits([1] * 600)) == 6  # 255 + 255 + 90
    assert len(compress_bits([0] * 900)) < 900 / 100


def test_decompress_rejects_garbage():
    with pytest.raises(ValueError, match="pairs"):
        decompress_bits([0, 3, 1])
    with pytest.raises(ValueError, match="invalid pair"):
        decompress_bits([2, 3])
    with pytest.raises(ValueError, match="invalid pair"):
        decompress_bits([0, 0])
