"""What a run prints about its accuracy: one line in the log, a table at the end of a run.

Every figure comes from an evaluation summary (``trainer.tally.Tally.summary``): per modality, the
headline metric of each task (accuracy per presentation, mean over records; R² for a regression
task), then the modality's mean. The loop writes the one-line form after each validation; the
drivers (``trainer.train``, ``trainer.finetune``) print the table form from ``RUN/metrics.json``.
Both read the metric through ``headline``, so they never disagree on which number a task shows.
"""

from __future__ import annotations

import math
import os


def headline(metrics: dict) -> tuple[str, float]:
    """(name, value) of a task's headline metric: accuracy for classification, R² for regression."""
    key = "acc" if "acc" in metrics else "r2"
    return key, metrics.get(key, math.nan)


def accuracy_line(summary: dict) -> str:
    """The headline metric per modality and task, on one line, then the pooled per-query score when the
    summary has one."""
    parts = []
    for mod, e in summary.get("modality", {}).items():
        accs = ", ".join(f"{t} {headline(v)[1]:.3f}" for t, v in e["tasks"].items())
        parts.append(f"{mod}: {accs}")
    line = "; ".join(parts)
    if "pooled" in summary:
        line += f"  (pooled per query: score {summary['pooled'].get('score', math.nan):.4f})"
    return line


def accuracy_table(summary: dict) -> list[str]:
    """Lines of 'modality  task  metric  n' from an evaluation summary, each modality closed by its mean."""
    lines = []
    for mod, e in (summary or {}).get("modality", {}).items():
        for task, v in e["tasks"].items():
            key, value = headline(v)
            lines.append(f"  {mod:<6} {task:<18} {key} {value:.3f}  (n={int(v['n'])})")
        lines.append(f"  {mod:<6} {'mean':<18} {e['score']:.3f}")
    return lines


def record_lines(summary: dict) -> list[str]:
    """One line per (session, region) record: its headline metric per task and the presentations behind it."""
    lines = []
    for name, e in (summary or {}).get("record", {}).items():
        accs = ", ".join(f"{t} {headline(v)[1]:.3f} (n={int(v['n'])})" for t, v in e["tasks"].items())
        lines.append(f"  record {name} ({e['modality']}): {accs}")
    return lines


def print_summary(metrics: dict, out: str) -> None:
    """The end of ``python -m trainer.train``: status, loss, validation (and test) accuracy, where things are."""
    final, best = metrics.get("final") or {}, metrics.get("best") or {}
    score = final.get("score", math.nan)
    print(f"\n{metrics['status']} at step {metrics['step']}/{metrics['total_steps']} "
          f"(train loss {metrics['train']['first_loss']:.3f} -> {metrics['train']['last_loss']:.3f})")
    if final:
        print(f"validation accuracy per modality and task (score {score:.3f} = mean of EPhys and OPhys):")
        print("\n".join(accuracy_table(final)))
    if best:
        print(f"best validation score {best.get('score', math.nan):.3f} at step {best.get('step')} "
              f"-> {os.path.join(out, 'model_best.pt')}")
    if metrics.get("test"):
        print("test accuracy (best weights):")
        print("\n".join(accuracy_table(metrics["test"])))
    print(f"metrics: {os.path.join(out, 'metrics.json')}   log: {os.path.join(out, 'train.log')}")
    print(f"watch it: tensorboard --logdir {os.path.join(out, 'tb')}")


def print_test(metrics: dict, mode: str, out: str) -> None:
    """The end of ``python -m trainer.finetune``: test-split accuracy per task, then per record."""
    test = metrics.get("test") or {}
    pooled = (test.get("pooled") or {}).get("score", math.nan)
    print(f"\n{mode}: test-split accuracy per task, one prediction per presentation, mean over records "
          f"(score {test.get('score', math.nan):.3f}; pooled per query {pooled:.3f})")
    print("\n".join(accuracy_table(test)))
    for line in record_lines(test):
        print(line)
    print(f"metrics: {os.path.join(out, 'metrics.json')}")
