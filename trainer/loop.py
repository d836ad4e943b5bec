"""The training loop every Ray Train worker runs, top to bottom (``train_loop_per_worker``).

    data       this rank's share of the mixture (shards.stream.dataset, not Ray Data) + the validation split
    model      the variant by name (or a pretrained model with grown vocabularies), wrapped in DDP
    optimizer  LAMB (paper preset) or AdamW (small), peak lr = base_lr x global batch, OneCycle, per batch
    resume     the newest valid checkpoint in RUN/ray (--resume, or a restart after a worker failure),
               past invalid ones with a warning
    loop       step: forward, backward, (finetune: drop the grads of frozen parts), clip, step
               every log_every steps: TensorBoard (rank 0) of metrics summed over ranks
               every report_every steps: checkpoint (rank 0 writes it), then ray.train.report (a barrier:
               every rank calls it)
               every epoch end: validate, keep the best, stop early, checkpoint
               Ctrl-C (the driver's RUN/.interrupt): checkpoint this step and stop
    end        (finetune) test split with the best weights; RUN/metrics.json, model_last.pt

Steps are global optimizer steps (one batch per rank each). A checkpoint holds model, optimizer,
scheduler, the stream's position (global windows consumed) and every rank's RNG states, so a
resumed run trains on exactly the batches an uninterrupted one would (trainer.checkpoint). Rank 0
writes it to RUN/ray/checkpoint_XXXXXXXX itself, with or without workers: Ray Train's local mode
(``--workers 0``) persists no reported checkpoint, and one writer keeps every mode the same.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
import warnings
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch_optimizer
from torch.optim.lr_scheduler import OneCycleLR

from shards.stream.dataset import MixtureStream, StreamLoader
from trainer.checkpoint import (find_checkpoint, load_train_state, make_meta, rng_state, save_model_file,
                                seed_everything, set_rng_state, write_checkpoint)
from trainer.evaluate import Tally, evaluate, unwrap
from trainer.tblog import NullLog, TBLog
from trainer.config import TrainConfig

INTERRUPT_FILE = ".interrupt"  # RUN/.interrupt: the driver's Ctrl-C; the loop checkpoints and stops


def train_loop_per_worker(config: dict) -> None:
    cfg = TrainConfig.from_dict(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker or 1)))
    seed_everything(cfg.seed + rank)
    say = RunLog(cfg.out, rank)

    # ---- data: this rank's share of every step, and the validation split ---------------------------
    train_stream = MixtureStream(cfg.stream_config("train"), rank=rank, world_size=world)
    valid_stream = MixtureStream(cfg.stream_config("valid"), rank=rank, world_size=world)
    loader = StreamLoader(train_stream, num_workers=cfg.loader_workers)
    steps_per_epoch = train_stream.batches_per_rank(0)
    total_steps = cfg.total_steps(steps_per_epoch)
    vocab = train_stream.vocab
    session_ids = sorted(vocab.sessions, key=vocab.sessions.get)  # store order
    record_ids = sorted(vocab.records, key=vocab.records.get)  # (session_id, region), store order

    # ---- model, optimizer, learning-rate schedule ----------------------------------------------------
    built = build_model(cfg, train_stream)
    model = ray.train.torch.prepare_model(built.model, parallel_strategy_kwargs={"find_unused_parameters": True})
    net = unwrap(model)  # the model itself (DDP wrapper or not): config, param_groups, state_dict
    optimizer = make_optimizer(cfg, model.parameters())
    scheduler = OneCycleLR(optimizer, max_lr=cfg.peak_lr, total_steps=max(1, total_steps), pct_start=cfg.pct_start,
                           div_factor=cfg.div_factor, final_div_factor=cfg.final_div_factor, anneal_strategy="cos")

    # ---- resume from the newest valid checkpoint (--resume, or Ray restarting us after a worker died) -
    # RUN/ray holds only this run's checkpoints (the driver refuses an --out with an earlier run unless
    # --resume), so whatever is there is where this run continues from.
    progress = {"step": 0, "best_score": -math.inf, "best_step": -1, "bad_validations": 0,
                "best_metrics": "{}", "last_metrics": "{}", "first_loss": math.nan}
    best_model = None
    found, invalid = find_checkpoint(cfg.out)
    for problem in invalid:
        say(f"warning: skipping an invalid checkpoint: {problem}")
    if found is not None:
        state = load_train_state(found, map_location=device)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        restore_schedule(scheduler, state["scheduler"], state["progress"]["step"], total_steps, say)
        loader.load_state_dict(state["stream"])
        progress.update(state["progress"])
        best_model = state.get("best_model")
        if rank < len(state["rng"]):
            set_rng_state(state["rng"][rank])
        say(f"resumed from the checkpoint at step {progress['step']} (epoch {loader.state.epoch}, "
            f"window {loader.state.consumed_windows} of the epoch's global order)", all_ranks=True)
    step = start_step = progress["step"]
    # corrupt samples skipped (the batches' n_skipped): by all ranks before this attempt, by this rank since
    skipped = {"before": progress.get("skipped_samples", 0), "mine": 0}
    tb = TBLog(os.path.join(cfg.out, "tb"), purge_step=step + 1 if step else None) if rank == 0 else NullLog()
    record = BatchRecord(cfg, rank, start_step)
    if rank == 0 and step == 0:
        say(f"training {cfg.model} ({sum(p.numel() for p in net.parameters()):,} parameters) on {world} worker(s), "
            f"{device.type}; global batch {cfg.global_batch}, peak lr {cfg.peak_lr:.3g}, {steps_per_epoch} steps "
            f"per epoch, {total_steps} steps")

    def report(metrics: dict, *, validated: bool) -> None:
        """Checkpoint (rank 0 writes RUN/ray/checkpoint_XXXXXXXX), then ray.train.report the metrics
        (every rank calls this: it is a barrier, so the checkpoint is whole when it returns)."""
        rngs = gather(rng_state())
        tb.flush()
        if rank == 0:
            write_checkpoint(cfg.out, step, keep=cfg.keep_checkpoints, meta=built.meta, model=net,
                             optimizer=optimizer, scheduler=scheduler, stream=loader.state_dict(),
                             progress={**progress, "step": step}, rng=rngs, best_model=best_model)
        ray.train.report({"step": step, "epoch": loader.state.epoch, "validated": validated, **metrics})

    # ---- the loop -------------------------------------------------------------------------------------
    train_tally = Tally(net.config.tasks, session_ids, device=device)
    timer = Timer()
    interrupt = Interrupt(os.path.join(cfg.out, INTERRUPT_FILE), world, cfg.log_every, device)
    status = "finished"
    last_val: dict = json.loads(progress["last_metrics"])
    done = step >= total_steps
    while not done:
        epoch = loader.state.epoch
        n_batches = len(loader)
        frozen = frozen_parameters(net, epoch, cfg.unfreeze_epoch)
        if cfg.unfreeze_epoch and epoch == cfg.unfreeze_epoch:
            say(f"epoch {epoch}: unfreezing the decoder, encoders and trunk")
        for i, batch in enumerate(timer.timed(loader)):
            record.add(step + 1, epoch, batch)
            skipped["mine"] += int(batch["n_skipped"])
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}

            out = model(built.to_model(batch))
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            for p in frozen:  # gradual unfreezing: frozen parts get no update (not even weight decay)
                p.grad = None
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1

            train_tally.add(out, batch)
            timer.loss_sum += float(out["loss"].detach()) if device.type == "cpu" else out["loss"].detach()
            inject_failure(cfg, step, rank, world, say)
            if step % cfg.log_every == 0 or step == 1:
                scalars = timer.summary(train_tally, optimizer, device)
                progress["skipped_samples"] = skipped["before"] + sum(gather(skipped["mine"]))
                scalars["data/skipped_samples"] = progress["skipped_samples"]
                if math.isnan(progress["first_loss"]):
                    progress["first_loss"] = scalars["train/loss"]
                tb.scalars(scalars, step)
                say(f"step {step}/{total_steps}  epoch {epoch}  loss {scalars['train/loss']:.4f}  "
                    f"lr {scalars['train/lr']:.3g}  {scalars['perf/steps_per_s']:.1f} steps/s  "
                    f"data wait {scalars['perf/data_wait_fraction']:.1%}  skipped {progress['skipped_samples']}")
                train_tally = Tally(net.config.tasks, session_ids, device=device)
            if step >= total_steps or step == cfg.stop_at_step or interrupt.requested(step):
                break
            if step % cfg.report_every == 0 and i < n_batches - 1:  # the epoch's last step reports below
                with timer.excluded():
                    report({}, validated=False)

        if step < total_steps and (step == cfg.stop_at_step or interrupt.seen):  # checkpoint, no validation
            with timer.excluded():
                report({}, validated=False)
            if interrupt.seen:
                status = "interrupted"
                say(f"interrupted at step {step} (Ctrl-C): checkpoint written; --resume continues from here")
            else:
                status = "stopped"
                say(f"stopped at step {step} (--stop-at-step); --resume continues from here")
            break

        # ---- end of an epoch (or of training): validate, keep the best, maybe stop early --------------
        with timer.excluded():
            val = evaluate(model, StreamLoader(valid_stream, num_workers=0), session_ids=session_ids,
                           record_ids=record_ids, device=device, to_model=built.to_model, max_batches=cfg.val_batches)
            summary = val.summary()
            last_val = summary
            scalars = val.scalars("val", sessions=True)
            tb.scalars(scalars, step)
            tb.confusion(val.confusion_matrices(), step)
            score = summary["score"]
            improved = not math.isnan(score) and score > progress["best_score"]
            if improved:
                progress.update(best_score=score, best_step=step, bad_validations=0,
                                best_metrics=json.dumps({"epoch": epoch, "step": step, **summary}))
                if cfg.test_at_end:
                    best_model = copy.deepcopy(net.state_dict())
                if rank == 0:
                    save_model_file(os.path.join(cfg.out, "model_best.pt"), net, built.meta, step=step, score=score)
            else:
                progress["bad_validations"] += 1
            progress["last_metrics"] = json.dumps(summary)
            if rank == 0 and cfg.save_epoch_models:
                save_model_file(os.path.join(cfg.out, f"model_epoch{epoch}.pt"), net, built.meta, step=step)
            say(f"validation after epoch {epoch} (step {step}): score {score:.4f}"
                f"{' (best)' if improved else ''}  " + format_accuracies(summary))
            early = cfg.early_stop_patience and progress["bad_validations"] >= cfg.early_stop_patience
            if early:
                status = "early_stopped"
                say(f"early stopping: no better validation score for {cfg.early_stop_patience} validations "
                    f"(best {progress['best_score']:.4f} at step {progress['best_step']})")
            done = step >= total_steps or bool(early)
            report({k: v for k, v in scalars.items() if "_session/" not in k and "_record/" not in k},
                   validated=True)
        if not done and interrupt.requested(step, now=True):  # just checkpointed: stop here
            status = "interrupted"
            say(f"interrupted at step {step} (Ctrl-C): checkpoint written; --resume continues from here")
            break

    # ---- the end: (finetune) test split with the best weights; metrics.json ----------------------------
    test = None
    if cfg.test_at_end and status not in ("stopped", "interrupted"):
        if best_model is not None:
            net.load_state_dict(best_model)
        test_stream = MixtureStream(cfg.stream_config("test"), rank=rank, world_size=world)
        tally = evaluate(model, StreamLoader(test_stream, num_workers=0), session_ids=session_ids,
                         record_ids=record_ids, device=device, to_model=built.to_model)
        test = tally.summary()
        tb.scalars(tally.scalars("test", sessions=True), step)
        tb.confusion(tally.confusion_matrices(), step, prefix="test")
        say("test split (best weights): " + format_accuracies(test))
    progress["skipped_samples"] = skipped["before"] + sum(gather(skipped["mine"]))  # (every rank calls gather)
    if rank == 0:
        save_model_file(os.path.join(cfg.out, "model_last.pt"), net, built.meta, step=step)
        write_json(os.path.join(cfg.out, "metrics.json"), {
            "status": status, "step": step, "total_steps": total_steps, "epochs": loader.state.epoch,
            "train": {"first_loss": progress["first_loss"], "last_loss": timer.last_loss},
            "final": last_val, "best": json.loads(progress["best_metrics"]), "test": test,
            "skipped_samples": progress["skipped_samples"], "tensorboard": os.path.join(cfg.out, "tb")})
    tb.close()
    record.close()


# ============================================================================ helpers, in order of use

class RunLog:
    """Progress lines: rank 0 prints them (Ray forwards to the driver) and appends them to RUN/train.log."""

    def __init__(self, out: str, rank: int):
        self.path, self.rank = os.path.join(out, "train.log"), rank

    def __call__(self, msg: str, all_ranks: bool = False) -> None:
        if self.rank != 0 and not all_ranks:
            return
        line = f"[rank {self.rank}] {msg}" if all_ranks else msg
        print(line, file=sys.__stdout__ or sys.stdout, flush=True)  # not Ray Train's print patch (it tees)
        with open(self.path, "a") as fh:
            fh.write(f"{time.strftime('%H:%M:%S')} {line}\n")


@dataclass
class Built:
    model: torch.nn.Module
    meta: str  # JSON: variant, model config, vocabulary ids in model-row order
    to_model: Callable[[dict], dict]  # store indices -> model rows (identity unless vocabularies were grown)


def build_model(cfg: TrainConfig, stream: MixtureStream) -> Built:
    """A fresh model of the store's vocabulary, or (``init_from``) a pretrained one whose unit and session
    vocabularies grow to cover this run's sessions (trainer.finetune)."""
    from trainer.model.variants import build_model as build_variant

    vocab = stream.vocab
    trained = sorted(set(stream.chunks.session_id.to_numpy()[stream.plan(0).chunk]))
    if cfg.init_from:
        from trainer.finetune import load_pretrained

        model, meta, unit_map, session_map = load_pretrained(cfg, vocab, trained)
        maps = {"input_unit_index": unit_map, "session_index": session_map}

        def to_model(batch: dict) -> dict:
            return {**batch, **{k: m.to(batch[k].device)[batch[k]] for k, m in maps.items()}}
        return Built(model, meta, to_model)
    base = cfg.model_config()
    model = build_variant(cfg.model, base, n_units=len(vocab.units), n_sessions=len(vocab.sessions))
    meta = make_meta(variant=cfg.model, model_config=base, unit_ids=sorted(vocab.units, key=vocab.units.get),
                     session_ids=sorted(vocab.sessions, key=vocab.sessions.get), trained_sessions=trained)
    return Built(model, meta, lambda batch: batch)


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """LAMB (torch-optimizer, the papers') or AdamW, at the run's peak rate (``TrainConfig.optimizer_name``)."""
    if cfg.optimizer_name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.peak_lr, weight_decay=cfg.weight_decay)
    return torch_optimizer.Lamb(params, lr=cfg.peak_lr, weight_decay=cfg.weight_decay)


def restore_schedule(scheduler: OneCycleLR, state: dict, step: int, total_steps: int, say) -> None:
    """Load the scheduler; if the run's length changed (--resume --max-steps N), follow the new
    schedule from this step instead."""
    if state.get("total_steps") == scheduler.total_steps or step > total_steps:
        scheduler.load_state_dict(state)
        return
    say(f"the schedule changed ({state.get('total_steps')} -> {total_steps} steps): the learning rate follows "
        f"the new one from step {step}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler.last_epoch = step - 1
        scheduler.step()


def gather(obj: Any) -> list:
    """obj of every rank, in rank order (a collective; [obj] without torch.distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


class Timer:
    """Data-wait and step-rate bookkeeping between two log lines (reports/validation excluded)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.wait = self.skip = 0.0
        self.steps = 0
        self.loss_sum: Any = 0.0
        self.last_loss = math.nan

    def timed(self, iterable):
        """Yield from iterable, adding the time blocked in next() to self.wait."""
        it = iter(iterable)
        while True:
            t = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            self.wait += time.perf_counter() - t
            self.steps += 1
            yield item

    def excluded(self):
        timer = self

        class _Skip:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                timer.skip += time.perf_counter() - self.t
        return _Skip()

    def summary(self, tally: Tally, optimizer, device) -> dict[str, float]:
        """Scalars since the last call, summed (counts) or averaged (rates) over ranks; then reset."""
        wall = max(time.perf_counter() - self.t0 - self.skip, 1e-9)
        tally.all_reduce()
        x = torch.tensor([float(self.loss_sum), self.steps, self.wait, wall], dtype=torch.float64,
                         device=tally.sums.device)
        world = 1
        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            dist.all_reduce(x)
        loss_sum, steps, wait, wall = x.tolist()
        steps_per_rank, wall_per_rank = steps / world, wall / world
        out = tally.scalars("train")
        self.last_loss = loss_sum / max(steps, 1)
        out.update({
            "train/loss": self.last_loss,
            "train/lr": optimizer.param_groups[0]["lr"],
            "perf/steps_per_s": steps_per_rank / wall_per_rank,
            "perf/samples_per_s": tally.samples / wall_per_rank,
            "perf/tokens_per_s": tally.tokens / wall_per_rank,
            "perf/data_wait_fraction": wait / wall,
        })
        if device.type == "cuda":
            out["perf/gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
            out["perf/gpu_mem_reserved_gb"] = torch.cuda.memory_reserved(device) / 1e9
        self.t0, self.wait, self.skip, self.steps, self.loss_sum = time.perf_counter(), 0.0, 0.0, 0, 0.0
        return out


def frozen_parameters(net: torch.nn.Module, epoch: int, unfreeze_epoch: int) -> list[torch.nn.Parameter]:
    """Gradual unfreezing (papers' App. C): before ``unfreeze_epoch`` only the unit and session
    embeddings train; everything else is frozen."""
    if epoch >= unfreeze_epoch:
        return []
    train = {id(p) for p in net.param_groups()["embeddings"]}
    return [p for p in net.parameters() if id(p) not in train]


def fingerprint(batch: dict[str, torch.Tensor]) -> int:
    """A checksum of a batch's contents (tokens, times, labels): equal batches, equal fingerprints."""
    crc = 0
    for k in ("input_unit_index", "input_timestamps", "input_values", "session_index", "output_labels"):
        crc = zlib.crc32(batch[k].numpy().tobytes(), crc)
    return crc


class BatchRecord:
    """RUN/batches/rank{r}.jsonl: one line per trained batch (step, epoch, position, fingerprint), so a
    test can check that a resumed run sees the batches an uninterrupted one does."""

    def __init__(self, cfg: TrainConfig, rank: int, start_step: int):
        self.fh = None
        self.start_step = start_step
        if cfg.record_batches:
            os.makedirs(os.path.join(cfg.out, "batches"), exist_ok=True)
            self.fh = open(os.path.join(cfg.out, "batches", f"rank{rank}.jsonl"), "a")

    def add(self, step: int, epoch: int, batch: dict) -> None:
        if self.fh is not None:
            self.fh.write(json.dumps({"step": step, "epoch": epoch, "position": int(batch["position"]),
                                      "fingerprint": fingerprint(batch), "start_step": self.start_step}) + "\n")
            self.fh.flush()

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()


class Interrupt:
    """Has the driver asked to stop (Ctrl-C: it creates RUN/.interrupt)? One stat per step; with several
    ranks they agree by an all-reduce every log_every steps (and when ``now``), so all stop at one step."""

    def __init__(self, path: str, world: int, every: int, device: torch.device):
        self.path, self.world, self.every, self.device = path, world, every, device
        self.seen = False

    def requested(self, step: int, now: bool = False) -> bool:
        if self.world == 1:
            self.seen = self.seen or os.path.exists(self.path)
        elif now or step % self.every == 0:
            flag = torch.tensor([float(os.path.exists(self.path))], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.seen = self.seen or bool(flag.item())
        return self.seen


def inject_failure(cfg: TrainConfig, step: int, rank: int, world: int, say) -> None:
    """Fault injection for the tests: at ``fail_at_step`` the last rank exits hard, on the first attempt only.
    It first waits a few controller polls: Ray Train registers a reported checkpoint when its controller
    collects the report (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), so a crash right after a report may
    restart from the checkpoint before; the wait makes the test's restart point certain."""
    if cfg.fail_at_step != step or rank != world - 1:
        return
    marker = os.path.join(cfg.out, ".injected_failure")
    if os.path.exists(marker):
        return
    open(marker, "w").close()
    time.sleep(3 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0")))
    say(f"injected failure: rank {rank} exits at step {step}", all_ranks=True)
    os._exit(1)


def format_accuracies(summary: dict) -> str:
    """The headline accuracy per modality and task (per presentation, mean over records), then the
    pooled per-query score when the summary has one."""
    parts = []
    for mod, e in summary.get("modality", {}).items():
        accs = ", ".join(f"{t} {v.get('acc', v.get('r2', math.nan)):.3f}" for t, v in e["tasks"].items())
        parts.append(f"{mod}: {accs}")
    line = "; ".join(parts)
    if "pooled" in summary:
        line += f"  (pooled per query: score {summary['pooled'].get('score', math.nan):.4f})"
    return line


def write_json(path: str, obj: Any) -> None:
    with open(path + ".tmp", "w") as fh:
        json.dump(obj, fh, indent=1, default=lambda x: x.item() if hasattr(x, "item") else str(x))
    os.replace(path + ".tmp", path)

