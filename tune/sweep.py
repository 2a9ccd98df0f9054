"""Hyperparameter, curriculum and scaling sweeps: Ray Tune over Ray Train runs, in MLflow.

    python tune/sweep.py --config configs/sweeps/lr_width.yaml [--set sweep.num_samples=8]
    python tune/sweep.py --config configs/sweeps/lr_width.yaml --resume [--name NAME]
    ray job submit --working-dir . -- python tune/sweep.py --config configs/sweeps/curriculum.yaml

A sweep file (``sweep:``, bitlm.config.SweepConfig) names a base experiment config, a search
space over any of its dotted keys, the metric (validation bits/byte), the scheduler (ASHA by
default, ``fifo``, or ``scaling`` for progressive scaling, see tune/scaling.py), samples,
concurrency and the CPUs of each trial's driver.

Each trial is a Tune function trainable that drives one Ray Train run of the same
``TorchTrainer`` pipelines/train.py builds (same per-worker function, same prepared shards);
its metrics reach the scheduler through ``TuneReportCallback`` and the project's own ``step``
is the scheduler's clock. MLflow gets one parent run per sweep (space, scheduler, best trial,
a results table and a plot of validation bits/byte against step for every trial) and one
child run per trial (its params, metric histories, best checkpoint). An interrupted sweep
continues with ``--resume`` (Tuner.restore) and ends with the same set of trials.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bitlm.config import (  # noqa: E402
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    dump_config,
    from_dict,
    load_config,
    to_dict,
)
from bitlm.sweep_config import SweepConfig, load_sweep  # noqa: E402
from pipelines.common import check_cluster_paths, init_ray, read_manifest, storage_path  # noqa: E402
from pipelines.tracking import experiment_id, log_checkpoint, mlflow_client, open_run, tracking_uri  # noqa: E402

# Functions, not the module: the trial function is pickled by value, and a module object
# would drag the whole of pipelines.train (and torch's config modules) along.
from pipelines.train import check_gpus, ensure_data, local_run_dir, make_trainer  # noqa: E402

# -- one trial (runs in a Tune trial actor) ------------------------------------------------------


def trial_config(config: dict[str, Any]) -> ExperimentConfig:
    """The experiment a trial trains: the base with the sampled (and grown) keys applied."""
    return apply_overrides(
        from_dict(ExperimentConfig, config["_base"]), {k: v for k, v in config.items() if not k.startswith("_")}
    )


def trial_fn(config: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    os.environ["MLFLOW_TRACKING_URI"] = config["_mlflow_uri"]
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(config)
    client = MlflowClient(config["_mlflow_uri"])
    exp = experiment_id(client, cfg.run.experiment)
    name = f"{config['_sweep']}-{trial_id}"
    existing = client.search_runs([exp], f"tags.trial_id = '{trial_id}' and tags.sweep = '{config['_sweep']}'")
    data_dir = config["_data_dir"]
    manifest = read_manifest(data_dir)
    if existing:  # restarted: resumed after an interruption, or grown by the scaling scheduler
        run_id = existing[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        tags = {"mlflow.parentRunId": config["_parent"], "trial_id": trial_id, "sweep": config["_sweep"]}
        run_id = open_run(client, cfg, name, data_dir, manifest, tags)
    for key in ("model.num_layers", "model.d_model", "model.max_seq_len"):  # sizes change: metrics, not params
        section, field = key.split(".")
        client.log_metric(run_id, f"size_{field}", getattr(getattr(cfg, section), field), step=0)
    trainer = make_trainer(cfg, data_dir, manifest, name, run_id, callbacks=[TuneReportCallback()], keep_best=True)
    result = trainer.fit()
    if result.best_checkpoints:
        best, _ = min(result.best_checkpoints, key=lambda cm: cm[1].get("val_bpb", math.inf))
        log_checkpoint(client, run_id, best, local_run_dir(cfg, name) / "best_checkpoint")
    client.set_terminated(run_id, status="FINISHED")


# -- the sweep (driver) --------------------------------------------------------------------------


def search_space(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from ray import tune

    samplers = {
        "choice": lambda s: tune.choice(s["values"]),
        "grid": lambda s: tune.grid_search(s["values"]),
        "uniform": lambda s: tune.uniform(s["low"], s["high"]),
        "loguniform": lambda s: tune.loguniform(s["low"], s["high"]),
        "randint": lambda s: tune.randint(s["low"], s["high"]),
    }
    return {key: samplers[spec["type"]](spec) for key, spec in space.items()}


def make_scheduler(sweep: SweepConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = sweep.scheduler
    if s.type == "asha":
        return ASHAScheduler(
            time_attr="step", max_t=s.max_t, grace_period=s.grace_period, reduction_factor=s.reduction_factor
        )
    if s.type == "scaling":
        from tune.scaling import ProgressiveScalingScheduler

        return ProgressiveScalingScheduler(
            sweep.metric, sweep.mode, s.patience, s.min_delta, s.strategies, s.max_params
        )
    return FIFOScheduler()


def _parent_run(client, exp_id: str, name: str, sweep: SweepConfig, base: ExperimentConfig, resume: bool) -> str:
    found = client.search_runs([exp_id], f"tags.sweep_parent = '{name}'")
    if found:
        if not resume:
            raise SystemExit(f"sweep {name} exists already: pass --resume to continue it, or another --name")
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=name, tags={"sweep_parent": name, "sweep": name})
    params = {
        "space": json.dumps(sweep.space)[:6000],
        "scheduler": sweep.scheduler.type,
        "metric": sweep.metric,
        "mode": sweep.mode,
        "num_samples": sweep.num_samples,
        "max_concurrent_trials": sweep.max_concurrent_trials,
        "base": sweep.base,
        **{f"scheduler.{k}": v for k, v in to_dict(sweep.scheduler).items()},
    }
    for k, v in params.items():
        client.log_param(run.info.run_id, k, str(v)[:6000])
    with tempfile.TemporaryDirectory() as d:
        Path(d, "base_config.yaml").write_text(dump_config(base))
        client.log_artifact(run.info.run_id, str(Path(d, "base_config.yaml")))
    return run.info.run_id


def summarize(
    client, exp_id: str, name: str, sweep: SweepConfig, results, max_steps: int | None
) -> list[dict[str, Any]]:
    """One row per trial: id, sampled params, best validation metric, steps, status."""
    children = {
        r.data.tags["trial_id"]: r
        for r in client.search_runs([exp_id], f"tags.sweep = '{name}' and tags.trial_id != ''")
    }
    rows = []
    for result in results:
        trial_id = (result.metrics or {}).get("trial_id") or _trial_id_from_path(result.path)
        run = children.get(trial_id)
        history = client.get_metric_history(run.info.run_id, sweep.metric) if run else []
        values = [m.value for m in history]
        best = (min(values) if sweep.mode == "min" else max(values)) if values else math.nan
        steps = int(max((m.step for m in history), default=0))
        if result.error is not None:
            status = "error"
        elif max_steps and steps < max_steps:
            status = "stopped early"
        else:
            status = "completed"
        params = {k: v for k, v in (result.config or {}).items() if not k.startswith("_")}
        growths = (result.config or {}).get("_growths", [])
        rows.append(
            {
                "trial": trial_id,
                "params": params,
                f"best_{sweep.metric}": best,
                "steps": steps,
                "status": status,
                "growths": growths,
                "run_id": run.info.run_id if run else None,
            }
        )
        if run is not None:
            client.set_tag(run.info.run_id, "trial_status", status)
            if run.info.status == "RUNNING":  # a trial the scheduler stopped ends its run here
                client.set_terminated(run.info.run_id, status="FINISHED" if status != "error" else "FAILED")
    return sorted(
        rows,
        key=lambda r: (
            math.isnan(r[f"best_{sweep.metric}"]),
            r[f"best_{sweep.metric}"] * (1 if sweep.mode == "min" else -1),
        ),
    )


def _trial_id_from_path(path: str | None) -> str | None:
    """Tune names a trial's directory ``<trainable>_<trial id>_<index>_...``; ids look like
    ``a1b2c_00000``."""
    import re

    match = re.search(r"([0-9a-f]{5}_\d{5})", Path(path).name) if path else None
    return match.group(1) if match else None


def table(rows: list[dict[str, Any]], metric: str) -> str:
    lines = [f"| trial | params | best {metric} | steps | status | growths |", "|---|---|---|---|---|---|"]
    for r in rows:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["params"].items())
        lines.append(
            f"| {r['trial']} | {params} | {r[f'best_{metric}']:.4f} | {r['steps']} | {r['status']} | {'+'.join(r['growths'])} |"
        )
    return "\n".join(lines)


def plot_trials(client, rows: list[dict[str, Any]], metric: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        if r["run_id"]:
            hist = sorted(client.get_metric_history(r["run_id"], metric), key=lambda m: m.step)
            ax.plot(
                [m.step for m in hist], [m.value for m in hist], marker="o", ms=3, label=f"{r['trial']} ({r['status']})"
            )
    ax.set_xlabel("training step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def run_sweep(
    sweep: SweepConfig, name: str | None = None, resume: bool = False, base_overrides: list[str] | None = None
) -> dict[str, Any]:
    import ray
    from ray import tune

    base = load_config(
        ROOT / sweep.base if not Path(sweep.base).is_absolute() else sweep.base, [*sweep.set, *(base_overrides or [])]
    )
    base.check_platform()
    if sweep.scheduler.type == "scaling" and base.run.strategy != "ddp":
        raise ConfigError(
            f"sweep.scheduler.type=scaling is not supported with run.strategy={base.run.strategy}: "
            "a grown model is rebuilt from the checkpoint and its optimizer state remapped, which only ddp does"
        )
    init_ray()
    check_gpus(base, ray.cluster_resources())  # each trial's workers, with the base's run settings
    check_cluster_paths({"storage_path": sweep.storage_path, "data.output_dir": base.data.output_dir}, tracking_uri())
    data_dir, _ = ensure_data(base)
    storage = storage_path(sweep.storage_path)
    if name is None and resume:
        found = sorted(Path(storage).glob(f"{sweep.name}-*"), key=os.path.getmtime) if "://" not in storage else []
        if not found:
            raise SystemExit(f"--resume: no sweep named {sweep.name}-* in {storage}")
        name = found[-1].name
    name = name or f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    client = mlflow_client()
    exp_id = experiment_id(client, base.run.experiment)
    parent = _parent_run(client, exp_id, name, sweep, base, resume)
    # Trials' Train runs keep their checkpoints beside the sweep.
    base = apply_overrides(
        base,
        {
            "run.storage_path": str(Path(storage) / name / "train")
            if "://" not in storage
            else f"{storage}/{name}/train"
        },
    )
    trainable = tune.with_resources(trial_fn, {"cpu": sweep.cpus_per_trial})
    path = f"{storage}/{name}"
    if resume and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        param_space = {
            **search_space(sweep.space),
            "_base": to_dict(base),
            "_sweep": name,
            "_parent": parent,
            "_mlflow_uri": tracking_uri(),
            "_data_dir": data_dir,
            "_max_steps": base.train.max_steps,
        }
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=sweep.metric,
                mode=sweep.mode,
                scheduler=make_scheduler(sweep),
                num_samples=sweep.num_samples,
                max_concurrent_trials=sweep.max_concurrent_trials,
            ),
            run_config=tune.RunConfig(name=name, storage_path=storage),
        )
    results = tuner.fit()
    rows = summarize(client, exp_id, name, sweep, results, base.train.max_steps)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "results.md").write_text(table(rows, sweep.metric) + "\n")
        (Path(d) / "results.json").write_text(json.dumps(rows, indent=2, default=str))
        plot_trials(client, rows, sweep.metric, Path(d) / f"{sweep.metric}_by_step.png")
        client.log_artifacts(parent, d)
    finite = [r for r in rows if not math.isnan(r[f"best_{sweep.metric}"])]
    if finite:
        client.set_tag(parent, "best_trial", finite[0]["trial"])
        client.log_metric(parent, f"best_{sweep.metric}", finite[0][f"best_{sweep.metric}"])
    client.set_terminated(parent, status="FINISHED")
    return {"name": name, "parent_run_id": parent, "rows": rows, "path": path}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="sweep YAML (configs/sweeps/*.yaml)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override: sweep.<key>=... for the sweep, any other key for the base experiment",
    )
    ap.add_argument("--name", help="sweep name (default: <sweep name>-<time>)")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted sweep (the latest, or --name)")
    args = ap.parse_args(argv)
    sweep_sets = [s for s in args.set if s.startswith("sweep.")]
    sweep = load_sweep(args.config, sweep_sets)
    out = run_sweep(sweep, args.name, args.resume, [s for s in args.set if not s.startswith("sweep.")])
    print(f"\nsweep {out['name']} (MLflow parent run {out['parent_run_id']}):\n")
    print(table(out["rows"], sweep.metric))
    return out


if __name__ == "__main__":
    main()
