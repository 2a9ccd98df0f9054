import math

import pytest

from bitlm.schedules import compress_probability, diffusion_noise_scale, noise_level, sequence_length


@pytest.mark.parametrize("schedule", ["linear", "cosine", "exp"])
def test_noise_levels_run_from_clean_to_pure_noise_monotonically(schedule):
    levels = [noise_level(s / 20, schedule) for s in range(21)]
    assert levels[0] == pytest.approx(0.0) and levels[-1] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(levels, levels[1:]))


def test_noise_level_formulas():
    assert noise_level(0.5, "linear") == 0.5
    assert noise_level(0.5, "cosine") == pytest.approx(1 - math.cos(math.pi / 4))
    assert noise_level(0.5, "exp") == pytest.approx(math.expm1(2) / math.expm1(4))
    with pytest.raises(ValueError, match="noise schedule"):
        noise_level(0.5, "sqrt")


def test_diffusion_curriculum_lowers_the_noise():
    assert diffusion_noise_scale(0, 100) == 1.0
    assert diffusion_noise_scale(50, 100) == pytest.approx(0.625)
    assert diffusion_noise_scale(100, 100) == pytest.approx(0.25)
    assert diffusion_noise_scale(500, None) == 1.0


def test_compress_probability_warmup_and_ramp():
    assert compress_probability(99, 0.5, compress_warmup=100) == 0.0
    assert compress_probability(100, 0.5, compress_warmup=100) == 0.5
    assert compress_probability(100, 0.5, 100, ramp_steps=10) == pytest.approx(0.05)
    assert compress_probability(200, 0.5, 100, ramp_steps=10) == 0.5


def test_sequence_length_ramp_is_whole_bytes():
    assert sequence_length(0, 576, 144, 100) == 144
    assert sequence_length(100, 576, 144, 100) == 576
    mid = sequence_length(50, 576, 144, 100)
    assert 144 < mid < 576 and mid % 9 == 0
    assert sequence_length(10, 576) == 576
