"""Pretraining on streamed EPhys/OPhys mixtures: Ray Train DDP workers, the papers' recipe.

    python -m trainer.train --shards demo/store --mix ephys=0.5,ophys=0.5 --out runs/pre \\
        --workers 2 --preset small --epochs 3          # a CPU-sized run
    python -m trainer.train --config run.yaml --out runs/pre --resume   # continue from the last checkpoint
    tensorboard --logdir runs/pre/tb

The driver (this file) resolves the config (defaults < --config YAML < flags), checks everything it can
before any worker starts (the store, the mixture, the sessions, an --out that already holds a run, the
--resume checkpoint: the newest valid one, its model variant), writes ``RUN/config.yaml`` and starts a
``TorchTrainer``; every worker runs ``trainer.loop``. Rank 0 writes the checkpoints to
``RUN/ray/checkpoint_XXXXXXXX`` (with a checksum; the same in local mode, ``--workers 0``); a worker that
dies is replaced and the group restarts from the newest valid one (``FailureConfig(max_failures)``),
which ``RUN/train.log`` records. Ctrl-C checkpoints the step the loop is at and stops ("interrupted at
step N; resume with --resume", exit status 130); a second Ctrl-C stops at once, the last checkpoint
being what --resume continues from. At the end the driver prints the validation accuracy per modality
and task from ``RUN/metrics.json``.

Ray: a local cluster unless ``RAY_ADDRESS`` names one (``RAY_ADDRESS=auto`` on a cluster's head node).
"""

from __future__ import annotations

if __name__ == "__main__":  # first, while one thread runs: the local Ray cluster dies with this command
    from cluster.lifeline import supervise  # even on kill -9 (a supervising parent; see cluster/lifeline.py)

    supervise()

import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import ray
import ray.exceptions
import ray.train
import torch
from ray.train.torch import TorchConfig, TorchTrainer

from shards.store import StoreError
from shards.stream.dataset import CorruptSampleError, MixtureStream
from shards.stream.fetch import FetchError
from trainer import testhooks
from trainer.checkpoint import (
    check_same_model,
    checkpoint_step,
    find_checkpoint,
    latest_checkpoint,
    load_model_file,
    read_meta,
)
from trainer.config import TrainConfig, dump_yaml, parse_args
from trainer.loop import INTERRUPT_FILE, train_loop_per_worker
from trainer.model.io import model_from_checkpoint
from trainer.model.network import MultiModalPOYO, n_parameters
from trainer.model.variants import variant_config
from trainer.report import print_summary


def main(argv: list[str] | None = None) -> dict:
    try:
        cfg = parse_args(argv)  # a bad --config value is one ConfigError line (trainer.config)
        metrics = run(cfg)
    except (ValueError, FileNotFoundError) as exc:  # pre-flight: nothing has started
        raise SystemExit(f"error: {exc}") from None
    except KeyboardInterrupt:  # Ctrl-C before training started (run() handles it from there on)
        print("interrupted before training started", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except Exception as exc:  # an unreachable store or corrupt data during training: its one line, not Ray's trace
        cause = data_error(exc)
        if cause is None:
            raise
        raise SystemExit(f"error: {cause}") from None
    print_summary(metrics, cfg.absolute().out)
    return metrics


def data_error(exc: BaseException) -> BaseException | None:
    """The stream's own error (store unreachable, corrupt samples over budget) or the store's (a worker that
    Ray Train restarted after an outage fails opening the store: StoreError, one line naming the store)
    inside whatever Ray wrapped it in (exception chains, RayTaskError.cause, a training failure's
    per-worker errors), or None."""
    stack, seen = [exc], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, (FetchError, CorruptSampleError, StoreError)):
            return e
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None)]
        for name in ("worker_failures", "worker_exceptions"):
            failures = getattr(e, name, None)
            if isinstance(failures, dict):
                stack += list(failures.values())
    return None


class Interrupted(SystemExit):
    """Ctrl-C ended the run (exit status 130); ``message`` is the one line printed on stderr."""

    def __init__(self, message: str, step: int | None):
        super().__init__(130)
        self.message, self.step = message, step


def run(cfg: TrainConfig) -> dict:
    """Check, then train; returns RUN/metrics.json. Raises ValueError/FileNotFoundError before any
    worker starts when the input is wrong; on Ctrl-C prints one line on stderr and raises Interrupted."""
    cfg = cfg.absolute()
    cfg.validate()
    resolved = preflight(cfg)
    os.makedirs(cfg.out, exist_ok=True)
    retire_ray_snapshot(cfg.out)
    with quiet_local_mode(cfg.workers == 0):
        trainer, resources = make_trainer(cfg)
        resolved.update(resources)
        dump_yaml(cfg, os.path.join(cfg.out, "config.yaml"), resolved)  # as given, plus what was derived
        print(f"run {cfg.out}: {resolved['params']:,} parameters ({cfg.model}, {cfg.preset}), "
              f"{resolved['world_size']} worker(s) x batch {cfg.batch_size}, lr {resolved['lr']:.3g}, "
              f"{resolved['steps_per_epoch']} steps/epoch, {resolved['total_steps']} steps"
              + (" (resuming)" if cfg.resume else ""), flush=True)
        print(f"watch it: tensorboard --logdir {resolved['tensorboard']}", flush=True)
        threads = torch.get_num_threads()
        marker = os.path.join(cfg.out, INTERRUPT_FILE)
        ctrl_c = CtrlC(marker)
        try:
            # the workers' progress lines, from RUN/train.log
            with ctrl_c, echo_appended_lines(os.path.join(cfg.out, "train.log"), enabled=cfg.workers > 0):
                trainer.set_ctrl_c(ctrl_c)
                trainer.fit()
        except BaseException:
            if not ctrl_c.aborted:  # a failure, not the second Ctrl-C
                raise
            # the second Ctrl-C: local mode's KeyboardInterrupt, or Ray's controller gone (ActorDiedError)
        finally:
            torch.set_num_threads(threads)  # local mode ran the loop in this process
            with contextlib.suppress(FileNotFoundError):
                os.remove(marker)
    metrics_path = os.path.join(cfg.out, "metrics.json")
    metrics = None
    if os.path.exists(metrics_path):
        with open(metrics_path) as fh:
            metrics = json.load(fh)
    if not ctrl_c.aborted and metrics is not None and metrics.get("status") == "interrupted":
        interrupted(f"interrupted at step {metrics['step']}; resume with --resume", metrics["step"])
    if ctrl_c.aborted or (ctrl_c.count and (metrics is None or metrics.get("status") != "finished")):
        last = latest_checkpoint(cfg.out)
        if last is None:
            interrupted(f"interrupted before the first checkpoint: nothing to resume (remove {cfg.out} to "
                        f"start again)", None)
        k = checkpoint_step(last)
        interrupted(f"interrupted at step {k} (the last checkpoint; later steps are lost); resume with --resume", k)
    if metrics is None:
        raise RuntimeError(f"training ended without writing {metrics_path}")
    return metrics


def interrupted(message: str, step: int | None):
    print(message, file=sys.stderr, flush=True)
    raise Interrupted(message, step)


class CtrlC:
    """SIGINT while training (main thread only). The first: create RUN/.interrupt, which the loop sees
    between steps: it checkpoints that step and stops. The second: stop at once (local mode: a
    KeyboardInterrupt; Ray: the controller aborts the workers). Forked DataLoader workers inherit the
    handler and ignore the signal (the driver decides)."""

    def __init__(self, marker: str):
        self.marker, self.count, self.aborted = marker, 0, False
        self.abort = None  # set by the Ray trainer: stop the workers now
        self.pid = os.getpid()
        self.previous = None

    def __enter__(self):
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.marker)  # a stale one (a driver killed after a Ctrl-C)
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None

    def handle(self, signum, frame) -> None:
        if os.getpid() != self.pid:  # a forked DataLoader worker
            return
        self.count += 1
        if self.count == 1:
            with open(self.marker, "w") as fh:
                fh.write(f"{time.time()}\n")
            print("Ctrl-C: checkpointing and stopping after this step (Ctrl-C again to stop at once)", flush=True)
            return
        self.aborted = True
        if self.abort is None:
            raise KeyboardInterrupt
        self.abort()  # fit() then raises (the controller is gone): run() knows why


def abort_controller(controller) -> None:
    """Ray Train's own second-Ctrl-C: the controller stops the workers and exits."""
    try:
        ray.get(controller.abort.remote())
    except ray.exceptions.RayActorError:  # it exited before answering
        pass


@contextlib.contextmanager
def quiet_local_mode(enabled: bool):
    """Ray Train's local mode logs at INFO on the console (stderr); the workers' LoggingConfig is WARNING."""
    logger = logging.getLogger("ray.train")
    level = logger.level
    if enabled:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def retire_ray_snapshot(out: str) -> None:
    """Checkpoints are the loop's own (trainer.checkpoint), not Ray's: a run made by an older version has
    Ray's checkpoint_manager_snapshot.json, whose Ray would check against checkpoints pruned since."""
    snapshot = os.path.join(out, "ray", "checkpoint_manager_snapshot.json")
    if os.path.exists(snapshot):
        os.replace(snapshot, snapshot + ".unused")


# ---- checks before any worker starts ------------------------------------------------------------------

def preflight(cfg: TrainConfig) -> dict[str, Any]:
    """Build the streams once (store, mixture, sessions, shards), check resume/init checkpoints against
    the model this run builds; return the resolved numbers for config.yaml."""
    ray_dir = os.path.join(cfg.out, "ray")
    earlier = earlier_run(cfg.out)
    if earlier and not cfg.resume:
        raise ValueError(f"{cfg.out} already holds a run ({', '.join(earlier)}): pass --resume to continue it, "
                         f"or choose another --out")
    latest, invalid = find_checkpoint(cfg.out) if cfg.resume else (None, [])
    if cfg.resume and not latest:
        if invalid:
            raise ValueError(f"--resume: no valid checkpoint under {ray_dir}: " + "; ".join(invalid))
        raise FileNotFoundError(f"--resume: no checkpoint under {ray_dir}"
                                + (f" ({cfg.out} holds a run that saved none: remove it or choose another --out "
                                   f"to start again)" if earlier else ""))
    for problem in invalid:
        print(f"warning: skipping an invalid checkpoint: {problem}; resuming from {latest}", file=sys.stderr,
              flush=True)
    world = cfg.world_size
    train = MixtureStream(dataclasses.replace(cfg.stream_config("train"), check_shards=True), world_size=world)
    MixtureStream(cfg.stream_config("valid"), world_size=world)
    steps_per_epoch = train.batches_per_rank(0)
    if steps_per_epoch == 0:
        raise ValueError(f"an epoch of {len(train.plan(0))} windows does not fill one global batch of "
                         f"{cfg.global_batch} (batch {cfg.batch_size} x {world} workers): lower --batch-size "
                         f"or raise --epoch-windows")

    base = cfg.model_config()
    if cfg.init_from:
        if not os.path.exists(cfg.init_from):
            raise FileNotFoundError(f"--init-from {cfg.init_from}: no such model file")
        pretrained = load_model_file(cfg.init_from)
        check_same_model(pretrained["meta"], cfg.model, base, f"pretrained model {cfg.init_from}")
        try:  # before any worker starts: a file whose parameters do not build is a one-line error, not a traceback
            model_from_checkpoint(pretrained)
        except ValueError as exc:
            raise ValueError(f"pretrained model {cfg.init_from}: {exc}") from None
    if latest:
        check_same_model(read_meta(latest), cfg.model, base, f"checkpoint {latest}")

    variant = variant_config(cfg.model, base)
    with torch.device("meta"):
        n_params = n_parameters(MultiModalPOYO(config=variant.replace(compile=False), n_units=len(train.vocab.units),
                                               n_sessions=len(train.vocab.sessions)))
    return {"world_size": world, "global_batch": cfg.global_batch, "lr": cfg.peak_lr,
            "steps_per_epoch": steps_per_epoch, "total_steps": cfg.total_steps(steps_per_epoch),
            "n_units": len(train.vocab.units), "n_sessions": len(train.vocab.sessions), "params": n_params,
            "model_config": variant.to_dict(), "checkpoints": ray_dir, "tensorboard": os.path.join(cfg.out, "tb")}


def earlier_run(out: str) -> list[str]:
    """What in ``out`` shows that a run trained there (config.yaml alone does not: the driver writes it
    before training starts)."""
    found = []
    for name in ("ray", "metrics.json", "model_best.pt", "model_last.pt", "train.log", "tb", "batches"):
        path = os.path.join(out, name)
        if os.path.isdir(path) and os.listdir(path) or os.path.isfile(path):
            found.append(name + ("/" if os.path.isdir(path) else ""))
    return found


# ---- Ray Train --------------------------------------------------------------------------------------

def make_trainer(cfg: TrainConfig):
    """The TorchTrainer (local mode when workers == 0) and the resources it asks for."""
    if cfg.workers == 0:
        scaling, use_gpu = ray.train.ScalingConfig(num_workers=0), False
        cfg = dataclasses.replace(cfg, cpus_per_worker=cfg.cpus_per_worker or 1.0)
    else:
        # each ray.train.report waits for the controller's next poll: keep it short (CI sets 0.1)
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        if not ray.is_initialized():
            # worker output stays in Ray's logs; the console shows RUN/train.log (see echo_appended_lines)
            ray.init(address=os.environ.get("RAY_ADDRESS") or "local", log_to_driver=False, logging_level="WARNING")
        have = ray.cluster_resources()
        use_gpu = cfg.use_gpu if cfg.use_gpu is not None else have.get("GPU", 0) >= cfg.workers
        cpus = cfg.cpus_per_worker or max(0.1, min(1.0, have.get("CPU", 1) / cfg.workers))
        cfg = dataclasses.replace(cfg, cpus_per_worker=cpus, use_gpu=use_gpu)
        scaling = ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus})
    run_config = ray.train.RunConfig(
        name="ray", storage_path=cfg.out,  # Ray's run folder is RUN/ray, where the loop writes its checkpoints
        failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        callbacks=[FailureLog(os.path.join(cfg.out, "train.log"), cfg.max_failures)],
        logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        worker_runtime_env=worker_env())
    trainer = Trainer(train_loop_per_worker, train_loop_config=cfg.to_dict(), scaling_config=scaling,
                      run_config=run_config, torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"))
    return trainer, {"use_gpu": use_gpu, "cpus_per_worker": cfg.cpus_per_worker}


def worker_env() -> dict:
    """The workers' runtime_env: the test hooks (trainer.testhooks) when the driver has them, passed
    explicitly (a Ray worker inherits the environment of the cluster, not the driver's); else none."""
    env_vars = testhooks.worker_env()
    return {"env_vars": env_vars} if env_vars else {}


class Trainer(TorchTrainer):
    """TorchTrainer whose Ctrl-C is ours (CtrlC): the first one checkpoints and stops the loop; Ray's own
    handler (it replaces any when fit() starts the controller) aborts the workers at once."""

    ctrl_c = None

    def set_ctrl_c(self, ctrl_c: CtrlC) -> None:
        self.ctrl_c = ctrl_c

    def _register_sigint_handler(self, controller) -> None:  # ray 2.60: fit() calls it in the main thread
        if self.ctrl_c is None:
            return super()._register_sigint_handler(controller)
        self.ctrl_c.abort = lambda: abort_controller(controller)
        signal.signal(signal.SIGINT, self.ctrl_c.handle)


class FailureLog(ray.train.UserCallback):
    """Runs in Ray Train's controller: a worker failure goes to RUN/train.log (and the console)."""

    def __init__(self, path: str, max_failures: int):
        self.path, self.max_failures = path, max_failures

    def after_exception(self, run_context, worker_exceptions) -> None:
        what = "; ".join(f"rank {r}: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:120]}"
                         for r, e in sorted(worker_exceptions.items()))
        msg = (f"worker failure ({what}) -- Ray Train restarts the workers from the latest checkpoint "
               f"while failures stay within max_failures={self.max_failures}")
        print(msg, file=sys.stderr, flush=True)
        try:
            with open(self.path, "a") as fh:
                fh.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
        except OSError:
            pass


@contextlib.contextmanager
def echo_appended_lines(path: str, enabled: bool = True, every_s: float = 0.5) -> Iterator[None]:
    """Print the whole lines appended to ``path`` while the block runs (a background thread polls it every
    ``every_s``; the last lines are printed on exit): the console shows the workers' RUN/train.log."""
    if not enabled:
        yield
        return
    offset = os.path.getsize(path) if os.path.exists(path) else 0

    def pump() -> None:
        nonlocal offset
        if os.path.exists(path):
            with open(path) as fh:
                fh.seek(offset)
                text = fh.read()
            end = text.rfind("\n") + 1  # whole lines only
            if end:
                print(text[:end], end="", flush=True)
                offset += len(text[:end].encode())

    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(every_s):
            pump()

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        pump()


if __name__ == "__main__":
    main()
