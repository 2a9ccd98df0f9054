"""The guide's ``unified_workflow.py``: train a model from the command line, without Ray.

    python unified_workflow.py --diffusion --diffusion-steps 8 --dataset-size 32
    python unified_workflow.py --diffusion --noise-schedule cosine --diffusion-steps 16
    python unified_workflow.py --diffusion --diffusion-curriculum
    torchrun --nproc_per_node=2 unified_workflow.py --distributed --batch-size 2 --epochs 10
    python unified_workflow.py --dashboard [--checkpoint DIR] [--port 5000]

It trains on ``--dataset-size`` windows of the built-in corpus (the whole training split when
omitted), prints the loss, validation bits/byte and K/C/S, and a sample (by iterative
denoising in diffusion mode). ``--config`` / ``--set`` take the project's YAML configs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from bitlm import BitTransformerLM, bits_to_text, evaluate, sample_text, text_to_bits, train_loop  # noqa: E402
from bitlm.config import apply_overrides, dump_config, load_config  # noqa: E402
from bitlm.corpus import builtin_split, byte_windows  # noqa: E402
from bitlm.model import unwrap  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="unified_workflow.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", help="experiment YAML (default: configs/tiny.yaml settings)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--dataset-size", type=int, help="number of training windows")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--diffusion", action="store_true", help="train by bidirectional denoising")
    ap.add_argument("--diffusion-steps", type=int, help="denoising steps when sampling")
    ap.add_argument("--noise-schedule", choices=["linear", "cosine", "exp"])
    ap.add_argument("--diffusion-curriculum", action="store_true", help="lower the noise over training")
    ap.add_argument("--distributed", action="store_true", help="FSDP over the torchrun process group")
    ap.add_argument("--out", help="save the trained model here")
    ap.add_argument("--dashboard", action="store_true", help="serve the dashboard instead of training")
    ap.add_argument("--checkpoint", help="--dashboard: the checkpoint it serves")
    ap.add_argument("--host", default="127.0.0.1", help="--dashboard: address to bind")
    ap.add_argument("--port", type=int, default=5000, help="--dashboard: port")
    return ap.parse_args(argv)


def _config(args: argparse.Namespace):
    default = ROOT / "configs" / "tiny.yaml"
    cfg = load_config(args.config or (default if default.exists() else None))
    overrides = {
        "train.epochs": args.epochs,
        "train.batch_size": args.batch_size,
        "train.diffusion_steps": args.diffusion_steps,
        "train.noise_schedule": args.noise_schedule,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.diffusion:
        overrides["train.diffusion"] = True
    if args.diffusion_curriculum:
        overrides.update({"train.diffusion": True, "train.diffusion_curriculum": True})
    if args.epochs is not None:
        overrides["train.max_steps"] = None
    return apply_overrides(apply_overrides(cfg, overrides), args.set)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.dashboard:
        from serve.dashboard import run_dashboard

        run_dashboard(args.host, args.port, checkpoint=args.checkpoint)
        return {}
    cfg = _config(args)
    rank, world = 0, 1
    if args.distributed:
        import torch.distributed as dist

        from bitlm.distributed import setup_distributed

        setup_distributed()
        rank, world = dist.get_rank(), dist.get_world_size()
        torch.set_num_threads(1)
    if rank == 0:
        print(dump_config(cfg))
    torch.manual_seed(cfg.train.seed)
    train, val = builtin_split(cfg.data.val_fraction)
    train_w = torch.from_numpy(byte_windows(train, cfg.data.window_bytes, cfg.data.stride_bytes)).long()
    val_w = torch.from_numpy(byte_windows(val, cfg.data.window_bytes)).long()[:256]
    if args.dataset_size:
        train_w = train_w[: args.dataset_size]
    train_w = train_w[rank::world]  # each rank its share
    model = BitTransformerLM(config=cfg.model)
    if args.distributed:
        from bitlm.distributed import wrap_fsdp

        model = wrap_fsdp(model)
    t = cfg.train
    options = {
        k: v for k, v in vars(t).items() if k not in ("epochs", "batch_size", "accum_steps", "amp", "compile_model")
    }
    history = train_loop(
        model,
        train_w,
        epochs=t.epochs,
        batch_size=t.batch_size,
        accum_steps=t.accum_steps,
        amp=t.amp,
        compile_model=t.compile_model,
        log=rank == 0,
        **options,
    )
    result = {"steps": len(history), "loss": history.steps[-1]["loss"]}
    if not cfg.train.diffusion:
        result.update(evaluate(model, val_w, batch_size=32))
    if rank == 0:
        base = unwrap(model)
        last = next(r for r in reversed(history.steps) if "K" in r)  # K, C, S: measured on logged steps
        print(
            f"\n{result['steps']} steps, final loss {result['loss']:.4f}; at step {last['step']}: "
            f"K {last['K']:.3f} C {last['C']:.3f} S {last['S']:.3f}"
        )
        if "val_bpb" in result:
            print(f"validation bits/byte {result['val_bpb']:.3f}")
        if args.distributed:
            pass  # generation on a sharded model needs every rank; sample after loading the checkpoint
        elif cfg.train.diffusion:
            from bitlm.diffusion import diffusion_generate

            prompt = torch.tensor(text_to_bits("The "))
            out = diffusion_generate(
                base, prompt, 8, steps=cfg.train.diffusion_steps, schedule=cfg.train.noise_schedule
            )
            result["sample"] = bits_to_text(out[0, prompt.numel() :], errors="replace")
        else:
            result["sample"] = sample_text(base, "The ", 32, temperature=0.8, seed=0)
        if "sample" in result:
            print(f"sample: {result['sample']!r}")
    if args.out:
        if args.distributed:
            from bitlm.distributed import full_state_dict
            from bitlm.model import save_pretrained

            state = full_state_dict(model)
            if rank == 0:
                save_pretrained(unwrap(model), args.out, state_dict=state)
        else:
            unwrap(model).save_pretrained(args.out)
    if args.distributed:
        import torch.distributed as dist

        dist.barrier()  # nobody tears down gloo while a peer still talks to it
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
