"""Every training setting under every platform strategy (ddp, fsdp, pipeline), on 2 gloo
processes, through the code the Ray Train workers run: ``bitlm.distributed.parallelize``, the one
``Trainer`` step, ``gather_batch`` for the pipeline.

A setting is honoured when two ranks training their halves of the data end with the weights one
process gets from the same micro-batches (data parallelism and pipelining change where the
arithmetic happens, not what it computes), and those weights differ from the run without the
setting (so it did something). Settings a strategy cannot honour are refused by name when the
config is loaded; the refusals are tested at the end.
"""

import os

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port

from bitlm import BitTransformerLM, ConfigError, TrainConfig, Trainer, load_config, text_to_bits
from bitlm.config import ModelConfig
from bitlm.schedules import sequence_length

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
STEPS, B = 2, 4
# No dropout of either kind: each process would draw its own masks
MODEL = dict(d_model=32, nhead=4, num_layers=2, dim_feedforward=64, max_seq_len=90, dropout=0.0, ngram_dropout=0.0)
TRAIN = dict(lr=1e-2, grad_clip=0.0)

# name -> (model overrides, train overrides, strategies that honour it)
CASES = {
    "plain": ({}, {}, ("ddp", "fsdp", "pipeline")),
    "accum_steps": ({}, {"accum_steps": 2}, ("ddp", "fsdp", "pipeline")),
    "grad_clip": ({}, {"grad_clip": 0.05}, ("ddp", "fsdp", "pipeline")),
    "amp": ({}, {"amp": True}, ("ddp", "fsdp", "pipeline")),
    "lambdas": ({"lambda_K": 0.5, "lambda_C": 0.5, "lambda_S": 0.5}, {}, ("ddp", "fsdp", "pipeline")),
    "direct": ({}, {"direct_prob": 1.0}, ("ddp", "fsdp", "pipeline")),
    "compress": ({}, {"compress_prob": 1.0}, ("ddp", "fsdp", "pipeline")),
    "diffusion": ({}, {"diffusion": True, "diffusion_prob": 1.0, "diffusion_curriculum": True}, ("pipeline",)),
    "dual_mode": ({}, {"diffusion": True, "diffusion_prob": 0.5, "accum_steps": 4}, ("pipeline",)),
    "seq_ramp": ({}, {"seq_ramp_start_bytes": 4, "seq_ramp_steps": 4}, ("ddp", "fsdp")),
    "checkpointing": ({"use_checkpoint": True}, {}, ("ddp", "fsdp", "pipeline")),
    "reversible": ({"reversible": True}, {}, ("ddp",)),
    "byte_patch": ({"arch": "byte_patch", "patch_bytes": 2}, {}, ("ddp", "fsdp", "pipeline")),
    # the pipeline's n-gram table is tied between its first stage and the local decoder's last:
    # the global norm counts it once
    "byte_patch_clip": ({"arch": "byte_patch", "patch_bytes": 2}, {"grad_clip": 0.05}, ("ddp", "pipeline")),
    "compile": ({}, {"compile_model": True}, ("ddp", "fsdp")),
    "fused_adamw": ({}, {"fused_adamw": True}, ("ddp", "fsdp", "pipeline")),
}
# Diffusion under ddp/fsdp draws each rank's noise apart (as it should), so no single process
# reproduces it exactly; its test below checks what it does there instead.
STOCHASTIC = {"diffusion": ("ddp", "fsdp"), "byte_patch_dual": ("ddp", "fsdp")}
DUAL = ({"arch": "byte_patch", "patch_bytes": 2}, {"diffusion": True, "diffusion_prob": 0.5, "accum_steps": 4})
# S's reference is recorded from every rank's data: the lambda_S run checks that ranks carry the
# same one (and that it is the single process's, through the weights it trained).


def _stream() -> torch.Tensor:
    return torch.tensor(text_to_bits("every setting, every strategy, one step. " * 12))


def _micro_batches(rank: int, accum: int) -> list[list[torch.Tensor]]:
    """Per step, this rank's micro-batches: B windows each, the ranks' interleaved."""
    stream = _stream()
    out = []
    for step in range(STEPS):
        micro = []
        for a in range(accum):
            first = ((step * accum + a) * 2 + rank) * B
            micro.append(torch.stack([stream[9 * (first + i) : 9 * (first + i) + 90] for i in range(B)]))
        out.append(micro)
    return out


def _configs(name: str) -> tuple[ModelConfig, TrainConfig]:
    model, train = DUAL if name == "byte_patch_dual" else CASES[name][:2]
    return ModelConfig(**{**MODEL, **model}), TrainConfig(**{**TRAIN, **train})


def _model(mcfg: ModelConfig) -> BitTransformerLM:
    torch.manual_seed(0)
    return BitTransformerLM(config=mcfg)


def _worker(rank: int, world: int, port: int, cases: list[tuple[str, str]], out_dir: str) -> None:
    import torch.distributed as dist

    from bitlm.distributed import full_state_dict, gather_batch, parallelize, setup_distributed

    torch.set_num_threads(1)
    setup_distributed(rank, world, "gloo", master_port=port)
    results = {}
    for name, strategy in cases:
        mcfg, tcfg = _configs(name)
        base = _model(mcfg)
        calls = [0] * len(base.blocks)  # forward calls per block: checkpointing recomputes them
        for i, block in enumerate(base.blocks):
            block.register_forward_pre_hook(lambda m, a, i=i, calls=calls: calls.__setitem__(i, calls[i] + 1))
        module, pipeline = parallelize(base, strategy)
        trainer = Trainer(module, tcfg, total_steps=STEPS, pipeline=pipeline, rank=0 if pipeline else rank)
        records = []
        for micro in _micro_batches(rank, tcfg.accum_steps):
            if pipeline is not None:
                micro = [gather_batch(b) for b in micro]
            records.append(trainer.train_step(micro))
        if strategy == "fsdp":
            state = full_state_dict(module)
        elif pipeline is not None:
            state = pipeline.full_state_dict()
        else:
            state = {k: v.detach().clone() for k, v in base.state_dict().items()}
        other = [None] * world  # every rank's records, to see that data parallel ranks agree
        dist.all_gather_object(other, (records, calls, sorted(base.trained_modes), base.reference.counts))
        results[(name, strategy)] = {
            "state": state,
            "records": [o[0] for o in other],
            "calls": [o[1] for o in other],
            "modes": [o[2] for o in other],
            "reference": [o[3] for o in other],
            "compiled": trainer.forward is not module and torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0,
            "fused": trainer.optimizer.defaults["fused"],
        }
        dist.barrier()
    if rank == 0:
        torch.save(results, f"{out_dir}/results.pt")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # gloo's threads can abort a normal interpreter exit after the work is saved


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every (setting, strategy) case, trained on 2 processes in one spawn."""
    out = tmp_path_factory.mktemp("strategies")
    cases = [(name, s) for name, (_, _, strategies) in CASES.items() for s in strategies]
    cases += [(name, s) for name, strategies in STOCHASTIC.items() for s in strategies]
    mp.spawn(_worker, args=(2, free_port(), cases, str(out)), nprocs=2)
    return torch.load(out / "results.pt", weights_only=False)


def _single_process(name: str, gathered: bool = False) -> BitTransformerLM:
    """One process, one Trainer, the two ranks' micro-batches of each step; ``gathered``: each
    pair of micro-batches as one, the way the pipeline plans its objective (its chunks' losses
    average to the batch's)."""
    mcfg, tcfg = _configs(name)
    model = _model(mcfg)
    trainer = Trainer(model, tcfg, total_steps=STEPS)
    for r0, r1 in zip(_micro_batches(0, tcfg.accum_steps), _micro_batches(1, tcfg.accum_steps)):
        if gathered:
            trainer.train_step([torch.cat([a, b]) for a, b in zip(r0, r1)])
        else:
            trainer.train_step([m for pair in zip(r0, r1) for m in pair])
    return model


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in b)


@pytest.mark.parametrize(
    "name,strategy",
    [(name, s) for name, (_, _, strategies) in CASES.items() for s in strategies],
)
def test_setting_is_honoured_under_strategy(runs, name, strategy):
    got = runs[(name, strategy)]["state"]
    # compile computes the same function as eager: its reference is the plain one (and this
    # process need not compile it again)
    single = _single_process(
        "plain" if name == "compile" else name, gathered=strategy == "pipeline" and name in ("diffusion", "dual_mode")
    )
    tolerance = 2e-4
    assert _max_diff(got, single.state_dict()) < tolerance
    # what the model carries: every rank the reference of all ranks' data, the modes it trained
    for counts, modes in zip(runs[(name, strategy)]["reference"], runs[(name, strategy)]["modes"]):
        assert torch.equal(counts.cpu(), single.reference.counts) and modes == sorted(single.trained_modes)
    if name != "plain":  # the setting changed what training did
        plain = runs[("plain", strategy)]["state"] if not name.startswith("byte_patch") else None
        if name == "compile":  # same weights, computed by compiled code
            assert _max_diff(got, plain) < tolerance and runs[(name, strategy)]["compiled"]
        elif name == "fused_adamw":  # same weights, updated by one fused kernel (on DTensor shards under fsdp)
            assert _max_diff(got, plain) < tolerance and runs[(name, strategy)]["fused"] is True
        elif name == "checkpointing":  # same weights (it only trades memory for compute) ...
            assert _max_diff(got, plain) < tolerance
            for ranks_calls, plain_calls in zip(runs[(name, strategy)]["calls"], runs[("plain", strategy)]["calls"]):
                for ckpt, once in zip(ranks_calls, plain_calls):  # ... by running blocks again in backward
                    assert ckpt > once or once == 0
            assert sum(map(sum, runs[(name, strategy)]["calls"])) > sum(map(sum, runs[("plain", strategy)]["calls"]))
        elif plain is not None:
            assert _max_diff(got, plain) > 10 * tolerance


def test_records_say_what_each_setting_did(runs):
    for strategy in ("ddp", "fsdp", "pipeline"):
        assert all(r["direct"] == 1.0 for r in runs[("direct", strategy)]["records"][0])
        assert all(r["compressed"] == 1.0 for r in runs[("compress", strategy)]["records"][0])
        assert all(
            r["bits"] == (2 if strategy == "pipeline" else 1) * 2 * B * 90
            for r in runs[("accum_steps", strategy)]["records"][0]
        )
        clipped = runs[("grad_clip", strategy)]["records"][0]
        assert all(r["grad_norm"] > 0.05 for r in clipped)  # the norm before clipping, over all ranks
    for strategy in ("ddp", "fsdp"):
        lengths = [r["seq_bits"] for r in runs[("seq_ramp", strategy)]["records"][0]]
        assert lengths == [sequence_length(s, 90, 36, 4) for s in range(STEPS)] and lengths[0] == 36 < lengths[1]
        ranks = runs[("plain", strategy)]["records"]
        assert ranks[0][0]["loss"] != ranks[1][0]["loss"]  # each rank trained its own data
    pipe = runs[("plain", "pipeline")]["records"]
    assert pipe[0] == pipe[1]  # the pipeline's stats are the whole batch's, the same on every rank


def test_diffusion_under_data_parallelism_denoises_with_each_ranks_own_noise(runs):
    plain = runs[("plain", "ddp")]["state"]
    for strategy in STOCHASTIC["diffusion"]:
        run = runs[("diffusion", strategy)]
        r0, r1 = run["records"]
        assert all("noise_scale" in r and "bpb" not in r for r in r0)
        assert [r["noise_scale"] for r in r0] == [r["noise_scale"] for r in r1] == [1.0, 1.0 - 0.75 / STEPS]
        assert _max_diff(run["state"], plain) > 1e-3


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (
            ["run.strategy=pipeline", "train.seq_ramp_start_bytes=4", "train.seq_ramp_steps=10"],
            "train.seq_ramp_start_bytes",
        ),
        (["run.strategy=pipeline", "train.compile_model=true"], "train.compile_model"),
        (["run.strategy=pipeline", "model.reversible=true"], "model.reversible"),
        (["run.strategy=fsdp", "model.reversible=true"], "model.reversible"),
        (["run.strategy=ddp", "train.scale_patience=2"], "train.scale_patience"),
        (
            ["run.strategy=pipeline", "model.arch=byte_patch", "train.diffusion=true", "train.diffusion_prob=0.5"],
            "train.diffusion_prob",
        ),
    ],
)
def test_a_setting_a_strategy_cannot_honour_is_refused_by_name(overrides, needle):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    with pytest.raises(ConfigError, match=needle) as info:
        cfg.check_platform()
    strategy = overrides[0].split("=")[1]
    assert (f"run.strategy={strategy}" in str(info.value)) or "Ray Train run" in str(info.value)


def test_one_model_trains_both_modes(runs):
    """diffusion_prob 0.5: causal and denoising micro-batches in one run (every rank drawing the
    same mode: the draws follow the seed and the step), and the model says it learned both; the
    shipped architecture (byte_patch) under data parallelism, bit under the pipeline."""
    for name, strategy in [("byte_patch_dual", "ddp"), ("byte_patch_dual", "fsdp"), ("dual_mode", "pipeline")]:
        run = runs[(name, strategy)]
        r0, r1 = run["records"]
        assert [r["denoise"] for r in r0] == [r["denoise"] for r in r1] and 0 < sum(r["denoise"] for r in r0) < len(r0)
        assert run["modes"] == [["causal", "denoise"]] * 2
    assert _max_diff(runs[("byte_patch_dual", "ddp")]["state"], runs[("byte_patch", "ddp")]["state"]) > 1e-3
