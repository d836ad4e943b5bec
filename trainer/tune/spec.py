"""An experiment of the papers as a named, versioned spec: its axes and its training budget.

A spec is a YAML mapping read strictly (``trainer.strict_yaml``) and checked field by field against
``ExperimentSpec``'s annotations (``trainer.typecheck``): an unknown key, a wrong type, a ratio outside
[0, 1], an empty seed list or an unknown variant is one ``ConfigError`` line naming the file and the
field. Command-line flags override the file (``override``). Region names are checked against the store
later (``trainer.tune.points.check_regions``): the spec does not know the store.

The axes cross: every (ratio, seed, set size, variant, OPhys regions, EPhys regions) is one trial.
``ratio`` is the fraction of EPhys windows in the pretraining mixture (0: OPhys only, 1: EPhys only).
A region subset is ``all`` or regions joined by ``+`` (``VISp``, ``VISp+VISl``). A set size is the
number of pretraining sessions per region of each modality (``null``: every session not held out).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import typing
from dataclasses import dataclass, field
from typing import Any

from trainer.config import TrainConfig
from trainer.model.variants import VARIANTS
from trainer.strict_yaml import read_yaml
from trainer.typecheck import ConfigError, Mismatch, coerce, describe_type, show_value

EXPERIMENTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
SEARCHES = ("grid", "asha", "bayes")
MODALITIES = ("ephys", "ophys")


@dataclass
class ExperimentSpec:
    name: str = "sweep"  # the experiment's name: results.parquet's experiment column
    version: int = 1  # bumped whenever a change makes earlier results incomparable
    description: str = ""
    # ---- axes (crossed) ----
    ratios: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])  # fraction of EPhys windows
    seeds: list[int] = field(default_factory=lambda: [0])  # training seeds
    set_sizes: list[int | None] = field(default_factory=lambda: [None])  # sessions per region (null: all)
    variants: list[str] = field(default_factory=lambda: ["main"])  # trainer.model.variants
    ophys_regions: list[str] = field(default_factory=lambda: ["all"])  # region subsets: all | VISp | VISp+VISl
    ephys_regions: list[str] = field(default_factory=lambda: ["all"])
    # ---- held-out sessions ----
    held_out: int = 2  # sessions held out per region per modality
    heldout_seed: int = 0  # draws the held-out sessions and the order pretraining sets fill in
    evaluate: list[str] = field(default_factory=lambda: ["ephys", "ophys"])  # modalities finetuned on
    # ---- budget ----
    pretrain_steps: int = 3000
    finetune_epochs: int = 20
    unfreeze_epoch: int = 5
    preset: str = "small"  # model preset: small | paper
    model_overrides: dict = field(default_factory=dict)  # ModelConfig fields
    train: dict = field(default_factory=dict)  # further TrainConfig fields for every run (batch_size, ...)
    finetune: dict = field(default_factory=dict)  # and for every finetuning only (unit_prior, test_weights, lr, ...)
    # ---- search ----
    search: str = "grid"  # grid | asha | bayes
    samples: int = 8  # bayes: trials the searcher proposes (per-region mixture weights)
    bayes_startup: int = 0  # bayes: random trials before TPE models the rest (0: a quarter of samples, at least 2)
    asha_grace: int = 2  # asha: validations every trial gets before it can be stopped
    asha_reduction: int = 2  # asha: keep 1 in this many at each rung

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, where: dict[str, str] | None = None) -> ExperimentSpec:
        """Ranges and choices; ConfigError naming the field and where its value came from."""
        at = (where or {}).get

        def bad(name: str, problem: str) -> ConfigError:
            return ConfigError(f"{at(name, 'spec')}: {name} = {show_value(getattr(self, name))}: {problem}")

        if not self.ratios:
            raise bad("ratios", "give at least one ratio")
        if any(not 0.0 <= r <= 1.0 for r in self.ratios):
            raise bad("ratios", "each ratio (the fraction of EPhys windows) must be within [0, 1]")
        if not self.seeds:
            raise bad("seeds", "give at least one seed")
        if not self.set_sizes or any(s is not None and s < 1 for s in self.set_sizes):
            raise bad("set_sizes", "each set size is >= 1 sessions per region, or null (all)")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if not self.variants or unknown:
            raise bad("variants", f"unknown variant {unknown[0]!r}; one of {', '.join(VARIANTS)}" if unknown
                      else "give at least one variant")
        for name in ("ophys_regions", "ephys_regions"):
            subsets = getattr(self, name)
            if not subsets or any(not s or any(not p for p in s.split("+")) for s in subsets):
                raise bad(name, "each subset is 'all' or region names joined by '+'")
        if self.held_out < 1:
            raise bad("held_out", "hold out at least one session per region")
        if not self.evaluate or any(m not in MODALITIES for m in self.evaluate):
            raise bad("evaluate", f"modalities among {', '.join(MODALITIES)}")
        for name in ("pretrain_steps", "finetune_epochs", "samples", "asha_grace", "asha_reduction"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        if self.bayes_startup < 0:
            raise bad("bayes_startup", "must be >= 0 (0: a quarter of samples, at least 2)")
        if not 0 <= self.unfreeze_epoch <= self.finetune_epochs:
            raise bad("unfreeze_epoch", f"within [0, finetune_epochs={self.finetune_epochs}]")
        if self.preset not in ("small", "paper"):
            raise bad("preset", "small or paper")
        if self.search not in SEARCHES:
            raise bad("search", f"one of {', '.join(SEARCHES)}")
        for name in ("train", "finetune"):
            extra = getattr(self, name)
            try:  # the extra TrainConfig fields: same checks as a --config file
                TrainConfig.from_dict(extra, at(name, "spec") + f" ({name})")
            except ConfigError as exc:
                raise ConfigError(str(exc)) from None
            owned = sorted(set(extra) & OWNED_FIELDS)
            if owned:
                raise bad(name, f"{owned[0]} is set by the sweep itself (use the spec's own fields)")
        return self


# TrainConfig fields a trial sets from its point and the spec: a spec's ``train`` may not set them
OWNED_FIELDS = {"shards", "out", "mix", "sessions_include", "sessions_exclude", "seed", "model", "preset",
                "model_overrides", "max_steps", "init_from", "resume", "workers", "cpus_per_worker", "use_gpu",
                "epochs", "unfreeze_epoch", "test_at_end"}


@functools.lru_cache(maxsize=1)
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(ExperimentSpec)


def check_field(name: str, value: Any, where: str) -> Any:
    t = _hints()[name]
    try:
        return coerce(value, t)
    except Mismatch:
        raise ConfigError(f"{where}: {name} = {show_value(value)}: expected {describe_type(t)}") from None


def from_mapping(doc: dict, where: str) -> tuple[ExperimentSpec, dict[str, str]]:
    """A spec from a plain mapping (unknown keys and wrong types: one ConfigError line naming ``where``)."""
    known = [f.name for f in dataclasses.fields(ExperimentSpec)]
    for key in doc:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            raise ConfigError(f"{where}: unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                              + f"; the fields are {', '.join(known)}")
    values = {k: check_field(k, v, where) for k, v in doc.items()}
    for name in ("ophys_regions", "ephys_regions"):
        if name in values:
            values[name] = [s.strip() for s in values[name]]
    origins = {k: where for k in doc}
    return ExperimentSpec(**values), origins


def resolve_path(name_or_path: str) -> str:
    """``fig2`` -> trainer/experiments/fig2.yaml; a path stays itself; ConfigError when neither exists."""
    if os.path.exists(name_or_path):
        return name_or_path
    named = os.path.join(EXPERIMENTS_DIR, f"{name_or_path}.yaml")
    if os.path.exists(named):
        return named
    have = sorted(f[:-5] for f in os.listdir(EXPERIMENTS_DIR) if f.endswith(".yaml")) if os.path.isdir(
        EXPERIMENTS_DIR) else []
    raise ConfigError(f"--experiment {name_or_path}: no such spec file, and not a named experiment "
                      f"(named: {', '.join(have) or 'none'})")


def load_spec(name_or_path: str | None, overrides: dict[str, Any] | None = None,
              override_origin: typing.Callable[[str], str] | None = None) -> ExperimentSpec:
    """The spec file (or the defaults), then ``overrides`` (command-line values), checked."""
    origins: dict[str, str] = {}
    if name_or_path:
        path = resolve_path(name_or_path)
        doc = read_yaml(path)
        spec, origins = from_mapping(doc, path)
    else:
        spec = ExperimentSpec()
    for name, value in (overrides or {}).items():
        where = override_origin(name) if override_origin else "command line"
        setattr(spec, name, check_field(name, value, where))
        origins[name] = where
    return spec.validate(origins)


def subset_regions(subset: str) -> list[str] | None:
    """'all' -> None (every region); 'VISp+VISl' -> ['VISl', 'VISp']."""
    return None if subset == "all" else sorted(set(subset.split("+")))
