"""Inside each Ray Train worker: the model under its strategy, one ``bitlm.Trainer``, the data
position, evaluation, and the loop that reports to Ray Train and MLflow.

Every strategy trains through the same Trainer step (bitlm.trainer) and objective
(bitlm.objectives), so every ``train.*`` setting means the same thing under each:

- ``ddp``: DistributedDataParallel; each rank trains its Ray Data shard;
- ``fsdp``: FSDP2 sharding (bitlm.distributed.wrap_fsdp); each rank trains its shard;
- ``pipeline``: the blocks cut into one stage per rank (bitlm.distributed.make_pipeline). Each
  rank reads its shard as the others do; every micro-batch is gathered from all ranks and runs
  through the pipeline as one batch, so all the data trains.

A step takes ``train.accum_steps`` micro-batches of ``train.batch_size`` windows per rank.

On a GPU worker (``run.use_gpu``) the model, its batches (bits made from bytes on arrival),
evaluation and every collective are on the worker's CUDA device (Ray Train sets it current;
nccl runs the collectives); a checkpoint is read to the CPU, grown there if the config grew,
and moved once. ``train.amp`` is bf16 autocast there as on the CPU, ``train.compile_model``
compiles the ddp/fsdp module, ``train.fused_adamw`` fuses the optimizer step.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from bitlm import BitTransformerLM, Trainer, evaluate
from bitlm.bits import byte_tensor_to_bits
from bitlm.config import ExperimentConfig, from_dict
from bitlm.distributed import gather_batch, parallelize
from bitlm.optim import optimizer_param_names
from bitlm.scale import check_only_size_differs, grow_to
from pipelines import ray_checkpoint
from pipelines.common import DataError, window_bytes
from pipelines.tracking import MetricLog, system_metrics

LOGGED = (
    "loss", "bpb", "parity_bpb", "K", "C", "S", "lr", "grad_norm",
    "compressed", "direct", "noise_scale", "compress_p", "seq_bits",
)  # fmt: skip


EVAL_BATCH = 32  # windows per validation batch


def _model_config(model):
    # Its own function: "config" beside "distributed" (or the torch.distributed module) in one
    # function's names makes cloudpickle, which pickles this package by value, try to pickle
    # the module torch.distributed.config.
    return model.config


class Worker:
    """One training worker: the model under its strategy, the trainer, the data position."""

    def __init__(self, loop_config: dict[str, Any]):
        import ray.train

        self.cfg: ExperimentConfig = from_dict(ExperimentConfig, loop_config["experiment"])
        self.run_id = loop_config["mlflow"]["run_id"]
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.set_num_threads(self.cfg.run.threads_per_worker)
        torch.manual_seed(self.cfg.train.seed)  # identical initial weights on every rank
        self.device = ray.train.torch.get_device()
        self.pin = self.device.type == "cuda"  # page-locked batches copy to the GPU asynchronously
        self.strategy = self.cfg.run.strategy
        self.multi = dist.is_initialized() and self.world > 1
        state = ray_checkpoint.load(self.rank)
        self.growth: dict[str, Any] | None = None
        if state is None:
            self.base = BitTransformerLM(config=self.cfg.model)
        elif _model_config(state["model"]) != self.cfg.model.resolved():  # as built and checkpointed
            self.base = self._grow(state["model"])  # the scaling scheduler changed the config
        else:
            self.base = state["model"]
        self.base.to(self.device)
        self.model, self.pipeline = self._parallelize()
        self.sharded = self.strategy == "fsdp" and self.multi
        rank = 0 if self.pipeline is not None else self.rank  # pipeline ranks share one plan
        # The Trainer builds the optimizer over what holds this rank's parameters (the stage under
        # the pipeline), as every trainer does: train.* optimizer settings mean the same here.
        steps = loop_config["total_steps"]
        self.trainer = Trainer(self.model, self.cfg.train, total_steps=steps, pipeline=self.pipeline, rank=rank)
        self.epoch, self.batch_in_epoch, self.seconds = 0, 0, 0.0
        self.restored = state is not None
        if state is not None:
            self._restore(state)
        # Rank 0's machine in the run's system metrics (CPU, memory, GPU where there is one).
        every = self.cfg.run.system_metrics_seconds
        self.monitor = (
            system_metrics(self.run_id, loop_config["mlflow"]["uri"], every) if self.rank == 0 and every else None
        )

    def _parallelize(self):
        """(the module a step runs, the pipeline stage or None) for this worker's strategy."""
        if not self.multi:
            return self.base, None
        return parallelize(self.base, self.strategy)

    def _grow(self, old: BitTransformerLM) -> BitTransformerLM:
        """Rebuild the checkpointed model at the config's larger size, function-preserving
        (bitlm.scale.grow_to), and remember what changed for the logs."""
        check_only_size_differs(old.config, self.cfg.model)  # before the strategy: the likelier cause
        if self.strategy != "ddp":
            raise ValueError(f"growing a model on restore needs run.strategy=ddp, not {self.strategy}")
        grown, strategies = grow_to(old, self.cfg.model, generator=torch.Generator().manual_seed(self.cfg.train.seed))
        self.growth = {"old_model": old, "old_names": optimizer_param_names(old), "strategies": strategies}
        return grown

    def _restore(self, state: dict[str, Any]) -> None:
        ray_checkpoint.restore_optimizer(self, state)
        self.trainer.step = int(state["step"])
        self.trainer.rng.set_state(state["rng"])
        # A grown model re-warms its learning rate from here (bitlm.trainer.lr_at).
        self.trainer.grown_at = self.trainer.step if self.growth is not None else state.get("grown_at")
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        self.seconds = float(state["seconds"])

    # -- data ------------------------------------------------------------------------------------

    def steps(self, shard):
        """The micro-batches of each optimizer step of this epoch, from where the epoch stands
        (a resumed run skips what it already trained on); a last incomplete step is dropped."""
        group: list[torch.Tensor] = []
        order = (self.cfg.train.seed, self.epoch, self.rank)  # a resumed epoch replays its order
        batches = _batches(shard, self.cfg.train.batch_size, self.cfg.data.shuffle_windows, order, self.pin)
        for i, rows in enumerate(batches):
            if i < self.batch_in_epoch:
                continue
            group.append(byte_tensor_to_bits(rows.to(self.device, non_blocking=True)))
            if len(group) == self.cfg.train.accum_steps:
                self.batch_in_epoch = i + 1
                yield [self._gather(b) for b in group] if self.pipeline is not None else group
                group = []

    def _gather(self, bits: torch.Tensor) -> torch.Tensor:
        """Every rank's micro-batch, concatenated in rank order (the pipeline's input)."""
        return gather_batch(bits)

    def all_reduce_max(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        if self.multi:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    # -- evaluation ------------------------------------------------------------------------------

    def evaluate(self, val: torch.Tensor | None) -> dict[str, float]:
        """Validation on rank 0 (every rank calls it: gathering a sharded model is collective)."""
        model: torch.nn.Module = self.base
        if self.sharded or self.pipeline is not None:
            state = ray_checkpoint.full_model_state(self)
            if self.rank != 0:
                return {}
            model = BitTransformerLM(config=self.cfg.model).to(self.device)
            model.load_state_dict(state)
        if self.rank != 0:
            return {}
        tcfg = self.cfg.train
        return evaluate(model, val, EVAL_BATCH, tcfg.eval_batches, tcfg.amp, as_bytes=True)


def _batches(shard, batch_size: int, shuffle: int, seed: tuple[int, ...], pin: bool = False, per_read: int = 64):
    """Training batches of window bytes (B, W) uint8 from a worker's Ray Data shard: bits are
    made from them on the worker's device. Windows are read ``per_read`` batches at a time (one
    Ray Data round trip per read, not per step, which matters when two workers share two
    cores) and shuffled ``shuffle`` at a time (a window's neighbours in a shard are its
    document's next windows). The shuffle follows ``seed`` (the run's seed, the epoch, the
    rank), so an epoch resumed from a checkpoint replays the order it skips. ``pin``: batches
    in page-locked memory, for asynchronous copies to a GPU."""
    rng = np.random.default_rng(list(seed))
    pending: list[np.ndarray] = []
    held = 0

    def drain(final: bool):
        rows = np.concatenate(pending) if pending else np.empty((0, 0), np.uint8)
        if shuffle:
            rows = rows[rng.permutation(len(rows))]
        n = len(rows) if final else len(rows) // batch_size * batch_size
        for j in range(0, n - batch_size + 1, batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(rows[j : j + batch_size]))
            yield batch.pin_memory() if pin else batch
        pending[:] = [rows[n:]]

    for chunk in shard.iter_batches(batch_size=batch_size * per_read, batch_format="numpy"):
        pending.append(window_bytes(chunk["bytes"]))
        held += len(pending[-1])
        if held >= max(shuffle, 1):
            yield from drain(final=False)
            held = len(pending[0])
    yield from drain(final=True)


def _node_ips(world: int) -> list[str]:
    """The IP of the node each rank runs on, in rank order (a collective: every rank calls it)."""
    import ray.util

    ip = ray.util.get_node_ip_address()
    if not dist.is_initialized() or world == 1:
        return [ip]
    ips: list[str] = [""] * world
    dist.all_gather_object(ips, ip)
    return ips


def spread(keep: int, n: int) -> np.ndarray:
    """``keep`` indices evenly spread over range(n), first and last included, in integers (a
    float32 linspace rounds past the last index above 2**24)."""
    return np.arange(keep, dtype=np.int64) * (n - 1) // max(1, keep - 1)


def _validation(w: Worker, windows: int) -> torch.Tensor | None:
    """Rank 0's validation windows as bytes (uint8 (N, W): one byte of memory per byte of
    text; bits are made a batch at a time on the device), or only the ``train.eval_batches``
    batches that evaluation reads, spread evenly over the split's ``windows`` (the manifest's
    count). The split streams past: only the kept windows are held, whatever its size."""
    import ray.train

    if w.rank != 0:
        return None
    keep = w.cfg.train.eval_batches and w.cfg.train.eval_batches * EVAL_BATCH
    pick = spread(keep, windows) if keep and windows > keep else None
    rows, seen = [], 0
    for b in ray.train.get_dataset_shard("val").iter_batches(batch_size=1024, batch_format="numpy"):
        chunk = window_bytes(b["bytes"])
        if pick is not None:
            chunk = chunk[pick[(pick >= seen) & (pick < seen + len(chunk))] - seen]  # a copy: the batch can go
        seen += len(b["bytes"])
        rows.append(chunk)
    if pick is not None and seen != windows:
        raise DataError(f"the val split has {seen} windows, its manifest says {windows}: prepare the data again")
    return torch.from_numpy(np.concatenate(rows))


def _log_growth(w: Worker, val: torch.Tensor | None, log: MetricLog | None) -> dict[str, float]:
    """Validation bpb just before and just after a growth (equal: growth preserves the
    function), as metrics and a tag of the MLflow run. Returns the after-growth evaluation."""
    after = w.evaluate(val)
    if w.rank != 0:
        return after
    tcfg = w.cfg.train  # the same evaluation as the grown model's (device, amp)
    before = evaluate(w.growth["old_model"].to(w.device), val, EVAL_BATCH, tcfg.eval_batches, tcfg.amp, as_bytes=True)
    step = w.trainer.step
    if log is not None:
        metrics = {"growth_val_bpb_before": before["val_bpb"], "growth_val_bpb_after": after["val_bpb"]}
        log.log({**metrics, "model_params": w.base.num_parameters()}, step)
        log.flush()
        log.tag(f"growth_step_{step}", "+".join(w.growth["strategies"]))
    return after


def _quiet_ray_train() -> None:
    """Ray Train logs every report of every worker at INFO ("Reporting training result ..."):
    hundreds of lines a run. The platform shows progress itself; ``--verbose`` keeps them."""
    import logging

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_func(loop_config: dict[str, Any]) -> None:
    """Ray Train's per-worker function (also run by Tune trials)."""

    if not loop_config.get("verbose"):
        _quiet_ray_train()
    w = Worker(loop_config)
    try:
        _train(w, loop_config)
    finally:
        if w.monitor is not None:
            w.monitor.finish()


def _train(w: Worker, loop_config: dict[str, Any]) -> None:
    import ray.train

    cfg, tcfg = w.cfg, w.cfg.train
    log = MetricLog(loop_config["mlflow"]["uri"], w.run_id) if w.rank == 0 else None
    ips = _node_ips(w.world)
    if log is not None:
        print(f"workers on nodes {ips} (rank order)", flush=True)
        log.tag("worker_node_ips", ",".join(ips))
        # One per worker group start: a fresh start, a --resume, or a restart after a failure.
        log.log({"worker_group_start_step": w.trainer.step}, w.trainer.step)
        log.flush()
        if w.restored:
            print(f"restored from the checkpoint at step {w.trainer.step}", flush=True)
    val = _validation(w, loop_config["val_windows"])
    shard = ray.train.get_dataset_shard("train")
    total = loop_config["total_steps"]
    fail_marker = Path(loop_config["run_dir"]) / ".injected_failure" if cfg.run.fail_at_step else None
    done = w.trainer.step >= total
    last_eval: dict[str, float] = {}
    last_telemetry: dict[str, float] = {}  # K, C, S as last measured (on logged steps: BitObjective)
    evaluated = False
    if w.growth is not None:
        last_eval, evaluated = _log_growth(w, val, log), True
    t_last, bits_since = time.perf_counter(), 0
    while not done and w.epoch < tcfg.epochs:
        for micro in w.steps(shard):
            t0 = time.perf_counter()
            progress = w.seconds / tcfg.max_seconds if tcfg.max_seconds else None
            record = w.trainer.train_step(micro, progress)
            step = w.trainer.step
            w.seconds = w.all_reduce_max(w.seconds + time.perf_counter() - t0)  # every rank agrees
            bits_since += record["bits"] * (w.world if w.pipeline is None else 1)
            done = step >= total or (tcfg.max_seconds is not None and w.seconds >= tcfg.max_seconds)
            metrics = {k: record[k] for k in LOGGED if k in record}
            metrics["model_params"] = w.base.num_parameters()
            if step % tcfg.log_every == 0 or done:
                now = time.perf_counter()
                metrics["throughput_bits_per_s"] = bits_since / (now - t_last)
                t_last, bits_since = now, 0
            reporting = step % cfg.run.checkpoint_every == 0 or step % tcfg.log_every == 0 or done
            fresh = False
            if (tcfg.eval_every and step % tcfg.eval_every == 0) or done or (reporting and not evaluated):
                last_eval = w.evaluate(val)
                evaluated = fresh = True  # on every rank alike: evaluation is collective under fsdp/pipeline
            metrics.update(step=step, epoch=w.epoch, seconds=w.seconds)
            if log is not None:  # MLflow gets validation metrics at the steps they were measured
                log.log({k: v for k, v in {**metrics, **(last_eval if fresh else {})}.items() if k != "step"}, step)
            last_telemetry.update({k: record[k] for k in ("K", "C", "S") if k in record})
            metrics.update({**last_telemetry, **last_eval})  # every Ray report carries them (Tune ranks by them)
            if done and log is not None:  # the tracker's account rides on the final report
                metrics.update(_close_log(log))
                log = None
            if step % cfg.run.checkpoint_every == 0 or done:
                if log is not None:
                    log.flush()
                ray_checkpoint.save(w, metrics)
            elif step % tcfg.log_every == 0:
                if log is not None:
                    log.flush()
                ray.train.report(metrics)
            if fail_marker is not None and step == cfg.run.fail_at_step and w.rank == 0 and not fail_marker.exists():
                fail_marker.write_text(str(step))  # once: the restarted run must get past it
                raise RuntimeError(f"injected failure at step {step} (run.fail_at_step)")
            if done:
                break
        else:
            w.epoch += 1
            w.batch_in_epoch = 0
    if log is not None:
        _close_log(log)


def _close_log(log: MetricLog) -> dict[str, float]:
    """Deliver rank 0's metric log and account for it: in MLflow (``tracker_*`` metrics, when
    it is there to take them), in the worker's output and in the run's final report."""
    from mlflow.entities import Metric

    report = log.close()
    account = {f"tracker_{k}": float(v) for k, v in report.items()}
    if report["failures"]:
        print(
            f"tracker: {report['failures']} failed send(s) ({log.last_error}); metrics delayed "
            f"{report['delayed']}, dropped {report['dropped']}, lost {report['lost']}",
            flush=True,
        )
    try:
        log.client.log_batch(log.run_id, metrics=[Metric(k, v, int(time.time() * 1000), 0) for k, v in account.items()])
    except Exception as e:  # noqa: BLE001 - the tracker is gone at the end: the report still carries it
        print(f"tracker: the account could not be logged ({type(e).__name__}); it is in the run's result", flush=True)
    return account
