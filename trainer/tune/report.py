"""SWEEP/results.md and the plots, from results.parquet alone (``python -m trainer.tune report SWEEP``).

Every figure is mean ± SEM over seeds of a per-seed mean over held-out records (the papers' "average of
the evaluation sessions across seeds"). The pretraining set of a row is its point without the seed.

- Tables 2-4 (one per task): rows = pretraining sets, columns = modality x region of the evaluation
  sessions; "—" where the set was not evaluated on that modality.
- Table 1 (when the sweep has several variants): rows = variants, columns = tasks, per evaluated
  modality; the best mean in bold.
- ``scaling.png`` (Fig. 2): accuracy vs pretraining set size per mixture, SEM bars, one panel per task
  and evaluated modality.
- ``transfer.png`` (Figs. 3 and 4): for every multi-modal set with an OPhys-only baseline (ratio 0, same
  OPhys regions, set size and variant), the change in OPhys test accuracy per evaluation region; a
  ``*`` marks a change whose sign all paired seeds agree on. With the baseline itself as the first row.
- ``ablation.png`` (Table 1, when several variants): bars per variant and task with SEM.

Records of labels that name no brain area (``trainer.tune.heldout.NOT_AREAS``: Allen's ``grey`` and ``root``,
ingest's ``unknown``) stay in the parquet but not in the tables, means or plots: they are no area to put in a
column, and averaging them in would let a probe's unannotated channels move a set's score. results.md says
how many rows it left out.

The same parquet gives the same bytes: rows are sorted, numbers formatted at fixed precision, PNGs
written without a timestamp or version in their metadata.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd

from shards.schema import TASKS
from shards.store import Store
from trainer.tune.heldout import NOT_AREAS, area_rows
from trainer.tune.results import read

TASK_ORDER = tuple(TASKS)  # the order the papers' tables use
TASK_TITLE = {"static_gratings": "Static Gratings", "drifting_gratings": "Drifting Gratings",
              "natural_scenes": "Natural Scenes"}
MOD_TITLE = {"ephys": "EPhys", "ophys": "OPhys"}
SET_COLS = ["ratio", "set_size", "variant", "ophys_regions", "ephys_regions", "weights"]
DASH = "—"


def mean_sem(values) -> tuple[float, float]:
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=float)
    if not len(v):
        return math.nan, math.nan
    return float(v.mean()), (float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0)


def cell(m: float, s: float) -> str:
    return DASH if math.isnan(m) else f"{m:.4f} ± {s:.4f}"


def set_label(row) -> str:
    """A pretraining set in words: 'EPhys all + OPhys VISp (r=0.5, n=all)'."""
    parts = []
    if row["weights"]:
        parts.append(f"searched weights {row['weights']}")
    else:
        if row["ratio"] > 0:
            parts.append(f"EPhys {row['ephys_regions']}")
        if row["ratio"] < 1:
            parts.append(f"OPhys {row['ophys_regions']}")
    n = "all" if pd.isna(row["set_size"]) else int(row["set_size"])
    return f"{' + '.join(parts)} (r={row['ratio']:g}, n={n}, {row['variant']})"


def tasks_of(df: pd.DataFrame) -> list[str]:
    have = set(df.task)
    return [t for t in TASK_ORDER if t in have] + sorted(have - set(TASK_ORDER))


def per_seed(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Mean accuracy over records per (pretraining set, seed, *by)."""
    keys = ["label", *SET_COLS, "seed", *by]
    return df.groupby(keys, dropna=False, sort=True)["accuracy"].mean().reset_index()


def summarise(df: pd.DataFrame, by: list[str]) -> dict[tuple, tuple[float, float, int]]:
    """{(label, *by): (mean, sem, seeds)} over seeds."""
    out = {}
    ps = per_seed(df, by)
    for key, g in ps.groupby(["label", *by], dropna=False, sort=True):
        m, s = mean_sem(g.accuracy.tolist())
        out[key if isinstance(key, tuple) else (key,)] = (m, s, len(g))
    return out


def prepare(df: pd.DataFrame) -> pd.DataFrame:
    df = area_rows(df).copy()
    df["weights"] = df["weights"].fillna("")
    df["label"] = [set_label(r) for _, r in df.iterrows()]
    return df


def set_order(df: pd.DataFrame) -> list[str]:
    first = df.drop_duplicates("label").copy()
    first["_size"] = first.set_size.fillna(10**9)
    first = first.sort_values(["variant", "ratio", "_size", "ophys_regions", "ephys_regions", "weights"])
    return first.label.tolist()


# ---- tables ------------------------------------------------------------------------------------------

def transfer_tables(df: pd.DataFrame) -> list[str]:
    """Tables 2-4: one per task; rows = pretraining sets, columns = modality x evaluation region."""
    lines, stats, order = [], summarise(df, ["task", "modality", "region"]), set_order(df)
    cols = [(m, r) for m in ("ephys", "ophys") for r in sorted(df[df.modality == m].region.unique())]
    for task in tasks_of(df):
        lines += [f"### {TASK_TITLE.get(task, task)}: test accuracy on the held-out sessions", ""]
        lines.append("| pretraining set | " + " | ".join(f"{MOD_TITLE[m]} {r}" for m, r in cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        for label in order:
            vals = [stats.get((label, task, m, r), (math.nan, math.nan, 0)) for m, r in cols]
            lines.append(f"| {label} | " + " | ".join(cell(v[0], v[1]) for v in vals) + " |")
        lines.append("")
    return lines


def ablation_table(df: pd.DataFrame) -> list[str]:
    """Table 1: rows = variants, columns = tasks, per evaluated modality, the best mean in bold."""
    lines = []
    ps = df.groupby(["variant", "seed", "modality", "task"], sort=True)["accuracy"].mean().reset_index()
    variants = sorted(df.variant.unique())
    for mod in sorted(df.modality.unique()):
        tasks = tasks_of(df[df.modality == mod])
        stats = {(v, t): mean_sem(ps[(ps.variant == v) & (ps.modality == mod) & (ps.task == t)].accuracy.tolist())
                 for v in variants for t in tasks}
        best = {t: max((stats[(v, t)][0] for v in variants if not math.isnan(stats[(v, t)][0])), default=math.nan)
                for t in tasks}
        lines += [f"### Ablation, {MOD_TITLE.get(mod, mod)} held-out sessions (mean ± SEM over seeds; each seed "
                  f"averaged over the sweep's pretraining sets)", ""]
        lines.append("| variant | " + " | ".join(TASK_TITLE.get(t, t) for t in tasks) + " |")
        lines.append("|---|" + "---|" * len(tasks))
        for v in variants:
            cells = []
            for t in tasks:
                text = cell(*stats[(v, t)])
                cells.append(f"**{text}**" if stats[(v, t)][0] == best[t] and len(variants) > 1 else text)
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def markdown(df: pd.DataFrame) -> str:
    left_out = sorted(set(df.region) & NOT_AREAS)
    n_left = len(df) - len(area_rows(df))
    df = prepare(df)
    exp = ", ".join(f"{e} v{v}" for e, v in sorted(set(zip(df.experiment, df.version))))
    seeds = sorted(df.seed.unique())
    lines = [f"# Sweep results: {exp}", "",
             f"{df.label.nunique()} pretraining set(s) x {len(seeds)} seed(s) ({', '.join(map(str, seeds))}), "
             f"{df.session.nunique()} held-out session(s), {len(df)} rows. Test accuracy per record (one "
             f"prediction per presentation), mean over records per seed, then mean ± SEM over seeds."
             + (f" Left out: {n_left} row(s) of records labelled {', '.join(left_out)} (no brain area)."
                if n_left else ""), "",
             "## Transfer tables (the papers' Tables 2-4)", ""]
    lines += transfer_tables(df)
    if df.variant.nunique() > 1:
        lines += ["## Ablation (the papers' Table 1)", ""] + ablation_table(df)
    lines += ["## Plots", "", "- `scaling.png`: accuracy vs pretraining set size per mixture (Fig. 2)"]
    if transfer_rows(df):
        lines.append("- `transfer.png`: change in OPhys accuracy vs the OPhys-only baseline (Figs. 3-4)")
    if df.variant.nunique() > 1:
        lines.append("- `ablation.png`: accuracy per variant (Table 1)")
    return "\n".join(lines) + "\n"


# ---- plots ---------------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    _plt().close(fig)
    return buf.getvalue()


def mixture_label(row) -> str:
    if row["weights"]:
        return "searched weights"
    return f"r={row['ratio']:g} E:{row['ephys_regions']} O:{row['ophys_regions']} {row['variant']}"


def scaling_plot(df: pd.DataFrame) -> bytes:
    """Fig. 2: accuracy vs set size per mixture (SEM bars); one panel per (evaluated modality, task)."""
    plt = _plt()
    mods, tasks = sorted(df.modality.unique()), tasks_of(df)
    sizes = sorted({int(s) for s in df.set_size.dropna()}) + (["all"] if df.set_size.isna().any() else [])
    xpos = {s: i for i, s in enumerate(sizes)}
    fig, axes = plt.subplots(len(mods), len(tasks), figsize=(4.2 * len(tasks), 3.4 * len(mods)), squeeze=False)
    df = df.assign(mixture=[mixture_label(r) for _, r in df.iterrows()],
                   size=["all" if pd.isna(s) else int(s) for s in df.set_size])
    ps = df.groupby(["mixture", "size", "seed", "modality", "task"], sort=True)["accuracy"].mean().reset_index()
    for i, mod in enumerate(mods):
        for j, task in enumerate(tasks):
            ax = axes[i][j]
            sub = ps[(ps.modality == mod) & (ps.task == task)]
            for mixture, g in sub.groupby("mixture", sort=True):
                pts = sorted(((xpos[s], *mean_sem(gg.accuracy.tolist())) for s, gg in g.groupby("size", sort=False)))
                x, m, s = zip(*pts)
                ax.errorbar(x, m, yerr=s, marker="o", capsize=3, label=mixture)
            ax.set_xticks(range(len(sizes)), [str(s) for s in sizes])
            ax.set_xlabel("pretraining sessions per region")
            ax.set_title(f"{MOD_TITLE.get(mod, mod)} held-out: {TASK_TITLE.get(task, task)}", fontsize=9)
            ax.set_ylabel("test accuracy")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    return png_bytes(fig)


def transfer_rows(df: pd.DataFrame) -> list[tuple[str, str]]:
    """(multi-modal set label, its OPhys-only baseline's label) pairs the sweep can compare."""
    sets = df.drop_duplicates("label")
    pairs = []
    for _, r in sets[(sets.ratio > 0) & (sets.ratio < 1) & (sets.weights == "")].iterrows():
        base = sets[(sets.ratio == 0) & (sets.ophys_regions == r.ophys_regions) & (sets.variant == r.variant)
                    & (sets.set_size.fillna(-1) == (-1 if pd.isna(r.set_size) else r.set_size))]
        if len(base):
            pairs.append((r.label, base.label.iloc[0]))
    return sorted(pairs)


def transfer_changes(df: pd.DataFrame) -> dict[tuple[str, str, str], tuple[float, bool]]:
    """{(multi-modal set, task, OPhys evaluation region): (mean change vs its OPhys-only baseline over the
    seeds both have, whether every one of those seeds changed the same way)}."""
    oph = df[df.modality == "ophys"]
    ps = oph.groupby(["label", "task", "region", "seed"], sort=True)["accuracy"].mean()
    out = {}
    for label, base in transfer_rows(df):
        for (lab, task, region), mine in ps.groupby(level=[0, 1, 2]):
            if lab != label or (base, task, region) not in ps.index.droplevel(3):
                continue
            theirs = ps.loc[(base, task, region)]
            mine = mine.droplevel([0, 1, 2])
            seeds = sorted(set(mine.index) & set(theirs.index))
            diffs = [float(mine[s] - theirs[s]) for s in seeds]
            if diffs:
                out[(label, task, region)] = (float(np.mean(diffs)),
                                              all(d > 0 for d in diffs) or all(d < 0 for d in diffs))
    return out


def transfer_plot(df: pd.DataFrame) -> bytes | None:
    """Figs. 3-4: per task, rows = the baseline(s) then each multi-modal set, columns = OPhys evaluation
    regions; baseline rows show accuracy, the others the change against their baseline, '*' where every
    paired seed changes the same way."""
    pairs = transfer_rows(df)
    if not pairs:
        return None
    plt = _plt()
    oph = df[df.modality == "ophys"]
    regions, tasks = sorted(oph.region.unique()), tasks_of(oph)
    base_acc = summarise(oph, ["task", "region"])
    changes = transfer_changes(df)
    bases = sorted({b for _, b in pairs})
    rows = [(b, None) for b in bases] + pairs
    fig, axes = plt.subplots(1, len(tasks), figsize=(1.2 * len(regions) + 4.5 * len(tasks), 0.45 * len(rows) + 2),
                             squeeze=False)
    for j, task in enumerate(tasks):
        ax = axes[0][j]
        mat = np.full((len(rows), len(regions)), np.nan)
        for i, (label, base) in enumerate(rows):
            for k, reg in enumerate(regions):
                if base is None:
                    m = base_acc.get((label, task, reg), (math.nan,))[0]
                    if not math.isnan(m):
                        ax.text(k, i, f"{m:.2f}", ha="center", va="center", fontsize=7)
                    continue
                if (label, task, reg) in changes:
                    delta, agree = changes[(label, task, reg)]
                    mat[i, k] = delta
                    ax.text(k, i, f"{delta:+.2f}" + ("*" if agree else ""), ha="center", va="center", fontsize=7)
        lim = float(np.nanmax(np.abs(mat))) if np.isfinite(mat).any() else 0.0
        ax.imshow(mat, cmap="RdBu", vmin=-(lim or 1.0), vmax=lim or 1.0, aspect="auto")
        ax.set_xticks(range(len(regions)), regions, fontsize=8)
        ax.set_yticks(range(len(rows)), [("baseline: " if b is None else "Δ ") + lab for lab, b in rows], fontsize=7)
        ax.set_xlabel("OPhys evaluation region")
        ax.set_title(f"{TASK_TITLE.get(task, task)}: change vs OPhys-only (* all seeds agree)", fontsize=9)
    fig.tight_layout()
    return png_bytes(fig)


def ablation_plot(df: pd.DataFrame) -> bytes | None:
    if df.variant.nunique() < 2:
        return None
    plt = _plt()
    mods, variants = sorted(df.modality.unique()), sorted(df.variant.unique())
    ps = df.groupby(["variant", "seed", "modality", "task"], sort=True)["accuracy"].mean().reset_index()
    fig, axes = plt.subplots(1, len(mods), figsize=(5.5 * len(mods), 3.6), squeeze=False)
    for ax, mod in zip(axes[0], mods):
        tasks = tasks_of(df[df.modality == mod])
        x = np.arange(len(tasks))
        width = 0.8 / len(variants)
        for i, v in enumerate(variants):
            stats = [mean_sem(ps[(ps.variant == v) & (ps.modality == mod) & (ps.task == t)].accuracy.tolist())
                     for t in tasks]
            ax.bar(x + (i - (len(variants) - 1) / 2) * width, [s[0] for s in stats], width,
                   yerr=[s[1] for s in stats], capsize=2, label=v)
        ax.set_xticks(x, [TASK_TITLE.get(t, t) for t in tasks], fontsize=8)
        ax.set_title(f"{MOD_TITLE.get(mod, mod)} held-out sessions", fontsize=9)
        ax.set_ylabel("test accuracy")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    return png_bytes(fig)


def build(sweep: Store) -> list[str]:
    """results.md and the PNGs in SWEEP, from results.parquet; returns what it wrote."""
    df = read(sweep)
    if not len(df):
        raise ValueError(f"{sweep.uri}/results.parquet has no rows (no trial finished)")
    if not len(area_rows(df)):
        raise ValueError(f"{sweep.uri}/results.parquet: every row is a record labelled "
                         f"{', '.join(sorted(set(df.region)))}, which names no brain area: nothing to report")
    written = {"results.md": markdown(df).encode()}
    pdf = prepare(df)
    for name, data in (("scaling.png", scaling_plot(pdf)), ("transfer.png", transfer_plot(pdf)),
                       ("ablation.png", ablation_plot(pdf))):
        if data is not None:
            written[name] = data
    for name, data in written.items():
        sweep.write_bytes(name, data)
    return sorted(written)
