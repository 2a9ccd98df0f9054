"""Data at scale, measured in one run on this machine:

1. A corpus of text already on the machine (no download; not the built-in one), written into a
   temp dir as many files, and one file cut from it (the single-file case).
2. pipelines/prepare_data.py (Ray Data), pipelines/train.py (configs/small.yaml, a short run on
   2 workers; on the one-file corpus and on the whole one, so memory can be read against the
   corpus's size) and pipelines/evaluate.py, each a subprocess that starts its own local Ray
   cluster (its own RAY_TMPDIR; MLflow in a SQLite file of the temp dir). For each: the
   machine's memory in use (MemTotal - MemAvailable) above the level just before it, sampled
   every 0.2 s, and its process tree's PSS (proportional set size: shared pages counted once;
   other work on the machine not counted), by kind of process at its peak. Goal: <= 2 GB.
3. prepare's throughput: MB of corpus text per second of prepare() (the figure the CLI
   prints: a fresh cluster, Ray's own start excluded, its first tasks' worker start-up
   included), the median of ``--prepare-runs`` such runs (each a fresh cluster; memory: the
   worst), and in steady state (a second preparation in the same cluster). Goal >= 10 MB/s.
   ``--cold`` (root) first drops the page cache and prepares once more, as the first run after
   a boot does, reading Ray's, the libraries' and the corpus's files from disk (not in the goal).
   ``--compare-with REV`` prepares the same corpus with REV's pipelines/ first, for figures
   before and after, and checks that both hold the same documents, split and windows.
4. Rank 0's RSS over each training run (its RayTrainWorker process, read from /proc) at its
   first, middle and last step (the steps' MLflow timestamps). Flat: the last within 10% of
   the middle (the first steps still warm up: Ray Data's first blocks, the allocator).
5. The one-file corpus: its pieces' split, and that every window lies inside one piece, of
   the split its shard belongs to, with the file's bytes at that place.

    python benchmarks/scale.py --out benchmarks/results/scale.json [--corpus-mb 80] [--cold] [--compare-with REV]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from procmem import end_leftovers, machine_load, public, run_measured  # noqa: E402

GB = 1 << 30
MB = 1e6
SKIP_SUFFIXES = {".json", ".jsonl", ".ndjson", ".parquet"}  # prepare reads these as records, not text


# -- the corpus ------------------------------------------------------------------------------


def _sources() -> list[tuple[str, list[Path]]]:
    """(name, files) of the text this machine has, in the order they are taken."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    py = [p for p in sorted(stdlib.rglob("*.py")) if not {"site-packages", "dist-packages"} & set(p.parts)]
    vim = sorted(Path("/").glob("usr/share/vim/vim*/doc/*.txt"))
    doc = sorted(p for p in Path("/usr/share/doc").rglob("*") if p.is_file() and not p.is_symlink())
    man = sorted(p for p in Path("/usr/share/man").rglob("*.gz") if p.is_file() and not p.is_symlink())
    return [("python-stdlib", py), ("vim-help", vim), ("usr-share-doc", doc), ("man-pages", man)]


def _text_of(path: Path) -> bytes | None:
    """The file's text (gunzipped), or None where it is not UTF-8 text."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        if not raw.strip() or b"\x00" in raw[:8192]:
            return None
        raw.decode("utf-8")
        return raw
    except (OSError, EOFError, gzip.BadGzipFile, UnicodeDecodeError):
        return None


def build_corpus(dest: Path, target: int) -> dict:
    """Copy text files into ``dest`` (one folder per source) until ``target`` bytes."""
    total, parts, skipped = 0, [], 0
    for name, files in _sources():
        n = size = 0
        for f in files:
            if total >= target:
                break
            raw = _text_of(f)
            rel = Path(str(f).lstrip("/")).with_suffix("") if f.suffix == ".gz" else Path(str(f).lstrip("/"))
            if raw is None or rel.suffix.lower() in SKIP_SUFFIXES:
                skipped += 1
                continue
            out = dest / name / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(raw)
            n, size, total = n + 1, size + len(raw), total + len(raw)
        if n:
            parts.append({"source": name, "files": n, "bytes": size})
    return {"bytes": total, "files": sum(p["files"] for p in parts), "parts": parts, "skipped_not_utf8_text": skipped}


def one_file(corpus: Path, dest: Path, target: int) -> dict:
    """The corpus's files joined in order until ``target`` bytes: one file."""
    size, used = 0, 0
    with open(dest, "wb") as out:
        for f in sorted(p for p in corpus.rglob("*") if p.is_file()):
            if size >= target:
                break
            size += out.write(f.read_bytes())
            used += 1
    return {"path": dest.name, "bytes": size, "files_joined": used}


# -- the checks ------------------------------------------------------------------------------


def _sorted_windows(data_dir: Path, split: str):
    """A split's windows sorted by (doc_id, offset), from its shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.common import shard_paths

    table = pa.concat_tables(pq.read_table(p) for p in shard_paths(data_dir, split))
    return table.sort_by([("doc_id", "ascending"), ("offset", "ascending")])


def same_data(a: Path, b: Path) -> dict:
    """Whether two prepared directories hold the same documents, split and windows, and which
    of their shard files are byte for byte the same."""
    from pipelines.common import read_manifest

    ma, mb = read_manifest(a), read_manifest(b)
    out = {"documents_file_identical": (a / "documents.parquet").read_bytes() == (b / "documents.parquet").read_bytes()}
    out["splits_identical"] = ma["splits"] == mb["splits"]
    for split in ("train", "val"):
        out[f"{split}_windows_identical_as_a_set"] = _sorted_windows(a, split).equals(_sorted_windows(b, split))
        shards = [[s["sha256"] for s in m["shards"] if s["split"] == split] for m in (ma, mb)]
        out[f"{split}_shards_byte_identical"] = shards[0] == shards[1]
    return out


def check_one_file(data_dir: Path, source: Path) -> dict:
    """Every window inside its piece, its piece in its shard's split, its bytes the file's."""
    import numpy as np
    import pyarrow.parquet as pq

    from pipelines.common import read_manifest, window_bytes

    manifest = read_manifest(data_dir)
    width = manifest["window_bytes"]
    docs = sorted(pq.read_table(data_dir / "documents.parquet").to_pylist(), key=lambda d: d["start"])
    raw = np.frombuffer(source.read_bytes(), np.uint8)
    view = np.lib.stride_tricks.sliding_window_view(raw, width)
    index = {d["doc_id"]: i for i, d in enumerate(docs)}
    starts = np.array([d["start"] for d in docs])
    sizes = np.array([d["bytes"] for d in docs])
    crossing = wrong_split = wrong_bytes = 0
    for shard in manifest["shards"]:
        table = pq.read_table(data_dir / shard["file"])
        piece = np.array([index[i] for i in table.column("doc_id").to_pylist()])
        offset = table.column("offset").to_numpy()
        crossing += int(np.count_nonzero(offset + width > sizes[piece]))
        wrong_split += sum(docs[i]["split"] != shard["split"] for i in set(piece.tolist()))
        rows = window_bytes(table.column("bytes"))
        wrong_bytes += int(np.count_nonzero((rows != view[starts[piece] + offset]).any(axis=1)))
    contiguous = all(a["start"] + a["bytes"] == b["start"] for a, b in zip(docs, docs[1:]))
    s = manifest["splits"]
    return {
        "pieces": {split: s[split]["documents"] for split in ("train", "val")},
        "windows": {split: s[split]["windows"] for split in ("train", "val")},
        "pieces_cover_the_file": contiguous and docs[0]["start"] == 0 and int(sizes.sum()) == raw.size,
        "windows_crossing_a_piece": crossing,
        "pieces_in_the_wrong_split": wrong_split,
        "windows_not_the_files_bytes": wrong_bytes,
    }


def rank0_rss(train: dict, run_id: str, env: dict) -> dict:
    """Rank 0's RSS (its pid from its "workers on nodes" line) at its first, middle and last step."""
    from mlflow.tracking import MlflowClient

    ansi = re.compile(r"\x1b\[[0-9;]*m")
    rank0 = None
    for _, line in train["_lines"]:
        m = re.search(r"\(RayTrainWorker pid=(\d+)[,)].*workers on nodes", ansi.sub("", line))
        if m:
            rank0 = int(m.group(1))
            break
    samples = [(t, rss) for t, pid, rss in train["_workers"] if pid == rank0]
    history = sorted(MlflowClient(env["MLFLOW_TRACKING_URI"]).get_metric_history(run_id, "loss"), key=lambda m: m.step)
    if not samples or not history:
        return {"error": f"no samples of rank 0 (pid {rank0}) or no steps logged"}

    def at(ms: int) -> int:
        return min(samples, key=lambda s: abs(s[0] - ms / 1000))[1]

    first, middle, last = (at(history[i].timestamp) for i in (0, len(history) // 2, -1))
    return {
        "pid": rank0,
        "first_step": history[0].step,
        "last_step": history[-1].step,
        "rss_at_first_step_mb": round(first / MB),
        "rss_at_middle_step_mb": round(middle / MB),
        "rss_at_last_step_mb": round(last / MB),
        "rss_growth_mb": round((last - first) / MB),
        "rss_growth_from_middle_mb": round((last - middle) / MB),
        "rss_peak_mb": round(max(r for _, r in samples) / MB),
        "training_seconds": round((history[-1].timestamp - history[0].timestamp) / 1000, 1),
    }


# -- the benchmark ---------------------------------------------------------------------------


def _steady(config: str, input_dir: str, out: str) -> None:
    """(subprocess) prepare twice in one cluster: the second is steady state."""
    from bitlm.config import load_config
    from pipelines.common import init_ray
    from pipelines.prepare_data import prepare

    cfg = load_config(config, [f"data.inputs=[{input_dir}]"]).data
    init_ray(quiet=True)
    seconds = []
    for _ in range(2):
        t = time.perf_counter()
        prepare(cfg, None, out, quiet=True)
        seconds.append(time.perf_counter() - t)
    print("STEADY " + json.dumps(seconds))


def _export(rev: str, dest: Path) -> Path:
    """REV's pipelines/ in ``dest``, beside this checkout's bitlm/ (read-only git commands)."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev, "pipelines"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    (dest / "bitlm").symlink_to(ROOT / "bitlm")
    return dest / "pipelines" / "prepare_data.py"


def main() -> None:
    from pipelines.common import read_manifest

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/scale.json")
    ap.add_argument("--config", default=str(ROOT / "configs" / "small.yaml"))
    ap.add_argument("--corpus-mb", type=float, default=80, help="the many-file corpus (goal: >= 64)")
    ap.add_argument("--one-file-mb", type=float, default=24, help="the single-file corpus (goal: >= 20)")
    ap.add_argument("--one-file-chunk-bytes", type=int, help="data.chunk_bytes for it (default: the config's)")
    ap.add_argument("--prepare-runs", type=int, default=3, help="fresh-cluster preparations of the corpus (median)")
    ap.add_argument(
        "--cold", action="store_true", help="first, a preparation after dropping the page cache (root): as after a boot"
    )
    ap.add_argument("--steps", type=int, default=150, help="training steps")
    ap.add_argument("--eval-max-bytes", type=int, default=131072, help="evaluate.py --max-bytes")
    ap.add_argument("--compare-with", metavar="REV", help="also prepare with this git revision's pipelines/")
    ap.add_argument("--steady", nargs=3, metavar=("CONFIG", "INPUT", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steady:
        return _steady(*args.steady)
    py = sys.executable
    result: dict = {"machine": {"cpus": os.cpu_count(), "before": machine_load()}}
    with tempfile.TemporaryDirectory(prefix="bitlm-scale-", ignore_cleanup_errors=True) as t:
        tmp = Path(t)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db", RAY_TMPDIR=str(tmp / "r"), PYTHONUNBUFFERED="1")
        (tmp / "r").mkdir()
        corpus, single = tmp / "corpus", tmp / "one" / "one.txt"
        single.parent.mkdir()
        result["corpus"] = build_corpus(corpus, int(args.corpus_mb * MB))
        result["one_file"] = one_file(corpus, single, int(args.one_file_mb * MB))
        print(f"corpus: {result['corpus']['bytes'] / MB:.1f} MB in {result['corpus']['files']} files; "
              f"one file of {result['one_file']['bytes'] / MB:.1f} MB", flush=True)  # fmt: skip
        size = result["corpus"]["bytes"]
        cfg = ["--config", args.config, "--set", f"data.inputs=[{corpus}]"]
        steps: dict[str, dict] = {}

        def prepare(name: str, script: Path, inputs: list[str], out: Path, text: int) -> dict:
            step = run_measured(name, [py, str(script), *inputs, "--output", str(out)], env, tmp / f"{name}.log", ROOT)
            manifest = json.loads((out / "manifest.json").read_text())
            step.update(
                prepare_seconds=manifest["seconds"],
                MBps=round(text / MB / manifest["seconds"], 2),
                MBps_with_ray_start=round(text / MB / step["seconds"], 2),
                splits=manifest["splits"],
                shards=len(manifest["shards"]),
                rejected=manifest["rejected_total"],
            )
            print(f"{name}: {public(step)}", flush=True)
            return step

        prep = ROOT / "pipelines" / "prepare_data.py"
        if args.compare_with:
            base = _export(args.compare_with, tmp / "base")
            steps["prepare_before"] = prepare("prepare_before", base, cfg, tmp / "prepared-before", size)
            steps["prepare_before"]["revision"] = args.compare_with
        if args.cold:  # Ray's, the libraries' and the corpus's files read from disk again
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            steps["prepare_cold"] = prepare("prepare_cold", prep, cfg, tmp / "prepared-cold", size)
        steps["prepare"] = prepare("prepare", prep, cfg, tmp / "prepared", size)
        runs = [steps["prepare"]] + [
            prepare(f"prepare_again_{i}", prep, cfg, tmp / f"prepared-{i}", size) for i in range(1, args.prepare_runs)
        ]
        keys = ("seconds", "prepare_seconds", "MBps", "machine_peak_above_baseline_mb", "process_tree_pss_peak_mb")
        steps["prepare"]["runs"] = [{k: r[k] for k in keys} for r in runs]
        steps["prepare"]["MBps_median"] = statistics.median(r["MBps"] for r in runs)
        twice = [py, __file__, "--steady", args.config, str(corpus), str(tmp / "steady")]
        steps["prepare_twice_in_one_cluster"] = step = run_measured(
            "prepare_twice", twice, env, tmp / "twice.log", ROOT
        )
        seconds = json.loads(next(line for _, line in step["_lines"] if line.startswith("STEADY "))[7:])
        step.update(prepare_seconds=[round(x, 2) for x in seconds], MBps=round(size / MB / seconds[1], 2))
        one_cfg = ["--config", args.config, "--set", f"data.inputs=[{single}]"]
        if args.one_file_chunk_bytes:
            one_cfg += ["--set", f"data.chunk_bytes={args.one_file_chunk_bytes}"]
        steps["prepare_one_file"] = prepare(
            "prepare_one_file", prep, one_cfg, tmp / "prepared-one", result["one_file"]["bytes"]
        )

        def train(name: str, data_cfg: list[str], data: Path) -> dict:
            cmd = [py, str(ROOT / "pipelines" / "train.py"), *data_cfg, "--data", str(data), "--name", name]
            cmd += ["--set", f"train.max_steps={args.steps}", "--set", f"run.storage_path={tmp / 'runs'}"]
            step = run_measured(name, cmd, env, tmp / f"{name}.log", ROOT)
            found = (re.search(r"MLflow run (\w+) at", line) for _, line in step["_lines"])
            step["rank0"] = rank0_rss(step, next(m.group(1) for m in found if m), env)
            step["data_text_mb"] = round(sum(s["bytes"] for s in read_manifest(data)["splits"].values()) / MB, 1)
            print(f"{name}: {public(step)}", flush=True)
            return step

        steps["train_one_file"] = train("train_one_file", one_cfg, tmp / "prepared-one")
        steps["train"] = train("train", cfg, tmp / "prepared")
        checkpoint = tmp / "runs" / "train" / "final_checkpoint"
        eval_cmd = [py, str(ROOT / "pipelines" / "evaluate.py"), "--checkpoint", str(checkpoint)]
        eval_cmd += ["--data", str(tmp / "prepared"), "--max-bytes", str(args.eval_max_bytes)]
        steps["evaluate"] = run_measured("evaluate", eval_cmd, env, tmp / "evaluate.log", ROOT)
        steps["evaluate"]["table"] = [line.rstrip() for _, line in steps["evaluate"]["_lines"] if line.startswith("|")]
        result["checks"] = {
            "one_file": check_one_file(tmp / "prepared-one", single),
            "same_shards_from_two_clusters": json.loads((tmp / "prepared" / "manifest.json").read_text())["shards"]
            == json.loads((tmp / "steady" / "manifest.json").read_text())["shards"],
        }
        if args.compare_with:
            result["checks"]["same_as_before"] = same_data(tmp / "prepared-before", tmp / "prepared")
        result["steps"] = {k: public(v) for k, v in steps.items()}
        result["leftover_processes_ended"] = end_leftovers(tmp)
    result["machine"]["after"] = machine_load()
    # The load before: other work (the load after is this run's own).
    result["machine"]["shared_with_other_work"] = result["machine"]["before"]["loadavg_1_5_15"][0] > 1.0
    from bitlm.config import load_config, to_dict

    result["data_config"] = {"config": Path(args.config).name, **to_dict(load_config(args.config).data)}
    result["goals"] = goals(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


def _worst(step: dict, key: str):
    """The worst (largest) ``key`` over a step's fresh-cluster runs, or the step's own."""
    return max(r[key] for r in step.get("runs", [step]))


def goals(result: dict) -> dict[str, bool]:
    s, one, rank0 = result["steps"], result["checks"]["one_file"], result["steps"]["train"]["rank0"]
    out = {
        "corpus_ge_64MB": result["corpus"]["bytes"] >= 64 * MB,
        "one_file_ge_20MB": result["one_file"]["bytes"] >= 20 * MB,
    }
    for name in ("prepare", "prepare_one_file", "train", "train_one_file", "evaluate"):
        out[f"{name}_memory_le_2GB"] = _worst(s[name], "machine_peak_above_baseline_mb") * MB <= 2 * GB
        out[f"{name}_process_tree_pss_le_2GB"] = _worst(s[name], "process_tree_pss_peak_mb") * MB <= 2 * GB
    out["prepare_ge_10MBps"] = s["prepare"]["MBps_median"] >= 10
    # Flat after the warm-up: from the middle step to the last (the first steps run while Ray
    # Data's first blocks arrive and the allocator grows: rss_growth_mb has that too).
    out["rank0_rss_flat_from_middle_within_10pct"] = (
        "rss_growth_from_middle_mb" in rank0
        and abs(rank0["rss_growth_from_middle_mb"]) <= 0.1 * rank0["rss_at_middle_step_mb"]
    )
    bad = one["windows_crossing_a_piece"] + one["pieces_in_the_wrong_split"] + one["windows_not_the_files_bytes"]
    out["one_file_splits_apart"] = min(one["windows"].values()) > 0 and bad == 0 and one["pieces_cover_the_file"]
    return out


def table(result: dict) -> str:
    s = result["steps"]
    lines = [
        "| step | seconds | MB/s of text | machine memory above baseline (MB) | process tree PSS peak (MB) |",
        "|---|---|---|---|---|",
    ]
    for name, step in s.items():
        rate = step.get("MBps", "")
        if "runs" in step:  # the median of the fresh-cluster runs, and each
            rate = f"{step['MBps_median']} (runs: {', '.join(str(r['MBps']) for r in step['runs'])})"
        machine, pss = _worst(step, "machine_peak_above_baseline_mb"), _worst(step, "process_tree_pss_peak_mb")
        lines.append(f"| {name} | {step['seconds']} | {rate} | {machine} | {pss} |")
    r = s["train"]["rank0"]
    one = result["checks"]["one_file"]
    lines += [
        "",
        "| training on | text MB | machine memory above baseline (MB) | process tree PSS peak (MB) | rank 0 RSS first -> last step (MB) |",
        "|---|---|---|---|---|",
    ]
    for name in ("train_one_file", "train"):
        t = s[name]
        lines.append(
            f"| {name} | {t['data_text_mb']} | {t['machine_peak_above_baseline_mb']} | {t['process_tree_pss_peak_mb']} | "
            f"{t['rank0'].get('rss_at_first_step_mb')} -> {t['rank0'].get('rss_at_last_step_mb')} |"
        )
    lines += [
        "",
        f"corpus {result['corpus']['bytes'] / MB:.1f} MB in {result['corpus']['files']} files "
        f"({', '.join(p['source'] for p in result['corpus']['parts'])}); one file {result['one_file']['bytes'] / MB:.1f} MB",
        f"rank 0 RSS: {r.get('rss_at_first_step_mb')} MB at step {r.get('first_step')}, "
        f"{r.get('rss_at_last_step_mb')} MB at step {r.get('last_step')} (peak {r.get('rss_peak_mb')} MB)",
        f"one file: pieces {one['pieces']}, windows {one['windows']}, crossing a piece {one['windows_crossing_a_piece']}",
        f"load before/after: {result['machine']['before']['loadavg_1_5_15']} / {result['machine']['after']['loadavg_1_5_15']}",
        "goals: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in result["goals"].items()),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
