"""The architecture variants of the multi-modal paper's ablation (App. D, Table 1), built by name.

- ``main``       one cross-attention (CA) encoder per modality, shared self-attention (SA) trunk
- ``common-ca``  one CA encoder (and one set of latent queries) shared by both modalities
- ``unique-sa``  a modality-specific SA block after each modality's CA, then the shared trunk
- ``separate``   independent encoders (CA + SA stack per modality); only the decoder is shared

As in the paper, layers are adjusted so every variant has main's parameter count: the shared trunk's
depth (``separate``: the per-modality SA depth) is searched for the closest count; only when no depth
lands within 5% does the search also stack a second cross-attention layer in the encoder. Counts
leave out the unit and session vocabularies, which are identical in every variant and grow with
the data.

    python -m trainer.model.variants               # papers' configuration
    python -m trainer.model.variants --preset small
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable

import torch

from trainer.model.config import ModelConfig
from trainer.model.network import MultiModalPOYO, n_parameters

VARIANTS = ("main", "common-ca", "unique-sa", "separate")
TOLERANCE = 0.05


def _tiers(name: str, c: ModelConfig) -> list[Iterable[ModelConfig]]:
    """Candidate configs of a variant, in order of preference (first tier that fits wins)."""
    depths = range(0, 4 * max(c.depth, 1) + 4)
    if name == "main":
        return [[c]]
    if name == "common-ca":
        return [(c.replace(shared_encoder=True, depth=d) for d in depths),
                (c.replace(shared_encoder=True, depth=d, encoder_ca_depth=k) for k in (2, 3) for d in depths)]
    if name == "unique-sa":
        return [(c.replace(modality_depth=1, depth=d) for d in depths)]
    if name == "separate":
        return [(c.replace(depth=0, modality_depth=k) for k in range(1, len(depths)))]
    raise ValueError(f"unknown variant {name!r}; one of {VARIANTS}")


def _count(config: ModelConfig) -> int:
    """Parameters of the model ``config`` builds, vocabularies left out (they are the same in every variant)."""
    with torch.device("meta"):  # shapes only, no memory, no init cost
        model = MultiModalPOYO(config=config.replace(compile=False), n_units=1, n_sessions=1)
    return n_parameters(model, embeddings=False)


def variant_config(name: str, config: ModelConfig) -> ModelConfig:
    """The config of variant ``name`` whose parameter count is closest to ``main`` built from ``config``."""
    target = _count(config)
    best: tuple[float, ModelConfig] | None = None
    for tier in _tiers(name, config):
        for cand in tier:
            gap = abs(_count(cand) - target) / target
            if best is None or gap < best[0]:
                best = (gap, cand)
        if best[0] <= TOLERANCE:
            break
    return best[1].replace(compile=config.compile)


def build_model(name: str, config: ModelConfig, n_units: int, n_sessions: int) -> MultiModalPOYO:
    """Build variant ``name`` (``VARIANTS``) of the model described by ``config`` (the ``main`` settings),
    with vocabularies of ``n_units`` units and ``n_sessions`` sessions."""
    return MultiModalPOYO(config=variant_config(name, config), n_units=n_units, n_sessions=n_sessions)


def param_table(config: ModelConfig, n_units: int = 0, n_sessions: int = 0,
                printer: Callable[[str], None] | None = print) -> list[dict]:
    """One row per variant: its layer layout and parameter counts relative to main (printed unless
    ``printer`` is None)."""
    target = _count(config)
    emb = (n_units + n_sessions) * config.dim
    rows = []
    for name in VARIANTS:
        c = variant_config(name, config)
        n = _count(c)
        rows.append({"variant": name, "encoders": 1 if c.shared_encoder else 2, "encoder_ca_depth": c.encoder_ca_depth,
                     "modality_depth": c.modality_depth, "trunk_depth": c.depth, "params": n,
                     "params_with_vocab": n + emb, "vs_main": n / target - 1})
    if printer is not None:
        printer(f"{'variant':<10} {'encoders':>8} {'CA/enc':>6} {'SA/enc':>6} {'trunk SA':>8} "
                f"{'params':>10} {'+vocab':>10} {'vs main':>8}")
        for r in rows:
            printer(f"{r['variant']:<10} {r['encoders']:>8} {r['encoder_ca_depth']:>6} {r['modality_depth']:>6} "
                    f"{r['trunk_depth']:>8} {r['params']:>10,} {r['params_with_vocab']:>10,} {r['vs_main']:>+8.2%}")
    return rows


def main() -> None:
    """``python -m trainer.model.variants``: print ``param_table`` for the papers' or the small preset."""
    p = argparse.ArgumentParser(description="Print the ablation variants' layouts and parameter counts.")
    p.add_argument("--preset", choices=["paper", "small"], default="paper", help="config preset (default: paper)")
    p.add_argument("--n-units", type=int, default=20000, help="unit vocabulary size for the +vocab column (default: 20000)")
    p.add_argument("--n-sessions", type=int, default=200, help="session vocabulary size (default: 200)")
    a = p.parse_args()
    config = ModelConfig() if a.preset == "paper" else ModelConfig.small()
    param_table(config, a.n_units, a.n_sessions)


if __name__ == "__main__":
    main()
