"""The training run's configuration: one dataclass, a YAML file, and command-line overrides.

Resolution order: the dataclass defaults (the papers' recipe, App. B), then ``--config FILE.yaml``,
then flags given on the command line. ``--help`` lists every field with its default. The resolved
config is written to ``RUN/config.yaml`` and travels to the workers as a plain dict.

Batch size is per worker (the stream's convention); the learning rate scales linearly with the
global batch: ``lr = base_lr * batch_size * workers`` (3.125e-5 x 32 = 1e-3 for the paper's batch
on one GPU), unless ``lr`` is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from shards.store import is_remote


@dataclass
class TrainConfig:
    # ---- data (shards.stream) ----
    shards: str = ""  # the shard store: a folder or s3://bucket/prefix
    mix: str = "ephys=1,ophys=1"  # modality[/region[/session]]=weight, comma separated
    sessions_include: list[str] = field(default_factory=list)  # train/validate on these sessions only
    sessions_exclude: list[str] = field(default_factory=list)  # held-out sessions (transfer)
    window_s: float = 1.0
    epoch_windows: int | None = None  # windows per epoch (None: the natural size of the train split)
    shuffle_window: int = 256
    loader_workers: int = 2  # DataLoader processes per Ray worker
    seed: int = 0
    # ---- model (trainer.config, trainer.ablations) ----
    model: str = "main"  # architecture variant: main | common-ca | unique-sa | separate
    preset: str = "paper"  # paper (ModelConfig defaults) | small (ModelConfig.small, for CPU)
    model_overrides: dict = field(default_factory=dict)  # ModelConfig fields, e.g. {dim: 64}
    # ---- optimisation (papers' App. B) ----
    batch_size: int = 32  # windows per worker per step
    base_lr: float = 3.125e-5  # scaled linearly by the global batch
    lr: float | None = None  # absolute peak learning rate (overrides base_lr scaling)
    weight_decay: float = 1e-4
    epochs: int = 300
    max_steps: int | None = None  # global optimizer steps; overrides epochs when set
    pct_start: float = 0.5  # OneCycle: hold the initial rate until half-way...
    div_factor: float = 1.0  # ...starting at the peak rate (no warm-up)...
    final_div_factor: float = 1e4  # ...then cosine-decay to lr / (div_factor * final_div_factor)
    grad_clip: float = 1.0  # max global gradient norm (0: off)
    bf16: bool = True  # bf16 autocast on CUDA (CPU always runs fp32)
    # ---- validation ----
    early_stop_patience: int = 30  # validations without improvement before stopping (0: off)
    val_batches: int | None = None  # cap on validation batches per rank (None: the whole split)
    eval_stride_s: float | None = None  # valid/test windows start this far apart (None: half a window)
    test_at_end: bool = False  # evaluate the best weights on the test split at the end
    # ---- finetuning (trainer.finetune) ----
    init_from: str | None = None  # a pretrained model file (RUN/model_best.pt)
    unfreeze_epoch: int = 0  # before this epoch only unit and session embeddings train
    save_epoch_models: bool = False  # RUN/model_epoch{e}.pt after each epoch
    # ---- run ----
    out: str = ""  # the run folder: config.yaml, metrics.json, tb/, checkpoints in ray/
    workers: int = 2  # Ray Train workers (0: local mode, the loop runs in this process)
    cpus_per_worker: float | None = None  # None: min(1, cluster CPUs / workers)
    use_gpu: bool | None = None  # None: when the Ray cluster has GPUs
    resume: bool = False  # continue the run in --out from its latest checkpoint
    log_every: int = 10  # TensorBoard/console every N steps
    report_every: int = 100  # checkpoint through ray.train.report every N steps (and at epoch ends)
    keep_checkpoints: int = 2
    max_failures: int = 1  # worker crashes survived per run (FailureConfig)
    record_batches: bool = False  # RUN/batches/rank{r}.jsonl: step, position and fingerprint of every batch
    # ---- fault-injection knobs (tests) ----
    fail_at_step: int | None = None  # rank 1 (or 0 when alone) exits at this step, first attempt only
    stop_at_step: int | None = None  # checkpoint and stop at this step, as if preempted (--resume continues)

    # ---- derived values -------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return max(1, self.workers)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else self.base_lr * self.global_batch

    def total_steps(self, steps_per_epoch: int) -> int:
        return self.max_steps if self.max_steps is not None else self.epochs * steps_per_epoch

    def model_config(self):
        """The ModelConfig this run builds (before the variant's layer matching)."""
        from trainer.config import ModelConfig

        base = ModelConfig.small if self.preset == "small" else ModelConfig
        return base(window_s=self.window_s, amp=self.bf16, **self.model_overrides)

    def stream_config(self, split: str):
        """The StreamConfig of one split (what every rank streams; tests rebuild it to compare batches)."""
        from shards.stream import StreamConfig

        return StreamConfig(store=self.shards, mix=self.mix, split=split, batch_size=self.batch_size,
                            window_s=self.window_s, seed=self.seed, epoch_windows=self.epoch_windows,
                            shuffle_window=self.shuffle_window, sessions_include=tuple(self.sessions_include),
                            sessions_exclude=tuple(self.sessions_exclude), check_shards=False,
                            eval_stride_s=self.eval_stride_s)

    # ---- plain dicts ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; see --help")
        return cls(**d)

    def absolute(self) -> "TrainConfig":
        """Paths made absolute (Ray workers run in another directory)."""
        def fix(p):
            return p if (not p or is_remote(p)) else os.path.abspath(p)
        return dataclasses.replace(self, shards=fix(self.shards), out=fix(self.out),
                                   init_from=fix(self.init_from) if self.init_from else None)

    def validate(self) -> None:
        from trainer.ablations import VARIANTS

        if not self.shards:
            raise ValueError("--shards is required (a shard store from `python -m ingest run`)")
        if not self.out:
            raise ValueError("--out is required (the run folder)")
        if self.model not in VARIANTS:
            raise ValueError(f"--model {self.model!r}: one of {VARIANTS}")
        if self.preset not in ("paper", "small"):
            raise ValueError(f"--preset {self.preset!r}: paper or small")
        for name in ("batch_size", "log_every", "report_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.workers < 0 or self.loader_workers < 0:
            raise ValueError("workers and loader_workers must be >= 0")
        if self.max_steps is None and self.epochs < 1:
            raise ValueError("--epochs must be >= 1 (or give --max-steps)")
        self.model_config()  # raises on bad overrides


# ---- YAML + command line ----------------------------------------------------------------------------

_UNSET = object()


def _field_type(f: dataclasses.Field) -> Any:
    """int for ``int | None``, list for ``list[str]``, etc."""
    t = typing.get_type_hints(TrainConfig)[f.name]
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return typing.get_origin(t) or t


def _field_help() -> dict[str, str]:
    """Each field's trailing comment in the class body above: the --help text (one source of truth)."""
    src = inspect.getsource(TrainConfig)
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^    (\w+): [^#\n]*#(.*)$", src, re.M)}


def _parse_value(kind: Any, text: str) -> Any:
    if text.lower() in ("none", "null"):
        return None
    if kind is int:
        return int(text)
    if kind is float:
        return float(text)
    return text


def _parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"--model-override {item!r}: use KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def build_parser(prog: str | None = None, description: str | None = None,
                 skip: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """One flag per TrainConfig field (``--max-steps`` for ``max_steps``), defaults shown in --help."""
    p = argparse.ArgumentParser(prog=prog, description=description or __doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML file of TrainConfig fields (command-line flags override it)", default=None)
    defaults, helps = TrainConfig(), _field_help()
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        kind = _field_type(f)
        text = helps.get(f.name, "").replace("%", "%%")
        if f.name == "model_overrides":
            p.add_argument("--model-override", dest=f.name, action="append", metavar="KEY=VALUE", default=None,
                           help="a ModelConfig field, repeatable (e.g. --model-override dim=64) (default: none)")
        elif kind is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=_UNSET,
                           help=f"{text} (default: {default})")
        elif kind is list:
            p.add_argument(flag, dest=f.name, default=_UNSET, metavar="A,B,...",
                           help=f"{text}; comma separated (default: {','.join(default) or 'none'})")
        else:
            p.add_argument(flag, dest=f.name, default=_UNSET, type=lambda s, k=kind: _parse_value(k, s),
                           help=f"{text} (default: {default})")
    return p


def resolve(args: argparse.Namespace, base: TrainConfig | None = None) -> TrainConfig:
    """defaults (or ``base``) < YAML < flags given on the command line."""
    d = (base or TrainConfig()).to_dict()
    if getattr(args, "config", None):
        with open(args.config) as fh:
            loaded = yaml.safe_load(fh) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.config}: expected a mapping of TrainConfig fields")
        loaded.pop("resolved", None)  # a RUN/config.yaml works as --config
        d.update(loaded)
    for name, value in vars(args).items():
        if value is _UNSET or (name == "model_overrides" and value is None) or name == "config" or name not in d:
            continue
        if name == "model_overrides":
            value = {**d.get("model_overrides", {}), **_parse_overrides(value)}
        d[name] = value
    for name in ("sessions_include", "sessions_exclude"):  # "a,b" from the command line or YAML
        if isinstance(d.get(name), str):
            d[name] = [s.strip() for s in d[name].split(",") if s.strip()]
    return TrainConfig.from_dict(d)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    return resolve(build_parser(prog="python -m trainer.train").parse_args(argv))


def dump_yaml(cfg: TrainConfig, path: str, resolved: dict | None = None) -> None:
    doc = cfg.to_dict()
    if resolved:
        doc["resolved"] = resolved
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        yaml.safe_dump(doc, fh, sort_keys=False)
    os.replace(tmp, path)


def load_yaml(path: str) -> tuple[TrainConfig, dict]:
    with open(path) as fh:
        doc = yaml.safe_load(fh) or {}
    resolved = doc.pop("resolved", {})
    return TrainConfig.from_dict(doc), resolved
