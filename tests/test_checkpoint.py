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
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # cut short
    with pytest.raises(CheckpointError, match=f"{weights} is corrupt or incomplete"):
        BitTransformerLM.from_pretrained(tmp_path)
    flipped = bytearray(data)
    flipped[-5] ^= 1  # one bit of one weight: still a readable file, but not the one written
    weights.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="corrupt or incomplete"):
        BitTransformerLM.from_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    del meta["sha256"]  # a checkpoint from before checksums: the reader still refuses garbage
    (tmp_path / "config.json").write_text(json.dumps(meta))
    weights.write_bytes(b"\x80\x04not safetensors, maybe a pickle")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        BitTransformerLM.from_pretrained(tmp_path)


def test_training_state_is_checked_too(model, tmp_path):
    from bitlm.checkpoint import load_training_state, save_training_state

    model.save_pretrained(tmp_path)
    save_training_state(tmp_path, {"step": 7, "t": torch.ones(3)})
    assert load_training_state(tmp_path)["step"] == 7
    path = tmp_path / "training_state.pt"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=f"{path} is corrupt or incomplete"):
        load_training_state(tmp_path)


_WRITER = """
import sys, torch
from bitlm import BitTransformerLM
torch.manual_seed(int(sys.argv[2]))
m = BitTransformerLM(d_model=512, nhead=8, num_layers=6, dim_feedforward=2048, max_seq_len=72)
print("ready", flush=True)
while True:
    m.save_pretrained(sys.argv[1])
"""


def test_a_writer_killed_mid_write_leaves_a_loadable_checkpoint(model, tmp_path):
    """SIGKILL a process that rewrites a ~75 MB checkpoint over and over, at points all through
    its writes: what is left always loads, and is the old or the new model, never a mix."""
    import random
    import signal
    import subprocess
    import sys
    import time

    model.save_pretrained(tmp_path / "ckpt")  # a good checkpoint of another model is there first
    rng = random.Random(0)
    for trial in range(6):
        if trial == 3:
            model.save_pretrained(tmp_path / "ckpt")  # the small one again: later kills may keep it
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(tmp_path / "ckpt"), str(trial)], stdout=subprocess.PIPE
        )
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.05, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        loaded = BitTransformerLM.from_pretrained(tmp_path / "ckpt")
        assert loaded.config.d_model in (32, 512)
    model.save_pretrained(tmp_path / "ckpt")  # the next writer sweeps what the killed ones left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_full_disk_stops_the_write_and_keeps_the_last_good_checkpoint(model, tmp_path):
    """A 1 MB tmpfs (root only: CI runs as root) holds a small checkpoint; a big one does not
    fit: the error says so, and the small one still loads."""
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.fail("this test mounts a small tmpfs to fill it: run it as root (CI does)")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], check=True)
    try:
        model.save_pretrained(disk / "ckpt")
        torch.manual_seed(1)
        big = BitTransformerLM(d_model=256, nhead=4, num_layers=2, dim_feedforward=1024, max_seq_len=72)
        with pytest.raises(CheckpointError, match="no space left on the device.*untouched"):
            big.save_pretrained(disk / "ckpt")
        loaded = BitTransformerLM.from_pretrained(disk / "ckpt").eval()
        bits = torch.randint(0, 2, (2, 72))
        assert torch.equal(loaded(bits)[0], model(bits)[0])
        assert sorted(p.name for p in (disk / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)  # loaded weights may still map it


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


def test_a_checkpoint_from_before_a_setting_existed_loads_as_it_was(tmp_path):
    """A setting a checkpoint does not record gets the behaviour of its time, not today's
    default: a byte_patch checkpoint from before n-gram embeddings loads without them."""
    import json

    model = BitTransformerLM(
        d_model=32,
        nhead=4,
        num_layers=1,
        dim_feedforward=64,
        max_seq_len=90,
        arch="byte_patch",
        ngram_sizes=[],
        mode_embedding=False,
    )
    model.save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / "config.json"
    meta = json.loads(path.read_text())
    del meta["model"]["ngram_sizes"], meta["model"]["attn_dropout"], meta["model"]["mode_embedding"]
    path.write_text(json.dumps(meta))
    loaded = BitTransformerLM.from_pretrained(tmp_path / "old")
    assert loaded.config.ngram_sizes == [] and not hasattr(loaded.io, "ngram_emb")
    assert loaded.config.mode_embedding is False and loaded.io.mode_emb is None
