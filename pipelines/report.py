"""`tshsr-pipe report`: training curves as PNG and the run's final table."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from extract.safeio import atomic_write_with
from matching.training.rundir import RECALL_FIELDS, RunDirectory, RunError


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, float]]:
    """The run's metrics rows; RunError when it has none yet."""
    run = RunDirectory(Path(run_dir))
    if not run.metrics.exists():
        raise RunError(f"{run.metrics}: missing; is {run_dir} a run directory with at least one finished epoch?")
    rows = run.read_metrics()
    if not rows:
        raise RunError(f"{run.metrics}: no epochs recorded yet")
    return rows


def curves_figure(rows: list[dict[str, float]], title: str = "") -> Any:
    """The matplotlib figure: loss per epoch (left) and validation R@1/5/10 both ways (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    # Markers on every curve: a run of one epoch is one point, which a line alone would not show.
    left.plot(epochs, [row["train_loss"] for row in rows], marker="o")
    left.set(xlabel="epoch", ylabel="training loss (mean per step)", title="loss", yscale="log")
    for axis in (left, right):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    if any("rsum" in row for row in rows):
        for key, style in zip(RECALL_FIELDS, ("-", "--", ":") * 2, strict=True):
            values = [row.get(key, float("nan")) for row in rows]
            colour = "tab:blue" if key.startswith("i2t") else "tab:orange"
            direction, recall = key.split("_")
            right.plot(epochs, values, style, marker="o", color=colour, label=f"{direction} R@{recall[1:]}")
        right.set(xlabel="epoch", ylabel="recall (%)", title="validation recall", ylim=(0, 100))
        right.legend(ncol=2, fontsize="small")
    else:
        right.text(0.5, 0.5, "no validation", ha="center", va="center")
        right.set_axis_off()
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def plot_curves(rows: list[dict[str, float]], out: str | os.PathLike, title: str = "") -> Path:
    """The curves (`curves_figure`) as a PNG file, written atomically."""
    import matplotlib.pyplot as plt

    figure = curves_figure(rows, title)
    try:
        return atomic_write_with(out, lambda tmp: figure.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(figure)


def final_table(rows: list[dict[str, float]]) -> str:
    """The last epoch and the best epoch, one line each."""
    best = max(rows, key=lambda row: row.get("rsum", -1.0))
    columns = (*RECALL_FIELDS, "rsum")
    lines = [f"{'':<6} {'epoch':>5} {'loss':>9} " + " ".join(f"{k:>8}" for k in columns)]
    for label, row in (("last", rows[-1]), ("best", best)):
        cells = " ".join(f"{row.get(k, float('nan')):8.1f}" for k in columns)
        lines.append(f"{label:<6} {int(row['epoch']):>5} {row['train_loss']:9.4f} {cells}")
    return "\n".join(lines)
