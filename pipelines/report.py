"""`tshsr-pipe report`: training curves as PNG and the run's final table."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from matching.training import CSV_FIELDS


class ReportError(ValueError):
    """The run directory has no metrics to report."""


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, float]]:
    path = Path(run_dir) / "metrics.csv"
    if not path.exists():
        raise ReportError(f"{path}: missing; is {run_dir} a run directory with at least one finished epoch?")
    with open(path, encoding="utf-8") as handle:
        rows = [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)]
    if not rows:
        raise ReportError(f"{path}: no epochs recorded yet")
    return rows


def plot_curves(rows: list[dict[str, float]], out: str | os.PathLike, title: str = "") -> Path:
    """loss per epoch (left) and validation R@1/5/10 both ways (right) → PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(epochs, [row["train_loss"] for row in rows], marker="o")
    left.set(xlabel="epoch", ylabel="training loss (mean per step)", title="loss", yscale="log")
    from matplotlib.ticker import MaxNLocator

    for axis in (left, right):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    if any("rsum" in row for row in rows):
        for key, style in (("i2t_r1", "-"), ("i2t_r5", "--"), ("i2t_r10", ":"), ("t2i_r1", "-"),
                           ("t2i_r5", "--"), ("t2i_r10", ":")):
            values = [row.get(key, float("nan")) for row in rows]
            colour = "tab:blue" if key.startswith("i2t") else "tab:orange"
            direction, recall = key.split("_")
            right.plot(epochs, values, style, color=colour, label=f"{direction} R@{recall[1:]}")
        right.set(xlabel="epoch", ylabel="recall (%)", title="validation recall", ylim=(0, 100))
        right.legend(ncol=2, fontsize="small")
    else:
        right.text(0.5, 0.5, "no validation", ha="center", va="center")
        right.set_axis_off()
    figure.suptitle(title)
    figure.tight_layout()
    target = Path(out)
    figure.savefig(target, dpi=110)
    plt.close(figure)
    return target


def final_table(rows: list[dict[str, float]]) -> str:
    """The last epoch and the best epoch, one line each."""
    best = max(rows, key=lambda row: row.get("rsum", -1.0))
    lines = [f"{'':<6} {'epoch':>5} {'loss':>9} " + " ".join(f"{k:>8}" for k in CSV_FIELDS[4:11])]
    for label, row in (("last", rows[-1]), ("best", best)):
        cells = " ".join(f"{row.get(k, float('nan')):8.1f}" for k in CSV_FIELDS[4:11])
        lines.append(f"{label:<6} {int(row['epoch']):>5} {row['train_loss']:9.4f} {cells}")
    return "\n".join(lines)
