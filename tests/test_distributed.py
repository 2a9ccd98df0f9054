"""FSDP2 and pipeline helpers on 2 gloo processes, checked against single-process runs."""

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port

from bitlm import BitTransformerLM, TrainConfig, Trainer, text_to_bits
from bitlm.objectives import next_bit_loss

CFG = dict(d_model=32, nhead=4, num_layers=4, dim_feedforward=64, max_seq_len=90, dropout=0.0)
STEPS = 4


def _data() -> torch.Tensor:
    stream = torch.tensor(text_to_bits("shard me across two processes. " * 10))
    return torch.stack([stream[9 * i : 9 * i + 90] for i in range(8)])


def _model() -> BitTransformerLM:
    torch.manual_seed(0)
    return BitTransformerLM(**CFG)


def _finish() -> None:
    """Leave the group together, then exit without running C++ static destructors: gloo's
    threads can abort the process at interpreter exit ("terminate called without an active
    exception") after all the work is done and saved."""
    import os

    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def _fsdp_worker(rank, world, port, strategy, out_dir):
    import torch.distributed as dist

    from bitlm import train_loop
    from bitlm.distributed import full_state_dict, save_sharded_checkpoint, setup_distributed, wrap_fsdp

    torch.set_num_threads(1)
    setup_distributed(rank, world, "gloo", master_port=port)
    model = wrap_fsdp(_model(), sharding_strategy=strategy)
    assert model is not None and hasattr(model, "num_parameters")  # sharded in place, whatever the strategy
    half = _data()[rank * 4 : (rank + 1) * 4]  # each rank its half of the global batch
    # train_loop, the guide's entry point, on the wrapped model: one step per epoch.
    history = train_loop(model, half, epochs=STEPS, batch_size=4, lr=3e-3, grad_clip=1.0)
    losses = []
    for record in history.steps:
        loss = torch.tensor(record["loss"])
        dist.all_reduce(loss)
        losses.append(loss.item() / world)
    save_sharded_checkpoint(model, f"{out_dir}/sharded")
    full = full_state_dict(model)
    if rank == 0:
        torch.save({"losses": losses, "state": full}, f"{out_dir}/result.pt")
    _finish()


@pytest.mark.parametrize("strategy", ["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"])
def test_fsdp_matches_single_process_training(strategy, tmp_path):
    mp.spawn(_fsdp_worker, args=(2, free_port(), strategy, str(tmp_path)), nprocs=2)
    result = torch.load(tmp_path / "result.pt")
    model = _model()
    trainer = Trainer(model, TrainConfig(lr=3e-3, grad_clip=1.0))
    reference = [trainer.train_step([_data()])["loss"] for _ in range(STEPS)]
    assert result["losses"] == pytest.approx(reference, abs=1e-4)
    for name, tensor in model.state_dict().items():
        assert torch.allclose(result["state"][name], tensor, atol=1e-4), name
    from bitlm.distributed import load_sharded_checkpoint

    unsharded = load_sharded_checkpoint(BitTransformerLM(**CFG), tmp_path / "sharded")
    for name, tensor in unsharded.state_dict().items():
        assert torch.equal(tensor, result["state"][name]), name


def _pipeline_worker(rank, world, port, checkpoint, out_dir):

    from bitlm.distributed import make_pipeline, setup_distributed

    torch.set_num_threads(1)
    setup_distributed(rank, world, "gloo", master_port=port)
    pipe = make_pipeline(_model(), balance=[2, 2], checkpoint=checkpoint, n_microbatches=2)
    loss = pipe.train_step(_data() if rank == 0 else None)
    grads = {n: p.grad.clone() for n, p in pipe.named_parameters() if p.grad is not None}
    torch.save({"loss": loss, "grads": grads}, f"{out_dir}/rank{rank}.pt")
    _finish()


@pytest.mark.parametrize("checkpoint", ["never", "except_last"])
def test_pipeline_forward_backward_equals_unsplit_model(checkpoint, tmp_path):
    mp.spawn(_pipeline_worker, args=(2, free_port(), checkpoint, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    model = _model()
    data = _data()
    logits, _ = model(data)
    loss = next_bit_loss(logits, data)
    loss.backward()
    assert ranks[0]["loss"] == pytest.approx(loss.item(), abs=1e-5) == ranks[1]["loss"]
    reference = {n: p.grad for n, p in model.named_parameters()}
    seen = set()
    for rank, start in ((0, 0), (1, 2)):
        for name, grad in ranks[rank]["grads"].items():
            if name.startswith("blocks."):
                i, rest = name.split(".", 2)[1:]
                name = f"blocks.{int(i) + start}.{rest}"
            assert torch.allclose(grad, reference[name], atol=1e-5), name
            seen.add(name)
    assert seen == set(reference)  # the two stages' gradients cover the whole model


def test_pipeline_rejects_a_bad_balance():
    from bitlm.distributed import make_pipeline

    with pytest.raises(RuntimeError, match="setup_distributed"):
        make_pipeline(_model(), balance=[2, 2])
