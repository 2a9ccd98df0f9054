import json

import pytest
import torch

from bitlm import BitTransformerLM, CheckpointError


@pytest.fixture
def model():
    torch.manual_seed(0)
    return BitTransformerLM(d_model=32, nhead=4, num_layers=2, dim_feedforward=64, max_seq_len=72, chunk_size=18).eval()


def test_round_trip_preserves_config_and_outputs(model, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = BitTransformerLM.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config == model.config
    bits = torch.randint(0, 2, (2, 72))
    assert torch.equal(model(bits)[0], loaded(bits)[0])


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        BitTransformerLM.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        BitTransformerLM.from_pretrained(tmp_path / "empty")


def test_corrupt_weights_are_refused(model, tmp_path):
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x80\x04not safetensors, maybe a pickle")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        BitTransformerLM.from_pretrained(tmp_path)


def test_bad_config_is_refused(model, tmp_path):
    model.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        BitTransformerLM.from_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model"]["d_model"] = 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        BitTransformerLM.from_pretrained(tmp_path)
    cfg["model"]["wings"] = 2
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="'wings'"):
        BitTransformerLM.from_pretrained(tmp_path)
    cfg = {"format": "something-else"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="format"):
        BitTransformerLM.from_pretrained(tmp_path)


def test_weights_for_another_architecture_are_refused(model, tmp_path):
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model"]["num_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing"):
        BitTransformerLM.from_pretrained(tmp_path)


def test_the_reference_and_trained_modes_travel_with_the_weights(tmp_path):
    from bitlm import TrainConfig, Trainer, text_to_bits

    torch.manual_seed(0)
    model = BitTransformerLM(d_model=32, nhead=4, num_layers=1, dim_feedforward=64, max_seq_len=90)
    bits = torch.tensor(text_to_bits("recorded from the data it trains on. " * 4))[: 4 * 90].view(4, 90)
    Trainer(model, TrainConfig(diffusion=True, diffusion_prob=0.5, seed=3)).train_step([bits, bits, bits, bits])
    assert model.reference.recorded_bytes == 4 * 40 and model.trained_modes == {"causal", "denoise"}
    model.save_pretrained(tmp_path / "ck")
    loaded = BitTransformerLM.from_pretrained(tmp_path / "ck")
    assert torch.equal(loaded.reference.counts, model.reference.counts)
    assert loaded.trained_modes == {"causal", "denoise"}
