#!/usr/bin/env python
"""Training-step benchmark of trainer/'s model against torch_brain's POYO+, side by side, same run.

What is timed: forward + loss + backward + AdamW step on a batch of ``--batch`` one-second windows at
the papers' configuration (dim 128, 6 self-attention layers, 128 latents, 2 cross-attention heads and
8 self-attention heads of width 64, feed-forward dropout 0.2, residual dropout 0.4). Attention dropout
is 0 on both sides because torch_brain's anchor script cannot set it (its default is 0).

  EPhys   ~60 units x ~20 Hz spikes per window. torch_brain adds a start and an end token per unit and
          pads to the longest window; our windows get the same number of real tokens as its windows.
  OPhys   150 ROIs x 30 frames = 4,500 calcium tokens per window (torch_brain: CalciumPOYOPlus).
  mixed   ours only (torch_brain has no multi-modal model): half EPhys, half OPhys windows.

Each measurement runs in its own process (so peak RSS is per model): torch_brain through
/work/shared/anchors/torch_brain_poyoplus.py with the bench-only venv ``.venv-tb``
(``python3 -m venv .venv-tb && .venv-tb/bin/pip install torch==2.13.0 torch_brain==0.1.2``), ours
through this script's ``--worker`` mode. Ours runs twice: as the papers' equations write it (keys and
queries rotated) and like torch_brain (values rotated too, the same work). The headline
``ratio_vs_torch_brain_cpu`` is torch_brain's time for one EPhys plus one OPhys step over ours, like
for like. Results: a table on stdout and bench/results/model.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ANCHOR = Path("/work/shared/anchors/torch_brain_poyoplus.py")
PAPER = dict(dim=128, depth=6, self_heads=8, cross_heads=2, dim_head=64)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: both sides with bf16 autocast (torch_brain --amp)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--batch", type=int, default=32, help="windows per batch")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--units", type=int, default=60, help="EPhys units per window")
    p.add_argument("--rate", type=float, default=20.0, help="EPhys mean rate (Hz)")
    p.add_argument("--rois", type=int, default=150, help="OPhys ROIs per window")
    p.add_argument("--frame-hz", type=float, default=30.0, help="OPhys frame rate")
    p.add_argument("--tb-python", default=str(REPO / ".venv-tb" / "bin" / "python"),
                   help="python of the torch_brain venv")
    p.add_argument("--skip-torch-brain", action="store_true", help="only time ours")
    p.add_argument("--out", default=None, help="results JSON (default: bench/results/model.json, model_cuda.json on cuda)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- our side (worker)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args) -> None:
    """One measurement of ours, printed as one JSON line. --worker KIND:ROTATE:TOKENS_PER_EPHYS_WINDOW"""
    import torch

    sys.path.insert(0, str(REPO))
    from trainer.model.config import ModelConfig
    from trainer.model.network import MultiModalPOYO, n_parameters
    from trainer.model.synthetic import synthetic_batch

    kind, rotate_values, ephys_tokens = args.worker.split(":")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)  # bf16 autocast on CUDA comes with ModelConfig.amp
    config = ModelConfig(**PAPER, attn_dropout=0.0, rotate_values=rotate_values == "1")
    mods = {"ephys": [0] * args.batch, "ophys": [1] * args.batch,
            "mixed": [0, 1] * (args.batch // 2) + [0] * (args.batch % 2)}[kind]
    n_units, n_sessions = 8 * max(args.units, args.rois), 8
    model = MultiModalPOYO(config=config, n_units=n_units, n_sessions=n_sessions).to(device).train()
    batches = [synthetic_batch(modalities=mods, n_units=n_units, n_sessions=n_sessions, config=config,
                               units_per_sample=args.units, spike_rate_hz=float(ephys_tokens) / args.units,
                               rois_per_sample=args.rois, frame_hz=args.frame_hz, queries_per_sample=1, seed=s)
               for s in range(2)]
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    opt = torch.optim.AdamW(model.parameters(), lr=3.125e-5 * args.batch, weight_decay=1e-4)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rss0 = rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, fwd = [], []
    for i in range(args.warmup + args.steps):
        b = batches[i % 2]
        sync()
        t0 = time.perf_counter()
        loss = model(b)["loss"]
        sync()
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            fwd.append(t1 - t0)
    tokens = statistics.mean(int(b["input_cu_seqlens"][-1]) for b in batches)
    med = statistics.median(times)
    mem = {"peak_mem_MiB": torch.cuda.max_memory_allocated() / 2**20} if device.type == "cuda" else {}
    print(json.dumps({**mem,
        "params_M": n_parameters(model) / 1e6, "params_M_no_vocab": n_parameters(model, embeddings=False) / 1e6,
        "step_s_median": med, "step_s_min": min(times), "fwd_s_median": statistics.median(fwd),
        "real_tokens_per_step": tokens, "padded_tokens_per_step": tokens, "padding_frac": 0.0,
        "real_tokens_per_s": tokens / med, "samples_per_s": args.batch / med,
        "rss_before_MiB": rss0, "peak_rss_MiB_process": peak_rss_mib(), "loss_last": float(loss.detach()),
    }), flush=True)


# ----------------------------------------------------------------------------- orchestration


def run(cmd: list[str], label: str) -> str:
    t0 = time.perf_counter()
    print(f"[bench] {label} ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO))
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise RuntimeError(f"{label} failed (exit {proc.returncode})")
    print(f"[bench] {label} done in {time.perf_counter() - t0:.0f}s", flush=True)
    return proc.stdout


def parse_anchor_line(out: str, tag: str) -> dict:
    """'[train] k=v k=v ...' -> dict (numbers as floats)."""
    for line in out.splitlines():
        if line.startswith(f"[{tag}] "):
            res = {}
            for k, v in re.findall(r"(\w+)=(\S+)", line):
                try:
                    res[k] = float(v)
                except ValueError:
                    res[k] = v
            return res
    raise RuntimeError(f"no [{tag}] line in torch_brain output:\n{out[-2000:]}")


def torch_brain(args) -> dict:
    cmd = [args.tb_python, str(ANCHOR), "--device", args.device, *(["--amp"] if args.device == "cuda" else []),
           "--threads", str(args.threads), "--batch", str(args.batch),
           "--dim", "128", "--depth", "6", "--heads", "8", "--cross-heads", "2", "--dim-head", "64",
           "--min-units", str(args.units), "--max-units", str(args.units),
           "--min-rate", str(args.rate * 0.9), "--max-rate", str(args.rate * 1.1),
           "--sessions", "4", "--session-seconds", "60", "--data-batches", "4",
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--optimizer", "adamw",
           "--calcium-rois", str(args.rois), "--calcium-hz", str(args.frame_hz)]
    out = run(cmd, "torch_brain POYOPlus + CalciumPOYOPlus (anchor script)")
    head = out.splitlines()[0] if out else ""
    return {"versions": head, "ephys": parse_anchor_line(out, "train"), "ophys": parse_anchor_line(out, "train-ca")}


def ours(args, kind: str, rotate_values: bool, ephys_tokens: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", f"{kind}:{int(rotate_values)}:{ephys_tokens}",
           "--device", args.device, "--threads", str(args.threads), "--batch", str(args.batch), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--units", str(args.units), "--rois", str(args.rois),
           "--frame-hz", str(args.frame_hz)]
    out = run(cmd, f"ours {kind}{' (rotated values)' if rotate_values else ''}")
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if args.out is None:
        args.out = str(REPO / "bench" / "results" / ("model.json" if args.device == "cpu" else "model_cuda.json"))
    t_start = time.perf_counter()
    tb = None
    if not args.skip_torch_brain:
        if not Path(args.tb_python).exists():
            raise SystemExit(f"{args.tb_python} missing: python3 -m venv .venv-tb && "
                             ".venv-tb/bin/pip install torch==2.13.0 torch_brain==0.1.2 (or --skip-torch-brain)")
        tb = torch_brain(args)
    # our EPhys windows carry as many real tokens as torch_brain's (its spikes + start/end tokens)
    ephys_tokens = tb["ephys"]["real_tokens_per_step"] / args.batch if tb else args.units * args.rate
    rows = {}
    for kind in ("ephys", "ophys"):
        rows[f"ours {kind} (like torch_brain: values rotated)"] = ours(args, kind, True, ephys_tokens)
        rows[f"ours {kind} (papers' eq.: q,k rotated)"] = ours(args, kind, False, ephys_tokens)
    rows["ours mixed 50/50 (papers' eq.)"] = ours(args, "mixed", False, ephys_tokens)
    if tb:
        rows = {"torch_brain POYOPlus ephys": tb["ephys"], "torch_brain CalciumPOYOPlus ophys": tb["ophys"], **rows}

    def ratio(tb_keys, our_keys):
        if not tb:
            return None
        return sum(rows[k]["step_s_median"] for k in tb_keys) / sum(rows[k]["step_s_median"] for k in our_keys)

    tb_e, tb_o = "torch_brain POYOPlus ephys", "torch_brain CalciumPOYOPlus ophys"
    like_e, like_o = "ours ephys (like torch_brain: values rotated)", "ours ophys (like torch_brain: values rotated)"
    pap_e, pap_o = "ours ephys (papers' eq.: q,k rotated)", "ours ophys (papers' eq.: q,k rotated)"
    ratios = {
        f"ratio_vs_torch_brain_{args.device}": ratio([tb_e, tb_o], [like_e, like_o]),
        "ratio_ephys_like_for_like": ratio([tb_e], [like_e]),
        "ratio_ophys_like_for_like": ratio([tb_o], [like_o]),
        "ratio_ephys_papers_eq": ratio([tb_e], [pap_e]),
        "ratio_ophys_papers_eq": ratio([tb_o], [pap_o]),
    }

    print()
    precision = "bf16 autocast" if args.device == "cuda" else f"{args.threads} CPU threads, fp32"
    print(f"training step, batch {args.batch} x 1 s windows, {args.device}, {precision}, "
          f"dim 128 / 6 SA / 128 latents / heads 2 (CA), 8 (SA) x 64")
    print(f"{'model':<48} {'step s':>7} {'fwd s':>6} {'tokens/step':>11} {'tokens/s':>9} {'pad':>5} "
          f"{'params M':>8} {'peak MiB':>9}")
    for name, r in rows.items():
        print(f"{name:<48} {r['step_s_median']:>7.3f} {r['fwd_s_median']:>6.3f} {r['real_tokens_per_step']:>11,.0f} "
              f"{r['real_tokens_per_s']:>9,.0f} {r['padding_frac']:>5.1%} {r['params_M']:>8.3f} "
              f"{r.get('peak_mem_MiB', r.get('peak_rss_MiB_process', float('nan'))):>9,.0f}")
    if tb:
        print()
        for k, v in ratios.items():
            print(f"{k:<32} {v:.2f}x")
    result = {
        **ratios,
        "device": args.device,
        "peak_memory": "CUDA max_memory_allocated" if args.device == "cuda" else "peak RSS of the measuring process",
        "config": {**PAPER, "latents": 128, "attn_dropout": 0.0, "ffn_dropout": 0.2, "residual_dropout": 0.4,
                   "batch": args.batch, "threads": args.threads, "steps": args.steps, "warmup": args.warmup,
                   "ephys_units": args.units, "ephys_rate_hz": args.rate, "ephys_tokens_per_window": ephys_tokens,
                   "ophys_rois": args.rois, "ophys_frame_hz": args.frame_hz, "optimizer": "AdamW (both)"},
        "torch_brain_versions": tb["versions"] if tb else None,
        "rows": rows,
        "wall_s": time.perf_counter() - t_start,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out} ({result['wall_s']:.0f}s)")


if __name__ == "__main__":
    main()
