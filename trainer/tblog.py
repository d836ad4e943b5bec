"""TensorBoard from rank 0: scalars with the global step, and confusion-matrix images.

Ray Train writes no TensorBoard of its own, so rank 0 owns one ``SummaryWriter`` under
``RUN/tb/``. A resumed run opens it with ``purge_step`` = the checkpoint's step + 1, so TensorBoard
drops what the interrupted attempt logged after its last checkpoint, and curves continue without
duplicates. The writer is flushed at every checkpoint (a crashed worker loses nothing checkpointed).
Other ranks get a ``NullLog`` whose methods do nothing, so the loop never asks "am I rank 0?".
"""

from __future__ import annotations

import math

import numpy as np


class TBLog:
    def __init__(self, log_dir: str, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir, purge_step=purge_step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, v in values.items():
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                self.writer.add_scalar(tag, v, step)

    def confusion(self, matrices: dict[str, dict[str, np.ndarray]], step: int, prefix: str = "val") -> None:
        """One image per task: a panel per modality, rows (true class) normalised."""
        for task, per_modality in matrices.items():
            fig = confusion_figure(task, per_modality)
            self.writer.add_figure(f"{prefix}/confusion/{task}", fig, step, close=True)

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class NullLog:
    """What ranks other than 0 log: nothing."""

    def scalars(self, *a, **k) -> None: ...
    def confusion(self, *a, **k) -> None: ...
    def text(self, *a, **k) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


def confusion_figure(task: str, per_modality: dict[str, np.ndarray]):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(per_modality), figsize=(4.2 * len(per_modality), 4), squeeze=False)
    for ax, (mod, m) in zip(axes[0], per_modality.items()):
        rows = m.sum(1, keepdims=True)
        norm = np.divide(m, rows, out=np.zeros_like(m, dtype=float), where=rows > 0)
        im = ax.imshow(norm, vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        acc = np.trace(m) / max(m.sum(), 1)
        ax.set_title(f"{mod}: acc {acc:.3f} (n={int(m.sum())})", fontsize=9)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if m.shape[0] <= 12:
            ax.set_xticks(range(m.shape[0]))
            ax.set_yticks(range(m.shape[0]))
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(task, fontsize=10)
    fig.tight_layout()
    return fig
