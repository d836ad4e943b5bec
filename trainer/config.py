"""The training run's configuration: one dataclass, a YAML file, and command-line overrides.

Resolution order: the dataclass defaults (the papers' recipe, App. B), then ``--config FILE.yaml``,
then flags given on the command line. ``--help`` lists every field with its default. The resolved
config is written to ``RUN/config.yaml`` and travels to the workers as a plain dict.

Batch size is per worker (the stream's convention); the learning rate scales linearly with the
global batch: ``lr = base_lr * batch_size * workers`` (3.125e-5 x 32 = 1e-3 for the paper's batch
on one GPU), unless ``lr`` is given.

Every value is checked against its field's annotation (``check_value``): bools are only
true/false (the YAML is read with YAML 1.2's booleans, so ``no`` and ``"no"`` are refused, and
``1e-4`` is a number), ints are not bools, ``int | None`` accepts null. A wrong value, an unknown
key or an ``out`` that is a file is one ``ConfigError`` line naming the field, the value and
where it came from (the YAML file or the command line). The rules are ``trainer.typecheck``'s; the
YAML dialect is ``trainer.strict_yaml``'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import inspect
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from shards.atomic import atomic_path
from shards.store import is_remote
from shards.stream.dataset import StreamConfig
from trainer.model.config import ModelConfig
from trainer.model.variants import VARIANTS
from trainer.strict_yaml import StrictDumper, StrictLoader, read_yaml
from trainer.typecheck import ConfigError, Mismatch, coerce, describe_type, show_value


@dataclass
class TrainConfig:
    # ---- data (shards.stream.dataset) ----
    shards: str = ""  # the shard store: a folder or s3://bucket/prefix
    mix: str = "ephys=1,ophys=1"  # modality[/region[/session]]=weight, comma separated
    sessions_include: list[str] = field(default_factory=list)  # train/validate on these sessions only
    sessions_exclude: list[str] = field(default_factory=list)  # held-out sessions (transfer)
    calcium_noise: float = 0.0  # training windows: N(0, this) on every calcium token's dF/F (docs/model.md section 13)
    unit_dropout: bool = True  # training windows keep a random 50-100 % of each record's units (POYO's augmentation)
    train_fraction: float = 1.0  # train on this share of each record's train chunks, drawn by the seed (data-efficiency curves)
    window_s: float = 1.0
    epoch_windows: int | None = None  # windows per epoch (None: the natural size of the train split)
    shuffle_window: int = 256
    loader_workers: int = 2  # DataLoader processes per Ray worker
    seed: int = 0
    # ---- model (trainer.model.config, trainer.model.variants) ----
    model: str = "main"  # architecture variant: main | common-ca | unique-sa | separate
    preset: str = "paper"  # paper (ModelConfig defaults) | small (ModelConfig.small, for CPU)
    model_overrides: dict = field(default_factory=dict)  # ModelConfig fields, e.g. {dim: 64}
    # ---- optimisation (papers' App. B) ----
    batch_size: int = 32  # windows per worker per step
    base_lr: float = 3.125e-5  # scaled linearly by the global batch
    lr: float | None = None  # absolute peak learning rate (overrides base_lr scaling)
    weight_decay: float = 1e-4
    embed_lr_scale: float = 1.0  # unit/session embeddings train at this multiple of the peak rate (docs/model.md section 9)
    optimizer: str | None = None  # lamb | adamw; None: LAMB for the paper preset, AdamW for small (docs/model.md)
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
    test_weights: str = "best"  # the weights the test split scores: best (by validation) | last (the schedule's end)
    # ---- finetuning (trainer.finetune) ----
    init_from: str | None = None  # a pretrained model file (RUN/model_best.pt)
    unfreeze_epoch: int = 0  # before this epoch only unit and session embeddings train
    # units' rows: random (N(0, 0.02)) | tuning (a finetuning's new units, mapped from their train responses onto
    # the pretrained rows) | pca (a fresh model's units, from the principal components of their train responses);
    # trainer.unit_init
    unit_init: str = "random"
    unit_prior: float = 0.0  # finetuning: weight of a Gaussian prior on the new rows, fit to the pretrained ones; they start at its mean (0: none; trainer.row_prior)
    freeze_readout: bool = False  # finetuning: the likelihood readout's maps, codes and scales stay as pretrained
    unit_prior_groups: str = "modality"  # the prior's mean per modality, or per (modality, region) (trainer.row_prior)
    readout_fit: int = 0  # finetuning: full-batch steps fitting the pretrained readout's EPhys part and codes to the pretraining sessions' train counts first (trainer.readout_fit; 0: off)
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
    # (test-only hooks, fault injection and batch records, are no settings: trainer.testhooks)

    # ---- derived values -------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return max(1, self.workers)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def peak_lr(self) -> float:
        """``lr`` if given; else LAMB: base_lr x global batch (the papers' linear rule); AdamW: base_lr x 16 x
        sqrt(global batch / 32), the square-root rule for Adam-type updates, anchored where it was measured:
        5e-4 at batch 32. On the benchmark corpus (3 EPhys sessions, small preset, 1,000 steps, validation
        static gratings) 2.5e-4 reached 0.39, 5e-4 0.47, 1e-3 0.41 and 2e-3 stayed at chance (0.18); the
        linear rule's 2e-3 at batch 64 had also made the demo's loss rise (docs/model.md)."""
        if self.lr is not None:
            return self.lr
        if self.optimizer_name == "adamw":
            return self.base_lr * 16 * (self.global_batch / 32) ** 0.5
        return self.base_lr * self.global_batch

    @property
    def optimizer_name(self) -> str:
        """LAMB is the papers' (global batch 4,800); at CPU batch sizes it learned slower than AdamW at the
        same peak rate (demo corpus, small preset, 1,000 steps: static gratings 0.32 vs 0.41, drifting
        gratings 0.21 vs 0.36), so the small preset defaults to AdamW."""
        if self.optimizer is not None:
            return self.optimizer
        return "adamw" if self.preset == "small" else "lamb"

    def total_steps(self, steps_per_epoch: int) -> int:
        return self.max_steps if self.max_steps is not None else self.epochs * steps_per_epoch

    def model_config(self) -> ModelConfig:
        """The ModelConfig this run builds (before the variant's layer matching)."""
        base = ModelConfig.small if self.preset == "small" else ModelConfig
        return base(window_s=self.window_s, amp=self.bf16, **self.model_overrides)

    def stream_config(self, split: str) -> StreamConfig:
        """The StreamConfig of one split (what every rank streams; tests rebuild it to compare batches)."""
        model = self.model_config()
        return StreamConfig(store=self.shards, mix=self.mix, split=split, batch_size=self.batch_size,
                            window_s=self.window_s, seed=self.seed, epoch_windows=self.epoch_windows,
                            shuffle_window=self.shuffle_window, sessions_include=tuple(self.sessions_include),
                            sessions_exclude=tuple(self.sessions_exclude), check_shards=False,
                            eval_stride_s=self.eval_stride_s, calcium_lag_s=model.calcium_lag_s,
                            calcium_bin=model.calcium_bin, train_fraction=self.train_fraction,
                            calcium_noise=self.calcium_noise, unit_dropout=None if self.unit_dropout else False)

    # ---- plain dicts ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], origins: dict[str, str] | str = "config") -> TrainConfig:
        """A config from plain values, each checked against its field's annotation; ``origins`` says
        where each value came from (a file name, "command line"), for the one-line ConfigError."""
        if not isinstance(d, dict):
            raise ConfigError(f"{origins if isinstance(origins, str) else 'config'}: expected a mapping of "
                              f"TrainConfig fields, not {type(d).__name__}")
        where = (lambda k: origins) if isinstance(origins, str) else (lambda k: origins.get(k, "config"))
        hints, known = _hints(), [f.name for f in dataclasses.fields(cls)]
        d = {k: v for k, v in d.items() if not (k in RETIRED and v == RETIRED[k])}  # earlier runs' config.yaml
        for key in d:
            if key in RETIRED:
                raise ConfigError(f"{where(key)}: {key} is no setting (a test hook: trainer.testhooks)")
            if key not in hints:
                close = difflib.get_close_matches(str(key), known, n=1)
                raise ConfigError(f"{where(key)}: unknown config key {key!r}"
                                  + (f" (did you mean {close[0]!r}?)" if close else "") + "; --help lists the fields")
        cfg = cls(**{k: check_value(k, v, where(k)) for k, v in d.items()})
        cfg._set_origins({k: where(k) for k in d})
        return cfg

    def _set_origins(self, origins: dict[str, str]) -> None:
        object.__setattr__(self, "_origins", dict(origins))  # not a field: asdict/to_dict never see it

    def _where(self, name: str) -> str:
        return getattr(self, "_origins", {}).get(name, "config")

    def _bad(self, name: str, problem: str) -> ConfigError:
        return ConfigError(f"{self._where(name)}: {name} = {show_value(getattr(self, name))}: {problem}")

    def absolute(self) -> TrainConfig:
        """Paths made absolute (Ray workers run in another directory)."""
        def fix(p):
            return p if (not p or is_remote(p)) else os.path.abspath(p)
        out = dataclasses.replace(self, shards=fix(self.shards), out=fix(self.out),
                                  init_from=fix(self.init_from) if self.init_from else None)
        out._set_origins(getattr(self, "_origins", {}))
        return out

    def validate(self) -> None:
        """Types (in case fields were set in code), then ranges and choices; ConfigError (one line,
        naming the field, its value and where it came from) on the first problem."""
        for f in dataclasses.fields(self):
            check_value(f.name, getattr(self, f.name), self._where(f.name))
        if not self.shards:
            raise ConfigError("--shards is required (a shard store from `python -m ingest run`)")
        if not self.out:
            raise ConfigError("--out is required (the run folder)")
        if not is_remote(self.out):
            probe = os.path.abspath(self.out)
            while not os.path.exists(probe) and os.path.dirname(probe) != probe:
                probe = os.path.dirname(probe)
            if not os.path.isdir(probe):
                raise self._bad("out", f"{probe} is a file, not a folder; choose another --out for the run")
        if self.model not in VARIANTS:
            raise self._bad("model", f"one of {', '.join(VARIANTS)}")
        if self.preset not in ("paper", "small"):
            raise self._bad("preset", "paper or small")
        if self.optimizer not in (None, "lamb", "adamw"):
            raise self._bad("optimizer", "lamb or adamw")
        for name in ("batch_size", "log_every", "report_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise self._bad(name, "must be >= 1")
        for name in ("workers", "loader_workers"):
            if getattr(self, name) < 0:
                raise self._bad(name, "must be >= 0")
        if not 0.0 <= self.calcium_noise < 10.0:
            raise self._bad("calcium_noise", "must be in [0, 10) (an sd in dF/F)")
        if not 0.0 < self.train_fraction <= 1.0:
            raise self._bad("train_fraction", "must be in (0, 1] (the share of each record's train chunks)")
        if self.unit_init not in ("random", "tuning", "pca"):
            raise self._bad("unit_init", "random, tuning (finetuning a pretrained model) or pca (a fresh model)")
        if self.test_weights not in ("best", "last"):
            raise self._bad("test_weights", "best (the best validation's) or last (the schedule's end)")
        if not 0.0 <= self.unit_prior < 1e6:
            raise self._bad("unit_prior", "must be in [0, 1e6) (the weight of the new rows' prior)")
        if self.unit_prior_groups not in ("modality", "region"):
            raise self._bad("unit_prior_groups", "modality or region (the groups whose pretrained rows give a mean)")
        if self.freeze_readout and not self.init_from:
            raise self._bad("freeze_readout", "keeps a pretrained readout as it is (needs a pretrained model)")
        if self.readout_fit and not self.init_from:
            raise self._bad("readout_fit", "fits a pretrained readout to the counts (needs a pretrained model)")
        if not 0 <= self.readout_fit <= 100_000:
            raise self._bad("readout_fit", "must be a number of steps in [0, 100000]")
        if self.unit_prior and not self.init_from:
            raise self._bad("unit_prior", "is a prior for a finetuning's new rows (needs a pretrained model)")
        if self.unit_init == "pca" and self.init_from:
            raise self._bad("unit_init", "pca starts a fresh model; a finetuning's new units use tuning")
        if not self.embed_lr_scale > 0:
            raise self._bad("embed_lr_scale", "must be > 0 (1: the embeddings at the rate of everything else)")
        if self.max_steps is None and self.epochs < 1:
            raise self._bad("epochs", "must be >= 1 (or give --max-steps)")
        owned = {"window_s": "window_s (the stream's windows and the model's, one value)", "amp": "bf16"}
        for key in set(self.model_overrides) & set(owned):
            raise self._bad("model_overrides", f"{key} is set by the run's own field {owned[key]} (a --config YAML "
                            "field), not by a model override")
        try:
            self.model_config()  # raises on bad overrides
        except (TypeError, ValueError) as exc:
            raise self._bad("model_overrides", (str(exc).strip().splitlines() or ["invalid"])[0]) from None


# Fields that were test hooks (now trainer.testhooks): the config.yaml of an earlier run holds them with
# these values, and still reads (``--config RUN/config.yaml``, finetuning from that run).
RETIRED: dict[str, Any] = {"record_batches": False, "fail_at_step": None, "stop_at_step": None}


# ---- checking values against the annotations (trainer.typecheck) ---------------------------------------

@functools.lru_cache(maxsize=1)
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def check_value(name: str, value: Any, where: str = "config") -> Any:
    """``value`` checked against the annotation of TrainConfig field ``name`` (ints widen to float,
    a comma-separated string fills a list of strings); ConfigError naming the field, the value and
    ``where`` it came from otherwise."""
    t = _hints()[name]
    if isinstance(value, str) and typing.get_origin(t) is list and typing.get_args(t) == (str,):
        value = [s.strip() for s in value.split(",") if s.strip()]  # "a,b" from the command line or YAML
    try:
        return coerce(value, t)
    except Mismatch:
        raise ConfigError(f"{where}: {name} = {show_value(value)}: expected {describe_type(t)}") from None


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
            raise ConfigError(f"command line (--model-override): {item!r}: use KEY=VALUE")
        try:
            out[key.strip()] = yaml.load(value, Loader=StrictLoader)
        except yaml.YAMLError:
            raise ConfigError(f"command line (--model-override): {item!r}: the value is not valid YAML") from None
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
    origins = dict(getattr(base, "_origins", {})) if base is not None else {}
    if getattr(args, "config", None):
        loaded = read_yaml(args.config)
        loaded.pop("resolved", None)  # a RUN/config.yaml works as --config
        d.update(loaded)
        origins.update({k: args.config for k in loaded})
    for name, value in vars(args).items():
        if value is _UNSET or (name == "model_overrides" and value is None) or name == "config" or name not in d:
            continue
        if name == "model_overrides":
            value = {**(d.get("model_overrides") if isinstance(d.get("model_overrides"), dict) else {}),
                     **_parse_overrides(value)}
        d[name] = value
        origins[name] = f"command line (--{name.replace('_', '-')})"
    return TrainConfig.from_dict(d, origins)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    return resolve(build_parser(prog="python -m trainer.train").parse_args(argv))


def dump_yaml(cfg: TrainConfig, path: str, resolved: dict | None = None) -> None:
    doc = cfg.to_dict()
    if resolved:
        doc["resolved"] = resolved
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        yaml.dump(doc, fh, Dumper=StrictDumper, sort_keys=False)


def load_yaml(path: str) -> tuple[TrainConfig, dict]:
    doc = read_yaml(path)
    resolved = doc.pop("resolved", {})
    return TrainConfig.from_dict(doc, path), resolved
