"""Train a BitTransformerLM with Ray Train on prepared shards; MLflow records the run.

    python pipelines/train.py --config configs/small.yaml [--set run.num_workers=2 ...]
    ray job submit --working-dir . -- python pipelines/train.py --config configs/small.yaml
    python pipelines/train.py --config configs/small.yaml --resume [--name RUN]

The driver prints the resolved config, prepares the data if ``data.output_dir`` holds none,
opens (or, with ``--resume``, reopens) an MLflow run, and starts a ``TorchTrainer`` with
``run.num_workers`` workers. Each worker reads its Ray Data shard of the train split and trains
by ``run.strategy``: ``ddp`` (DistributedDataParallel), ``fsdp`` (FSDP2 sharding) or
``pipeline`` (the model's blocks cut into one stage per worker; rank 0's batches feed it).
Rank 0 logs per-step loss, bits/byte, parity bits/byte, K, C, S, learning rate and throughput,
and validation bits/byte per evaluation, to MLflow. Every ``run.checkpoint_every`` steps the
workers save a Ray Train checkpoint (model, optimizer, step, data position, sampler state); a
run restarted after a worker failure (``run.max_failures``) or with ``--resume`` continues from
the latest one. At the end the driver logs the final checkpoint, the data manifest and a plot
of loss and K/C/S to the run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bitlm.config import ExperimentConfig, dump_config, flatten, from_dict, load_config, to_dict  # noqa: E402
from pipelines.common import (  # noqa: E402
    DataError,
    check_cluster_paths,
    experiment_id,
    git_commit,
    init_ray,
    mlflow_client,
    read_manifest,
    shard_paths,
    storage_path,
    tracking_uri,
    unpack_bits,
)

TRAIN_STATE = "training_state.pt"


# -- inside each Ray Train worker ---------------------------------------------------------------


class _MlflowLog:
    """Rank 0's metric log: buffered, sent in batches to the run."""

    def __init__(self, uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.client, self.run_id, self.buffer = MlflowClient(uri), run_id, []

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.buffer += [Metric(k, float(v), now, step) for k, v in metrics.items()]

    def flush(self) -> None:
        for i in range(0, len(self.buffer), 900):  # MLflow takes up to 1000 metrics a call
            self.client.log_batch(self.run_id, metrics=self.buffer[i : i + 900])
        self.buffer = []


def _node_ips(world: int) -> list[str]:
    """The IP of the node each rank runs on, in rank order (a collective: every rank calls it)."""
    import ray.util
    import torch.distributed as dist

    ip = ray.util.get_node_ip_address()
    if not dist.is_initialized() or world == 1:
        return [ip]
    ips: list[str] = [""] * world
    dist.all_gather_object(ips, ip)
    return ips


def _all_reduce_max(value: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


class _Worker:
    """One training worker: the model under its strategy, the optimizer, the data position."""

    def __init__(self, config: dict[str, Any]):
        import ray.train
        import torch.distributed as dist

        from bitlm import BitTransformerLM, TrainConfig
        from bitlm.training import Trainer, configure_optimizer

        self.cfg: ExperimentConfig = from_dict(ExperimentConfig, config["experiment"])
        # Not "self.config": with "distributed" also named here, cloudpickle would take the name
        # for the config module torch.distributed.config and fail to pickle this class.
        self.loop_config = config
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.set_num_threads(self.cfg.run.threads_per_worker)
        torch.manual_seed(self.cfg.train.seed)  # identical initial weights on every rank
        self.device = ray.train.torch.get_device()
        self.n_bits = 9 * config["window_bytes"]
        self.strategy = self.cfg.run.strategy
        state = self._load_checkpoint()
        self.growth: dict[str, Any] | None = None
        if state is None:
            self.base = BitTransformerLM(config=self.cfg.model)
        elif self._saved_model_config(state) != self.cfg.model:
            self.base = self._grow(state)  # the scaling scheduler changed the config
        else:
            self.base = state["model"]
        self.base.to(self.device)
        self.pipe = None
        self.sharded = self.strategy == "fsdp" and dist.is_initialized()
        if self.strategy == "ddp" and self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # Small buckets start all-reducing gradients while backward is still running.
            self.model = DistributedDataParallel(self.base, bucket_cap_mb=1, gradient_as_bucket_view=True)
        elif self.sharded:
            from bitlm.distributed import wrap_fsdp

            self.model = wrap_fsdp(self.base, "FULL_SHARD", mixed_precision=self.cfg.train.amp)  # in place
        elif self.strategy == "pipeline" and dist.is_initialized():
            from bitlm.distributed import make_pipeline

            n, w = self.cfg.model.num_layers, self.world
            if n < w:
                raise ValueError(f"pipeline strategy needs at least one block per worker: {n} layers, {w} workers")
            balance = [n // w + (1 if i < n % w else 0) for i in range(w)]
            self.pipe = make_pipeline(self.base, balance)
            self.model = self.pipe.stage
        else:
            self.model = self.base
        tcfg: TrainConfig = self.cfg.train
        optimizer = configure_optimizer(self.model, tcfg.lr, tcfg.weight_decay)
        self.trainer = Trainer(self.model, tcfg, optimizer, total_steps=config["total_steps"])
        self.epoch, self.batch_in_epoch, self.seconds = 0, 0, 0.0
        self.restored = state is not None
        if state is not None:
            self._restore(state)

    # -- checkpoints ------------------------------------------------------------------------------

    def _load_checkpoint(self) -> dict[str, Any] | None:
        import ray.train

        from bitlm.checkpoint import load_pretrained, load_training_state

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            state = load_training_state(d) or {}
            state["model"] = load_pretrained(d)
            rank_file = Path(d) / f"optimizer_rank{self.rank}.pt"
            if rank_file.exists():
                state["optimizer"] = torch.load(rank_file, map_location="cpu", weights_only=True)
        return state

    @staticmethod
    def _saved_model_config(state: dict[str, Any]):
        # Its own function: "config" beside "torch" and "distributed" in __init__'s names would
        # make cloudpickle try to pickle the module torch.distributed.config.
        return state["model"].config

    def _grow(self, state: dict[str, Any]):
        """Rebuild the checkpointed model at the config's larger size, function-preserving
        (bitlm.scale.grow_to), and remember what changed for the logs."""
        from bitlm.scale import grow_to
        from bitlm.training import optimizer_param_names

        if self.strategy != "ddp":
            raise ValueError(f"growing a model on restore needs run.strategy=ddp, not {self.strategy}")
        old = state["model"]
        grown, strategies = grow_to(old, self.cfg.model, generator=torch.Generator().manual_seed(self.cfg.train.seed))
        self.growth = {"old_model": old, "old_names": optimizer_param_names(old), "strategies": strategies}
        return grown

    def _restore(self, state: dict[str, Any]) -> None:
        if self.growth is not None:
            from bitlm.training import remap_optimizer_state

            remap_optimizer_state(self.growth["old_names"], state["optimizer"], self.base, self.trainer.optimizer)
        elif self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(
                self.model,
                self.trainer.optimizer,
                state["optimizer"],
                options=StateDictOptions(full_state_dict=True),
            )
        else:
            self.trainer.optimizer.load_state_dict(state["optimizer"])
        self.trainer.step = int(state["step"])
        self.trainer.rng.set_state(state["rng"])
        # A grown model re-warms its learning rate from here (bitlm.training.lr_at).
        self.trainer.grown_at = self.trainer.step if self.growth is not None else state.get("grown_at")
        self.epoch, self.batch_in_epoch, self.seconds = (
            int(state["epoch"]),
            int(state["batch_in_epoch"]),
            float(state["seconds"]),
        )

    def full_state(self) -> dict[str, torch.Tensor]:
        """The whole model's state dict on rank 0 (collective under fsdp and pipeline)."""
        import torch.distributed as dist

        if self.sharded:
            from bitlm.distributed import full_state_dict

            return full_state_dict(self.model)
        if self.pipe is not None:
            parts = [None] * self.world
            start = self.rank_block_offset()
            local = {}
            for name, t in self.model.state_dict().items():
                if name.startswith("blocks."):
                    i, rest = name.split(".", 2)[1:]
                    name = f"blocks.{int(i) + start}.{rest}"
                local[name] = t.detach().cpu()
            dist.all_gather_object(parts, local)
            # Every stage holds the io module; its input side trains on the first stage, its
            # output side on the last.
            inputs = {f"io.{n}" for n in self.base.io.embed_parameter_names()} | {"pos_emb.weight"}
            merged: dict[str, torch.Tensor] = {}
            for rank, part in enumerate(parts):
                for k, v in part.items():
                    if k not in inputs or rank == 0:  # later stages win for the output side
                        merged[k] = v
            return merged
        return {k: v.detach().cpu() for k, v in self.base.state_dict().items()}

    def rank_block_offset(self) -> int:
        n, w = self.cfg.model.num_layers, self.world
        return sum(n // w + (1 if i < n % w else 0) for i in range(self.rank))

    def save_checkpoint(self, metrics: dict[str, float]) -> None:
        import ray.train

        from bitlm.checkpoint import save_pretrained, save_training_state

        model_state = self.full_state()
        optim_state = self.trainer.optimizer.state_dict()
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            optim_state = get_optimizer_state_dict(
                self.model, self.trainer.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        with tempfile.TemporaryDirectory() as d:
            write = self.rank == 0 or self.pipe is not None
            if self.rank == 0:
                save_pretrained(
                    self.base, d, extra={"mlflow_run_id": self.loop_config["mlflow"]["run_id"]}, state_dict=model_state
                )
                state = {
                    "step": self.trainer.step,
                    "epoch": self.epoch,
                    "batch_in_epoch": self.batch_in_epoch,
                    "seconds": self.seconds,
                    "rng": self.trainer.rng.get_state(),
                    "grown_at": self.trainer.grown_at,
                    "strategy": self.strategy,
                    "world_size": self.world,
                }
                if self.pipe is None:
                    state["optimizer"] = optim_state
                save_training_state(d, state)
            if self.pipe is not None:  # each stage keeps its own optimizer state
                torch.save(optim_state, Path(d) / f"optimizer_rank{self.rank}.pt")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if write else None)

    # -- training ------------------------------------------------------------------------------

    def train_step(self, bits: torch.Tensor, progress: float | None) -> dict[str, float]:
        if self.pipe is None:
            return self.trainer.train_step([bits], progress)
        lr = self.trainer.set_lr(progress)
        self.pipe.train_step(bits)
        if self.cfg.train.grad_clip:
            # Clip by the global norm over all stages, as the unsplit model would.
            import torch.distributed as dist

            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            sq = torch.stack([g.pow(2).sum() for g in grads]).sum() if grads else torch.zeros(())
            dist.all_reduce(sq)
            scale = min(1.0, self.cfg.train.grad_clip / (float(sq.sqrt()) + 1e-6))
            for g in grads:
                g.mul_(scale)
        self.trainer.optimizer.step()
        self.trainer.optimizer.zero_grad(set_to_none=True)
        self.trainer.step += 1
        return {"step": self.trainer.step, "lr": lr, "bits": bits.numel(), **self.pipe.last_stats}

    def evaluate(self, val: torch.Tensor) -> dict[str, float]:
        """Validation on rank 0 with an unsharded copy of the model."""
        from bitlm import BitTransformerLM, evaluate

        state = self.full_state()
        if self.rank != 0:
            return {}
        local = BitTransformerLM(config=self.cfg.model)
        local.load_state_dict(state)
        return evaluate(local, val, batch_size=32, max_batches=self.cfg.train.eval_batches)


def _batches(shard, batch_size: int, n_bits: int, per_read: int = 64):
    """Training batches (B, n_bits) from a worker's Ray Data shard. Windows are read
    ``per_read`` batches at a time and unpacked locally: one Ray Data round trip per read, not
    per step, which matters when two workers share two cores."""
    for chunk in shard.iter_batches(batch_size=batch_size * per_read, batch_format="numpy"):
        bits = torch.from_numpy(unpack_bits(chunk["bits"], n_bits)).long()
        for j in range(0, len(bits) - batch_size + 1, batch_size):
            yield bits[j : j + batch_size]


def _log_growth(w: _Worker, val: torch.Tensor | None, log: _MlflowLog | None) -> dict[str, float]:
    """Validation bpb just before and just after a growth (equal: growth preserves the
    function), as metrics and a tag of the MLflow run. Returns the after-growth evaluation."""
    from bitlm import evaluate

    after = w.evaluate(val)
    if w.rank != 0:
        return after
    before = evaluate(w.growth["old_model"], val, batch_size=32, max_batches=w.cfg.train.eval_batches)
    step = w.trainer.step
    if log is not None:
        log.log(
            {
                "growth_val_bpb_before": before["val_bpb"],
                "growth_val_bpb_after": after["val_bpb"],
                "model_params": w.base.num_parameters(),
            },
            step,
        )
        log.flush()
        log.client.set_tag(log.run_id, f"growth_step_{step}", "+".join(w.growth["strategies"]))
    return after


def train_func(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function (also run by Tune trials)."""
    import ray.train

    w = _Worker(config)
    cfg = w.cfg
    log = _MlflowLog(config["mlflow"]["uri"], config["mlflow"]["run_id"]) if w.rank == 0 else None
    ips = _node_ips(w.world)
    if log is not None:
        print(f"workers on nodes {ips} (rank order)", flush=True)
        log.client.set_tag(log.run_id, "worker_node_ips", ",".join(ips))
        # One per worker group start: a fresh start, a --resume, or a restart after a failure.
        log.log({"worker_group_start_step": w.trainer.step}, w.trainer.step)
        log.flush()
        if w.restored:
            print(f"restored from the checkpoint at step {w.trainer.step}", flush=True)
    val = None
    if w.rank == 0:
        val_rows = [
            unpack_bits(b["bits"], w.n_bits)
            for b in ray.train.get_dataset_shard("val").iter_batches(batch_size=1024, batch_format="numpy")
        ]
        import numpy as np

        val = torch.from_numpy(np.concatenate(val_rows)).long()
    shard = ray.train.get_dataset_shard("train")
    total = config["total_steps"]
    fail_marker = Path(config["run_dir"]) / ".injected_failure" if cfg.run.fail_at_step else None
    done = w.trainer.step >= total
    last_eval: dict[str, float] = {}
    evaluated = False
    if w.growth is not None:
        last_eval, evaluated = _log_growth(w, val, log), True
    t_last, bits_since = time.perf_counter(), 0
    while not done and w.epoch < cfg.train.epochs:
        for i, bits in enumerate(_batches(shard, cfg.train.batch_size, w.n_bits)):
            if i < w.batch_in_epoch:  # resume: skip what this epoch already trained on
                continue
            t0 = time.perf_counter()
            bits = bits.to(w.device)
            progress = w.seconds / cfg.train.max_seconds if cfg.train.max_seconds else None
            record = w.train_step(bits, progress)
            w.batch_in_epoch = i + 1
            step = w.trainer.step
            w.seconds = _all_reduce_max(w.seconds + time.perf_counter() - t0)  # every rank agrees
            bits_since += bits.numel() * (w.world if w.pipe is None else 1)
            done = step >= total or (cfg.train.max_seconds is not None and w.seconds >= cfg.train.max_seconds)
            keys = ("loss", "bpb", "parity_bpb", "K", "C", "S", "lr", "noise_scale", "compress_p", "seq_bits")
            metrics = {k: record[k] for k in keys if k in record}
            metrics["model_params"] = w.base.num_parameters()
            if step % cfg.train.log_every == 0 or done:
                now = time.perf_counter()
                metrics["throughput_bits_per_s"] = bits_since / (now - t_last)
                t_last, bits_since = now, 0
            reporting = step % cfg.run.checkpoint_every == 0 or step % cfg.train.log_every == 0 or done
            fresh = False
            if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or done or (reporting and not evaluated):
                last_eval = w.evaluate(val)
                evaluated = fresh = True  # on every rank alike: evaluation is collective under fsdp/pipeline
            metrics.update(step=step, epoch=w.epoch, seconds=w.seconds)
            if log is not None:  # MLflow gets validation metrics at the steps they were measured
                log.log({k: v for k, v in {**metrics, **(last_eval if fresh else {})}.items() if k != "step"}, step)
            metrics.update(last_eval)  # every Ray report carries them (Tune's schedulers rank by them)
            if step % cfg.run.checkpoint_every == 0 or done:
                if log is not None:
                    log.flush()
                w.save_checkpoint(metrics)
            elif step % cfg.train.log_every == 0:
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
        log.flush()


# -- the driver ---------------------------------------------------------------------------------


def total_steps(cfg: ExperimentConfig, manifest: dict[str, Any]) -> int:
    """Optimizer steps in the run: max_steps, else epochs over each worker's share of the train
    split (every strategy splits the train windows over the workers)."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    per_worker = manifest["splits"]["train"]["windows"] // cfg.run.num_workers
    return max(1, per_worker // cfg.train.batch_size * cfg.train.epochs)


def _find_run(client, exp_id: str, name: str | None, config_name: str):
    """The MLflow run to resume: the one with this Ray run name, else this config's latest."""
    query = f"tags.ray_run_name = '{name}'" if name else f"tags.config_name = '{config_name}'"
    runs = client.search_runs([exp_id], query, order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise SystemExit(f"--resume: no MLflow run found for {'name ' + name if name else 'config ' + config_name}")
    return runs[0]


def plot_history(client, run_id: str, out: Path) -> Path | None:
    """A PNG of loss, bits/byte and K/C/S against step, from the run's metric history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, keys, title in (
        (axes[0], ["loss"], "training loss (nats/bit)"),
        (axes[1], ["bpb", "val_bpb"], "bits per byte"),
        (axes[2], ["K", "C", "S"], "telemetry"),
    ):
        for key in keys:
            hist = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
            if hist:
                ax.plot(
                    [m.step for m in hist],
                    [m.value for m in hist],
                    label=key,
                    marker="o" if key == "val_bpb" else None,
                    ms=3,
                )
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def ensure_data(cfg: ExperimentConfig, data_dir: str | None = None) -> tuple[str, dict[str, Any]]:
    """The prepared data directory and its manifest, preparing it first if it holds none."""
    data_dir = str(Path(data_dir or cfg.data.output_dir).resolve())
    try:
        manifest = read_manifest(data_dir)
    except DataError:
        from pipelines.prepare_data import prepare

        print(f"no prepared data in {data_dir}: preparing it now")
        manifest = prepare(cfg.data, output_dir=data_dir)
    if manifest["window_bytes"] * 9 > cfg.model.max_seq_len:
        raise SystemExit(
            f"windows of {manifest['window_bytes']} bytes need model.max_seq_len >= {9 * manifest['window_bytes']}"
        )
    return data_dir, manifest


def open_mlflow_run(
    client,
    cfg: ExperimentConfig,
    name: str,
    data_dir: str,
    manifest: dict[str, Any],
    tags: dict[str, str] | None = None,
) -> str:
    """A new MLflow run for a training: tags, every config param, the data manifest."""
    from mlflow.entities import Param

    exp_id = experiment_id(client, cfg.run.experiment)
    all_tags = {
        "ray_run_name": name,
        "config_name": cfg.name,
        "strategy": cfg.run.strategy,
        "world_size": str(cfg.run.num_workers),
        "git_commit": git_commit(),
        "data_dir": data_dir,
        **(tags or {}),
    }
    run_id = client.create_run(exp_id, run_name=name, tags=all_tags).info.run_id
    items = [Param(k, str(v)[:6000]) for k, v in flatten(cfg).items()]
    for i in range(0, len(items), 90):
        client.log_batch(run_id, params=items[i : i + 90])
    with tempfile.TemporaryDirectory() as d:
        Path(d, "manifest.json").write_text(json.dumps(manifest, indent=2))
        Path(d, "config.yaml").write_text(dump_config(cfg))
        client.log_artifact(run_id, str(Path(d, "manifest.json")), "data")
        client.log_artifact(run_id, str(Path(d, "config.yaml")))
    return run_id


def local_run_dir(cfg: ExperimentConfig, name: str) -> Path:
    """A local directory of the run: in the storage path when it is local, else in /tmp."""
    storage = storage_path(cfg.run.storage_path)
    run_dir = Path(storage) / name if "://" not in storage else Path(tempfile.gettempdir()) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def make_trainer(
    cfg: ExperimentConfig,
    data_dir: str,
    manifest: dict[str, Any],
    name: str,
    run_id: str,
    callbacks: list | None = None,
    keep_best: bool = False,
):
    """The TorchTrainer of one training run (also what each Tune trial runs). ``keep_best``
    ranks kept checkpoints by validation bits/byte; otherwise the latest are kept."""
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = storage_path(cfg.run.storage_path)
    run_dir = local_run_dir(cfg, name)
    return TorchTrainer(
        train_func,
        train_loop_config={
            "experiment": to_dict(cfg),
            "mlflow": {"uri": tracking_uri(), "run_id": run_id},
            "window_bytes": manifest["window_bytes"],
            "total_steps": total_steps(cfg, manifest),
            "run_dir": str(run_dir),
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.run.num_workers,
            use_gpu=cfg.run.use_gpu,
            resources_per_worker={"CPU": cfg.run.cpus_per_worker},
            placement_strategy=cfg.run.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.run.keep_checkpoints,
                checkpoint_score_attribute="val_bpb" if keep_best else None,
                checkpoint_score_order="min",
            ),
            callbacks=callbacks,
        ),
        datasets={split: _quiet(ray.data.read_parquet(shard_paths(data_dir, split))) for split in ("train", "val")},
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )


def log_checkpoint(client, run_id: str, checkpoint, directory: Path) -> Path:
    """Copy a Ray Train checkpoint's model files to ``directory`` and log them to the run."""
    with checkpoint.as_directory() as d:
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        for f in ("config.json", "model.safetensors"):
            shutil.copy(Path(d) / f, directory / f)
    client.log_artifacts(run_id, str(directory), "checkpoint")
    return directory


def run(
    cfg: ExperimentConfig, data_dir: str | None = None, name: str | None = None, resume: bool = False
) -> dict[str, Any]:
    """Train ``cfg`` on Ray; return {run_id, name, checkpoint, metrics}."""
    init_ray()
    check_cluster_paths(
        {"run.storage_path": cfg.run.storage_path, "data.output_dir": data_dir or cfg.data.output_dir},
        tracking_uri(),
    )
    data_dir, manifest = ensure_data(cfg, data_dir)
    client = mlflow_client()
    if resume:
        mlrun = _find_run(client, experiment_id(client, cfg.run.experiment), name, cfg.name)
        name, run_id = mlrun.data.tags["ray_run_name"], mlrun.info.run_id
        client.update_run(run_id, status="RUNNING")
        print(f"resuming Ray Train run {name} in MLflow run {run_id}")
    else:
        name = name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_id = open_mlflow_run(client, cfg, name, data_dir, manifest)
    trainer = make_trainer(cfg, data_dir, manifest, name, run_id)
    started_ms = int(time.time() * 1000)

    def failures() -> int:
        """Worker group restarts after failures in this fit: its worker group starts but the first."""
        history = client.get_metric_history(run_id, "worker_group_start_step")
        return max(0, len([m for m in history if m.timestamp >= started_ms]) - 1)

    try:
        result = trainer.fit()
    except Exception as e:
        client.set_terminated(run_id, status="FAILED")
        print(
            f"training failed after {failures()} recovered worker group failure(s) "
            f"(run.max_failures={cfg.run.max_failures}): {type(e).__name__}: {e}",
            flush=True,
        )
        raise
    recovered = failures()
    client.set_tag(run_id, "worker_group_failures", str(recovered))
    if recovered:
        print(
            f"recovered from {recovered} worker group failure(s) (run.max_failures={cfg.run.max_failures}): "
            "each restart resumed from the latest checkpoint there was",
            flush=True,
        )
    out: dict[str, Any] = {"run_id": run_id, "name": name, "metrics": dict(result.metrics or {})}
    if result.checkpoint is not None:
        final = local_run_dir(cfg, name) / "final_checkpoint"
        out["checkpoint"] = str(log_checkpoint(client, run_id, result.checkpoint, final))
    with tempfile.TemporaryDirectory() as d:
        png = plot_history(client, run_id, Path(d) / "training_curves.png")
        client.log_artifact(run_id, str(png), "plots")
    client.set_terminated(run_id, status="FINISHED")
    return out


def _quiet(ds):
    """No progress bars for the datasets workers stream: one per epoch and worker is noise."""
    ds.context.enable_progress_bars = False
    return ds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="experiment YAML (configs/*.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--data", help="prepared data directory (default: data.output_dir)")
    ap.add_argument("--name", help="Ray Train run name (default: <config name>-<time>)")
    ap.add_argument(
        "--resume", action="store_true", help="continue a run from its latest checkpoint, in the same MLflow run"
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cfg = load_config(args.config, args.set)
    print(dump_config(cfg))
    out = run(cfg, args.data, args.name, args.resume)
    m = out["metrics"]
    print(
        f"\nrun {out['name']} finished: step {m.get('step')}, loss {m.get('loss', float('nan')):.4f}, val bits/byte {m.get('val_bpb', float('nan')):.3f}"
    )
    print(f"MLflow run {out['run_id']} at {tracking_uri()}; checkpoint {out.get('checkpoint')}")
    return out


if __name__ == "__main__":
    main()
