"""Model configuration: one frozen dataclass, the papers' defaults, and a small preset for CPU.

Defaults follow POYO+ (Azabou et al., App. C.2) and the multi-modal paper (Knight et al., which
reuses POYO+'s settings): dim 128, 6 self-attention layers, 128 latents (8 latent time steps x 16
latents per step over a 1 s window), cross-attention with 2 heads, self-attention with 8 heads,
dropout 0.2 in attention and feed-forward nets. Head width 64 and the residual ("lin") dropout 0.4
come from torch_brain's POYO+ configs, which the multi-modal paper says it follows.

The architecture variants of the multi-modal paper's ablation (App. D) are the knobs
``shared_encoder``, ``encoder_ca_depth``, ``modality_depth`` and ``depth``; ``trainer.model.variants``
sets them by name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from shards.schema import TASKS


@dataclass(frozen=True)
class TaskSpec:
    """One decoding task: its name, output width (classes, or regression dimension), loss kind
    and loss weight (POYO+ Table A2 weights; 1.0 by default)."""

    name: str
    out_dim: int
    kind: str = "classification"  # "classification" (cross-entropy) | "regression" (MSE)
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("classification", "regression"):
            raise ValueError(f"task {self.name!r}: kind must be classification or regression, got {self.kind!r}")
        if self.out_dim < 1:
            raise ValueError(f"task {self.name!r}: out_dim must be >= 1")


def default_tasks() -> tuple[TaskSpec, ...]:
    """The three Allen stimulus tasks in ``shards/schema.py`` order, so ``output_task_index`` i is
    ``tasks[i]`` (static_gratings 6, drifting_gratings 8, natural_scenes 119 classes)."""

    return tuple(TaskSpec(name=t.name, out_dim=t.n_classes) for t in TASKS.values())


@dataclass(frozen=True)
class ModelConfig:
    """Everything that shapes the model. Build it with keywords; derive variants with ``replace``."""

    # widths and depths
    dim: int = 128  # token / latent width D
    depth: int = 6  # self-attention blocks in the shared trunk
    dim_head: int = 64  # width of one attention head (rotary acts on all of it)
    cross_heads: int = 2  # heads of the encoder and decoder cross-attention
    self_heads: int = 8  # heads of the self-attention blocks
    ffn_mult: int = 4  # GEGLU hidden width = ffn_mult * dim
    # latents: latents_per_step learned vectors repeated at window_s / latent_step evenly spaced times
    window_s: float = 1.0
    latent_step: float = 0.125
    latents_per_step: int = 16
    # regularisation
    ffn_dropout: float = 0.2
    attn_dropout: float = 0.2
    residual_dropout: float = 0.4  # on the trunk's residual branches (torch_brain's lin_dropout)
    emb_init_scale: float = 0.02
    # rotary time embedding: periods log-spaced from t_min to t_max seconds (POYO+ App. C.1)
    t_min: float = 1e-4
    t_max: float = 4.0
    rotate_frac: float = 1.0  # share of each head's pairs that rotate (torch_brain: 0.5); the rest match by content
    rotate_values: bool = False  # papers' eq. (1)-(3) rotate queries and keys only; torch_brain also rotates values
    time_prior: float = 0.0  # > 0: learned q/k offsets start as a time-local kernel, this many logits per pair
    zero_init_residual: bool = False  # residual branches' output projections start at 0 (blocks start as identity)
    calcium_gain: bool = False  # calcium tokens also get a per-unit key/value direction times dF/F (attention.py)
    calcium_scale: float = 1.0  # dF/F is multiplied by this before the calcium encoder (layers.Encoder)
    calcium_lag_s: float = 0.0  # OPhys windows read frames this much later, stamped back (shards.stream.tokens)
    calcium_bin: int = 1  # OPhys frames averaged into one token per ROI (shards.stream.tokens)
    encoder_sinks: bool = False  # a learned token at every latent time step of each sample (layers.Encoder)
    unit_rank: int = 0  # > 0: a unit's own row has this many numbers, mapped to dim by one shared linear map
    count_loss: float = 0.0  # > 0: weight of the units' Poisson count loss around labelled EPhys queries (counts.py)
    count_rank: int = 16  # the count loss's code width per (task, class)
    count_norm: bool = False  # the count loss reads the rows' direction only (LayerNorm), not their length
    count_latency_s: float = 0.05  # the count loss's span starts this long after the query's span starts
    count_span_s: float = 0.25  # the count loss's span around a query's time
    likelihood_readout: bool = False  # classification logits gain the units' log-likelihood per class (likelihood.py)
    likelihood_own_rows: bool = False  # the readout reads its own unit table (True) or the encoder's rows
    likelihood_ophys: bool = True  # the readout also scores OPhys queries, by calcium innovations (off: EPhys only)
    likelihood_decoder_loss: float = 1.0  # weight of the decoder's own logits' loss beside the summed logits'
    # weight of its encoding model's own fit (negative log-likelihood) in the loss; the fit is a mean over (query,
    # unit) pairs and the cross-entropy a mean over queries, so near a record's units per query (60 in the
    # benchmark) a query's units' fit weighs what its cross-entropy does (docs/model.md section 25)
    likelihood_fit: float = 1.0
    likelihood_rank: int = 16  # width of the likelihood readout's class code
    likelihood_ophys_before: bool = False  # OPhys: each span's innovations conditioned on the one just before it
    # OPhys: "filter", a matched filter over the window's innovations with decision feedback for the neighbours
    # (calcium_filter.py; this many feedback passes), or "sum" of the span's innovations (likelihood.py; the form
    # before docs/model.md section 22)
    likelihood_ophys_form: str = "filter"
    likelihood_ophys_feedback: int = 2
    # the filter's generative fit per (sample, ROI): its innovations' summed negative log-likelihood ("group"), or
    # their mean ("token": one term per ROI and window, the scale of an EPhys (query, unit) term)
    likelihood_ophys_fit_norm: str = "group"
    # inside: one gain per unit, a sharpness per (unit, task) inside the softplus; unit: a gain per (unit, task)
    # outside it; shared: one per unit + one per (modality, task); X/Y: EPhys X, OPhys Y
    likelihood_task_gains: str = "inside"
    likelihood_latency_ephys_s: float = 0.05  # its spans start this long after the presentation's, EPhys
    likelihood_latency_ophys_s: float = 0.1  # and OPhys (calcium rises over ~0.1 s)
    # architecture variant (trainer.model.variants)
    shared_encoder: bool = False  # True: one cross-attention encoder for both modalities ("common-ca")
    encoder_ca_depth: int = 1  # cross-attention layers per encoder
    modality_depth: int = 0  # modality-specific self-attention blocks after each encoder
    # outputs
    tasks: tuple[TaskSpec, ...] = field(default_factory=default_tasks)
    # execution
    attn_backend: str = "auto"  # auto | loop | nested | flex | flash (trainer.model.attention)
    amp: bool = True  # bf16 autocast when the model runs on CUDA (CPU stays fp32)
    amp_on_cpu: bool = False  # bf16 autocast on CPU too (CPUs with AVX512-BF16/AMX; tests the bf16 path without a GPU)
    compile: bool = False  # torch.compile the dense blocks (trunk, feed-forward nets)

    def __post_init__(self) -> None:
        steps = self.window_s / self.latent_step
        if abs(steps - round(steps)) > 1e-6 or round(steps) < 1:
            raise ValueError(f"window_s ({self.window_s}) must be a whole number of latent_step ({self.latent_step})")
        if self.unit_rank < 0:
            raise ValueError(f"unit_rank must be >= 0 (0: rows as wide as dim), got {self.unit_rank}")
        if self.count_loss < 0 or self.count_rank < 1 or not 0 < self.count_span_s <= self.window_s:
            raise ValueError(f"count_loss must be >= 0, count_rank >= 1 and count_span_s in (0, window_s], got "
                             f"{self.count_loss}, {self.count_rank}, {self.count_span_s}")
        forms = self.likelihood_task_gains.split("/")
        if len(forms) > 2 or any(f not in ("unit", "shared", "inside") for f in forms):
            raise ValueError(f"likelihood_task_gains must be unit, shared or inside, or EPhys/OPhys (inside/unit), "
                             f"got {self.likelihood_task_gains!r}")
        if self.likelihood_ophys_form not in ("sum", "filter") or self.likelihood_ophys_feedback < 0:
            raise ValueError(f"likelihood_ophys_form must be sum or filter and likelihood_ophys_feedback >= 0, got "
                             f"{self.likelihood_ophys_form!r}, {self.likelihood_ophys_feedback}")
        if self.likelihood_ophys_fit_norm not in ("group", "token"):
            raise ValueError(f"likelihood_ophys_fit_norm must be group or token, got {self.likelihood_ophys_fit_norm!r}")
        if self.likelihood_ophys_form == "filter" and self.likelihood_ophys_before:
            raise ValueError("likelihood_ophys_before conditions the sum form's span; the filter form reads every "
                             "token of the window already (set one of them)")
        if self.likelihood_rank < 1 or self.likelihood_fit < 0 or self.likelihood_decoder_loss < 0:
            raise ValueError(f"likelihood_rank must be >= 1, likelihood_fit and likelihood_decoder_loss >= 0, got "
                             f"{self.likelihood_rank}, {self.likelihood_fit}, {self.likelihood_decoder_loss}")
        if self.dim_head % 2:
            raise ValueError("dim_head must be even (rotary pairs)")
        if self.encoder_ca_depth < 1 or self.depth < 0 or self.modality_depth < 0:
            raise ValueError("encoder_ca_depth >= 1, depth >= 0, modality_depth >= 0")
        if not self.tasks:
            raise ValueError("at least one task")
        if not 0.0 <= self.calcium_lag_s < self.window_s:
            raise ValueError(f"calcium_lag_s must be in [0, window_s={self.window_s}), got {self.calcium_lag_s}")
        if self.calcium_bin < 1:
            raise ValueError(f"calcium_bin must be >= 1 (frames per token), got {self.calcium_bin}")

    @property
    def n_latent_steps(self) -> int:
        return int(round(self.window_s / self.latent_step))

    @property
    def n_latents(self) -> int:
        """Latent tokens per sample (M x N in the papers' notation)."""
        return self.n_latent_steps * self.latents_per_step

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def small(cls, **changes: Any) -> ModelConfig:
        """A small model for CPU tests and the demo: dim 32, 2 trunk layers, 32 latents, no dropout.

        Heads of 32 (2 per block) with half of each rotated over periods 10 ms .. 4 s and started as a
        time-local kernel (``time_prior``), latents every 0.125 s, residual branches that start at zero.
        The earlier preset (heads of 8 fully rotated from 0.1 ms, latents every 0.25 s, default init)
        stayed at chance on the demo corpus's static gratings (docs/model.md has the measurements).
        Width 32 because the tests and ``make demo`` train it on 2 cores. Width 64 decodes better at the
        benchmark's protocol (2,500 pretraining steps, 20 finetuning epochs): natural scenes 0.325 vs 0.139
        (EPhys) and 0.216 vs 0.094 (OPhys), so bench/science.py's CPU configuration overrides ``dim=64``
        (docs/model.md, section 7). At the earlier, shorter protocol it did not pay (section 3).
        OPhys tokens average 3 frames (``calcium_bin``): half the step time of a mixed batch at the same
        accuracy (docs/model.md, section 6)."""
        base = dict(
            dim=32, depth=2, dim_head=32, cross_heads=2, self_heads=2, ffn_mult=2,
            latent_step=0.125, latents_per_step=4,
            ffn_dropout=0.0, attn_dropout=0.0, residual_dropout=0.0,
            t_min=1e-2, rotate_frac=0.5, time_prior=1.0, zero_init_residual=True, calcium_bin=3,
        )
        base.update(changes)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (loads with ``torch.load(weights_only=True)``)."""
        d = dataclasses.asdict(self)
        d["tasks"] = [dataclasses.asdict(t) for t in self.tasks]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        d.setdefault("likelihood_task_gains", "unit")  # checkpoints from before the field: the form they were trained in
        d.setdefault("likelihood_ophys_before", False)
        d.setdefault("likelihood_ophys_form", "sum")  # checkpoints from before the field: the span sum
        d["tasks"] = tuple(TaskSpec(**t) for t in d["tasks"])
        return cls(**d)
