"""pipelines/ray_checkpoint.py: which checkpoint a restarted Ray Train worker resumes from.

The choice is made from the storage directory alone (no Ray): the newest checkpoint that
verifies whole, even one Ray Train had not yet registered when its worker died."""

import pytest
import torch

from bitlm import BitTransformerLM
from bitlm.checkpoint import CheckpointError, save_training_state
from pipelines.ray_checkpoint import choose


def _write(root, name: str, step: int, strategy: str = "ddp"):
    d = root / name
    torch.manual_seed(step)
    BitTransformerLM(d_model=16, nhead=2, num_layers=1, dim_feedforward=32, max_seq_len=90).save_pretrained(d)
    save_training_state(d, {"step": step, "strategy": strategy, "optimizer": {}})
    return d


def test_resume_takes_the_newest_whole_checkpoint_even_unregistered(tmp_path):
    registered = _write(tmp_path, "checkpoint_000010", 10)
    _write(tmp_path, "checkpoint_000020", 20)  # written whole, the worker died before Ray registered it
    cut = _write(tmp_path, "checkpoint_000030", 30)
    (cut / "model.safetensors").write_bytes(b"cut short")  # a crash mid-write
    assert choose(registered, 0)["step"] == 20  # not 10: one checkpoint interval redone, not two


def test_an_unregistered_pipeline_checkpoint_does_not_count(tmp_path):
    registered = _write(tmp_path, "checkpoint_000010", 10, "pipeline")
    _write(tmp_path, "checkpoint_000020", 20, "pipeline")  # its stages' optimizer files carry no checksum
    assert choose(registered, 0)["step"] == 10


def test_a_broken_registered_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    _write(tmp_path, "checkpoint_000010", 10)
    registered = _write(tmp_path, "checkpoint_000020", 20)
    (registered / "training_state.pt").write_bytes(b"changed")
    assert choose(registered, 0)["step"] == 10
    assert "checkpoint_000020" in capsys.readouterr().out  # the refused one is named
    (tmp_path / "checkpoint_000010" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no loadable checkpoint"):
        choose(registered, 0)
