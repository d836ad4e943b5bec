"""The training loop every Ray Train worker runs, top to bottom (``train_loop_per_worker``).

    data       this rank's share of the mixture (shards.stream's MixtureStream and StreamLoader, not Ray Data)
               + the validation split
    model      the variant by name (or a pretrained model with grown vocabularies), wrapped in DDP
    optimizer  LAMB (paper preset) or AdamW (small), peak lr = base_lr x global batch, OneCycle, per batch
               (trainer.build)
    resume     the newest valid checkpoint in RUN/ray (--resume, or a restart after a worker failure),
               past invalid ones with a warning
    loop       step: forward, backward, (finetune: drop the grads of frozen parts), clip, step
               every log_every steps: TensorBoard (rank 0) of metrics summed over ranks
               every report_every steps: checkpoint (rank 0 writes it), then ray.train.report (a barrier:
               every rank calls it)
               every epoch end: validate, keep the best, stop early, checkpoint
               Ctrl-C (the driver's RUN/.interrupt): checkpoint this step and stop
    end        model_last.pt; (finetune) test split with the best or last weights (test_weights); RUN/metrics.json

Steps are global optimizer steps (one batch per rank each). A checkpoint holds model, optimizer,
scheduler, the stream's position (global windows consumed) and every rank's RNG states, so a
resumed run trains on exactly the batches an uninterrupted one would (trainer.checkpoint). Rank 0
writes it to RUN/ray/checkpoint_XXXXXXXX itself, with or without workers: Ray Train's local mode
(``--workers 0``) persists no reported checkpoint, and one writer keeps every mode the same.

What a worker holds for the whole run is a ``Worker``; what changes step by step (and what a
checkpoint saves of it) is a ``RunState``. Test-only hooks (fault injection, batch records) come from
the environment (trainer.testhooks), never from the config.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import ray.train
import ray.train.torch
import torch
from torch.optim.lr_scheduler import OneCycleLR

from shards.atomic import atomic_path
from shards.stream.dataset import MixtureStream
from shards.stream.loader import StreamLoader
from trainer import testhooks
from trainer.build import Built, build_model, frozen_parameters, make_optimizer, make_scheduler, restore_schedule
from trainer.checkpoint import (
    find_checkpoint,
    load_train_state,
    rng_state,
    save_model_file,
    seed_everything,
    set_rng_state,
    write_checkpoint,
)
from trainer.config import TrainConfig
from trainer.evaluate import evaluate, unwrap
from trainer.progress import Interrupt, RunLog, Timer, gather
from trainer.report import accuracy_line
from trainer.tally import Tally
from trainer.tblog import NullLog, TBLog
from trainer.testhooks import BatchRecord, TestHooks

INTERRUPT_FILE = ".interrupt"  # RUN/.interrupt: the driver's Ctrl-C; the loop checkpoints and stops


def train_loop_per_worker(config: dict) -> None:
    w = setup(TrainConfig.from_dict(config))
    s = resume(w)
    w.open_logs(s)
    while not s.done:
        if train_epoch(w, s):  # stopped or interrupted mid-epoch: checkpointed, no validation
            break
        validate(w, s)  # end of an epoch (or of training): validate, keep the best, maybe stop early
        if not s.done and w.interrupt.requested(s.step, now=True):  # just checkpointed: stop here
            s.status = "interrupted"
            w.say(f"interrupted at step {s.step} (Ctrl-C): checkpoint written; --resume continues from here")
            break
    finish(w, s)


# ============================================================================ the run's parts, in order

@dataclass
class Worker:
    """What one rank holds for the whole run: config, data, model, optimizer, loggers."""

    cfg: TrainConfig
    hooks: TestHooks
    rank: int
    world: int
    device: torch.device
    say: RunLog
    train_stream: MixtureStream
    valid_stream: MixtureStream
    loader: StreamLoader
    steps_per_epoch: int
    total_steps: int
    session_ids: list[str]  # store order
    record_ids: list[tuple[str, str]]  # (session_id, region), store order
    built: Built
    model: torch.nn.Module  # DDP-wrapped (or not): what forward and backward run on
    net: torch.nn.Module  # the model itself: config, param_groups, state_dict
    optimizer: torch.optim.Optimizer
    scheduler: OneCycleLR
    tb: TBLog | NullLog = field(default_factory=NullLog)
    record: BatchRecord | None = None
    timer: Timer = field(default_factory=Timer)
    interrupt: Interrupt | None = None

    def open_logs(self, s: RunState) -> None:
        """TensorBoard (rank 0; a resumed run drops what the last attempt logged after its checkpoint),
        the batch record, the first log line, the step timer and the Ctrl-C flag."""
        cfg, step = self.cfg, s.step
        if self.rank == 0:
            self.tb = TBLog(os.path.join(cfg.out, "tb"), purge_step=step + 1 if step else None)
        self.record = BatchRecord(self.hooks, cfg.out, self.rank, s.start_step)
        if self.rank == 0 and step == 0:
            self.say(f"training {cfg.model} ({sum(p.numel() for p in self.net.parameters()):,} parameters) on "
                     f"{self.world} worker(s), {self.device.type}; global batch {cfg.global_batch}, peak lr "
                     f"{cfg.peak_lr:.3g}, {self.steps_per_epoch} steps per epoch, {self.total_steps} steps")
        s.train_tally = self.new_tally()
        self.timer = Timer(self.device)
        self.interrupt = Interrupt(os.path.join(cfg.out, INTERRUPT_FILE), self.world, cfg.log_every, self.device)

    def new_tally(self) -> Tally:
        return Tally(self.net.config.tasks, self.session_ids, device=self.device)


@dataclass
class RunState:
    """What changes as the run goes; ``progress`` is what a checkpoint saves of it (plain values)."""

    progress: dict[str, Any]  # step, best score/step/metrics, validations without improvement, last metrics, ...
    step: int
    start_step: int  # where this attempt started (0, or the checkpoint it resumed from)
    total_steps: int
    best_model: dict | None = None  # the best weights so far (test_at_end)
    skipped_before: int = 0  # corrupt samples skipped (the batches' n_skipped) by all ranks before this attempt
    skipped_mine: int = 0  # ... and by this rank since
    last_val: dict = field(default_factory=dict)
    status: str = "finished"
    epoch: int = 0  # the epoch being trained (the loader's counter moves on once it has gone through it)
    train_tally: Tally | None = None

    @property
    def done(self) -> bool:
        return self.status != "finished" or self.step >= self.total_steps


def setup(cfg: TrainConfig) -> Worker:
    """This rank's device, seeds, data (its share of every step, and the validation split), model, optimizer
    and learning-rate schedule, in that order (the order of RNG use)."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker or 1)))
    seed_everything(cfg.seed + rank)
    train_stream = MixtureStream(cfg.stream_config("train"), rank=rank, world_size=world)
    valid_stream = MixtureStream(cfg.stream_config("valid"), rank=rank, world_size=world)
    loader = StreamLoader(train_stream, num_workers=cfg.loader_workers)
    steps_per_epoch = train_stream.batches_per_rank(0)
    total_steps = cfg.total_steps(steps_per_epoch)
    vocab = train_stream.vocab

    built = build_model(cfg, train_stream, rank)
    if built.prior is not None:
        built = dataclasses.replace(built, prior=built.prior.to(device))
    model = ray.train.torch.prepare_model(built.model, parallel_strategy_kwargs={"find_unused_parameters": True})
    optimizer = make_optimizer(cfg, unwrap(model))
    return Worker(cfg=cfg, hooks=testhooks.from_env(), rank=rank, world=world, device=device,
                  say=RunLog(cfg.out, rank), train_stream=train_stream, valid_stream=valid_stream, loader=loader,
                  steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                  session_ids=sorted(vocab.sessions, key=vocab.sessions.get),
                  record_ids=sorted(vocab.records, key=vocab.records.get), built=built, model=model,
                  net=unwrap(model), optimizer=optimizer, scheduler=make_scheduler(cfg, optimizer, total_steps))


def resume(w: Worker) -> RunState:
    """The newest valid checkpoint's state (--resume, or Ray restarting us after a worker died), or a fresh
    one. RUN/ray holds only this run's checkpoints (the driver refuses an --out with an earlier run unless
    --resume), so whatever is there is where this run continues from."""
    progress = {"step": 0, "best_score": -math.inf, "best_step": -1, "bad_validations": 0,
                "best_metrics": "{}", "last_metrics": "{}", "first_loss": math.nan}
    best_model = None
    found, invalid = find_checkpoint(w.cfg.out)
    for problem in invalid:
        w.say(f"warning: skipping an invalid checkpoint: {problem}")
    if found is not None:
        state = load_train_state(found, map_location=w.device)
        w.net.load_state_dict(state["model"])
        w.optimizer.load_state_dict(state["optimizer"])
        restore_schedule(w.scheduler, state["scheduler"], state["progress"]["step"], w.total_steps, w.say)
        w.loader.load_state_dict(state["stream"])
        progress.update(state["progress"])
        best_model = state.get("best_model")
        if w.rank < len(state["rng"]):
            set_rng_state(state["rng"][w.rank])
        w.say(f"resumed from the checkpoint at step {progress['step']} (epoch {w.loader.state.epoch}, "
              f"window {w.loader.state.consumed_windows} of the epoch's global order)", all_ranks=True)
    step = progress["step"]
    return RunState(progress=progress, step=step, start_step=step, total_steps=w.total_steps, best_model=best_model,
                    skipped_before=progress.get("skipped_samples", 0), last_val=json.loads(progress["last_metrics"]))


def train_epoch(w: Worker, s: RunState) -> bool:
    """Train the rest of this epoch (or up to the run's last step); True when the run stops here (the
    stop_at_step test hook, or Ctrl-C), after a checkpoint of this step."""
    cfg, loader, timer = w.cfg, w.loader, w.timer
    epoch = s.epoch = loader.state.epoch
    n_batches = len(loader)
    frozen = frozen_parameters(w.net, epoch, cfg.unfreeze_epoch, cfg.freeze_readout)
    if cfg.unfreeze_epoch and epoch == cfg.unfreeze_epoch:
        w.say(f"epoch {epoch}: unfreezing the decoder, encoders and trunk")
    for i, batch in enumerate(timer.timed(loader)):
        w.record.add(s.step + 1, epoch, batch)
        s.skipped_mine += int(batch["n_skipped"])
        batch = {k: v.to(w.device, non_blocking=True) for k, v in batch.items()}
        out = train_step(w, batch, frozen)
        s.step += 1
        s.train_tally.add(out, batch)
        timer.add_loss(out["loss"], out)
        testhooks.inject_failure(w.hooks, cfg.out, s.step, w.rank, w.world, w.say)
        if s.step % cfg.log_every == 0 or s.step == 1:
            log_train(w, s, epoch)
        if s.step >= s.total_steps or s.step == w.hooks.stop_at_step or w.interrupt.requested(s.step):
            break
        if s.step % cfg.report_every == 0 and i < n_batches - 1:  # the epoch's last step reports in validate
            with timer.excluded():
                report(w, s, {}, validated=False)
    if s.step < s.total_steps and (s.step == w.hooks.stop_at_step or w.interrupt.seen):
        with timer.excluded():
            report(w, s, {}, validated=False)
        if w.interrupt.seen:
            s.status = "interrupted"
            w.say(f"interrupted at step {s.step} (Ctrl-C): checkpoint written; --resume continues from here")
        else:
            s.status = "stopped"
            w.say(f"stopped at step {s.step} (the stop_at_step test hook); --resume continues from here")
        return True
    return False


def train_step(w: Worker, batch: dict, frozen: list[torch.nn.Parameter]) -> dict:
    """One optimizer step: forward, backward, (finetune: no update of the frozen parts), clip, step."""
    out = w.model(w.built.to_model(batch))
    if w.built.prior is not None:  # finetuning's new rows: the posterior, not the likelihood (trainer.row_prior)
        out["row_prior"] = w.built.prior.penalty(w.net.unit_emb.weight)
        out["loss"] = out["loss"] + out["row_prior"]
    w.optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    for p in frozen:  # gradual unfreezing: frozen parts get no update (not even weight decay)
        p.grad = None
    if w.cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(w.model.parameters(), w.cfg.grad_clip)
    w.optimizer.step()
    w.scheduler.step()
    return out


def log_train(w: Worker, s: RunState, epoch: int) -> None:
    """TensorBoard and the log line of the steps since the last one (summed over ranks: a collective)."""
    scalars = w.timer.summary(s.train_tally, w.optimizer, w.device)
    s.progress["skipped_samples"] = s.skipped_before + sum(gather(s.skipped_mine))
    scalars["data/skipped_samples"] = s.progress["skipped_samples"]
    if math.isnan(s.progress["first_loss"]):
        s.progress["first_loss"] = scalars["train/loss"]
    w.tb.scalars(scalars, s.step)
    w.say(f"step {s.step}/{s.total_steps}  epoch {epoch}  loss {scalars['train/loss']:.4f}  "
          f"lr {scalars['train/lr']:.3g}  {scalars['perf/steps_per_s']:.1f} steps/s  "
          f"data wait {scalars['perf/data_wait_fraction']:.1%}  skipped {s.progress['skipped_samples']}")
    s.train_tally = w.new_tally()


def report(w: Worker, s: RunState, metrics: dict, *, validated: bool) -> None:
    """Checkpoint (rank 0 writes RUN/ray/checkpoint_XXXXXXXX), then ray.train.report the metrics
    (every rank calls this: it is a barrier, so the checkpoint is whole when it returns)."""
    rngs = gather(rng_state())
    w.tb.flush()
    if w.rank == 0:
        write_checkpoint(w.cfg.out, s.step, keep=w.cfg.keep_checkpoints, meta=w.built.meta, model=w.net,
                         optimizer=w.optimizer, scheduler=w.scheduler, stream=w.loader.state_dict(),
                         progress={**s.progress, "step": s.step}, rng=rngs, best_model=s.best_model)
    ray.train.report({"step": s.step, "epoch": w.loader.state.epoch, "validated": validated, **metrics})


def validate(w: Worker, s: RunState) -> None:
    """The epoch's end: the validation split, the best weights so far, early stopping, a checkpoint."""
    cfg, progress, epoch = w.cfg, s.progress, s.epoch
    with w.timer.excluded():
        val = evaluate(w.model, StreamLoader(w.valid_stream, num_workers=0), session_ids=w.session_ids,
                       record_ids=w.record_ids, device=w.device, to_model=w.built.to_model,
                       max_batches=cfg.val_batches)
        summary = s.last_val = val.summary()
        scalars = val.scalars("val", sessions=True)
        w.tb.scalars(scalars, s.step)
        w.tb.confusion(val.confusion_matrices(), s.step)
        score = summary["score"]
        improved = not math.isnan(score) and score > progress["best_score"]
        if improved:
            progress.update(best_score=score, best_step=s.step, bad_validations=0,
                            best_metrics=json.dumps({"epoch": epoch, "step": s.step, **summary}))
            if cfg.test_at_end and cfg.test_weights == "best":
                s.best_model = copy.deepcopy(w.net.state_dict())
            if w.rank == 0:
                save_model_file(os.path.join(cfg.out, "model_best.pt"), w.net, w.built.meta, step=s.step,
                                score=score)
        else:
            progress["bad_validations"] += 1
        progress["last_metrics"] = json.dumps(summary)
        if w.rank == 0 and cfg.save_epoch_models:
            save_model_file(os.path.join(cfg.out, f"model_epoch{epoch}.pt"), w.net, w.built.meta, step=s.step)
        w.say(f"validation after epoch {epoch} (step {s.step}): score {score:.4f}"
              f"{' (best)' if improved else ''}  " + accuracy_line(summary))
        if cfg.early_stop_patience and progress["bad_validations"] >= cfg.early_stop_patience:
            s.status = "early_stopped"
            w.say(f"early stopping: no better validation score for {cfg.early_stop_patience} validations "
                  f"(best {progress['best_score']:.4f} at step {progress['best_step']})")
        report(w, s, {k: v for k, v in scalars.items() if "_session/" not in k and "_record/" not in k},
               validated=True)


def finish(w: Worker, s: RunState) -> None:
    """RUN/model_last.pt (the last weights); (finetune) the test split with the best or last weights
    (``test_weights``); RUN/metrics.json."""
    cfg = w.cfg
    test = None
    if w.rank == 0:  # the last weights, before the test loads the best ones over them
        save_model_file(os.path.join(cfg.out, "model_last.pt"), w.net, w.built.meta, step=s.step)
    if cfg.test_at_end and s.status not in ("stopped", "interrupted"):
        if s.best_model is not None:
            w.net.load_state_dict(s.best_model)
        test_stream = MixtureStream(cfg.stream_config("test"), rank=w.rank, world_size=w.world)
        tally = evaluate(w.model, StreamLoader(test_stream, num_workers=0), session_ids=w.session_ids,
                         record_ids=w.record_ids, device=w.device, to_model=w.built.to_model)
        test = tally.summary()
        w.tb.scalars(tally.scalars("test", sessions=True), s.step)
        w.tb.confusion(tally.confusion_matrices(), s.step, prefix="test")
        w.say(f"test split ({cfg.test_weights} weights): " + accuracy_line(test))
    s.progress["skipped_samples"] = s.skipped_before + sum(gather(s.skipped_mine))  # (every rank calls gather)
    if w.rank == 0:
        write_json(os.path.join(cfg.out, "metrics.json"), {
            "status": s.status, "step": s.step, "total_steps": s.total_steps, "epochs": w.loader.state.epoch,
            "train": {"first_loss": s.progress["first_loss"], "last_loss": w.timer.last_loss},
            "final": s.last_val, "best": json.loads(s.progress["best_metrics"]), "test": test,
            "skipped_samples": s.progress["skipped_samples"], "tensorboard": os.path.join(cfg.out, "tb")})
    w.tb.close()
    w.record.close()


def write_json(path: str, obj: Any) -> None:
    """JSON (numpy/torch scalars as numbers), atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, default=lambda x: x.item() if hasattr(x, "item") else str(x))
