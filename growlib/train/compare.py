"""Put every method beside training from scratch: FLOPs and wall time to reach the baseline's final
validation loss, final validation loss, with the spread over seeds."""

from __future__ import annotations

import csv
import os
import statistics
from dataclasses import dataclass

from growlib.train.loop import RunResult
from growlib.train.tuning import best_multiplier


def cost_to_reach(result: RunResult, target: float) -> tuple[float, float] | None:
    """(FLOPs, wall seconds) at the first evaluation of the final model's size whose validation loss is <=
    target, interpolated linearly from the evaluation of that size before it; None if never.  A schedule's
    smaller models (coarse levels, shallow stages) do not count: at small budgets a smaller model can pass a
    loss that the model being trained has not reached yet."""
    if not result.evals:
        return None
    final_size = result.evals[-1].parameters
    previous = None
    for evaluation in result.evals:
        if evaluation.parameters != final_size:
            continue
        if evaluation.val_loss <= target:
            if previous is None:
                return evaluation.flops, evaluation.wall
            share = (previous.val_loss - target) / (previous.val_loss - evaluation.val_loss)
            return (previous.flops + share * (evaluation.flops - previous.flops),
                    previous.wall + share * (evaluation.wall - previous.wall))
        previous = evaluation
    return None


@dataclass
class MethodSummary:
    """One row of the comparison: means over seeds, and (min, max) spreads.  A method reaches the baseline's
    final loss only if it does on every seed: ``flops_ratio`` / ``wall_ratio`` are None otherwise (``reached``
    still counts the seeds that did)."""

    schedule: str
    seeds: int
    lr: float | None                   # the learning rate the arm ran at (None: not recorded)
    final_val_loss: float
    final_val_loss_spread: tuple[float, float]
    loss_diff: float                   # final loss - the baseline's of the same seed, on the same FLOPs
    loss_diff_spread: tuple[float, float]
    flops_ratio: float | None          # FLOPs to the baseline's final loss / baseline FLOPs
    flops_ratio_spread: tuple[float, float] | None
    wall_ratio: float | None
    wall_ratio_spread: tuple[float, float] | None
    reached: int                       # seeds that reached the baseline's final loss
    total_flops_ratio: float           # the whole schedule's FLOPs / the baseline's


def _spread(values: list[float]) -> tuple[float, float]:
    return (min(values), max(values))


def summarize(results: dict[str, list[RunResult]], baseline: str = "baseline",
              lrs: dict[str, float] | None = None) -> list[MethodSummary]:
    """``results[schedule][i]`` is the run with the i-th seed; the baseline's run with the same seed sets the
    target loss, the reference cost and the loss the difference is taken from for that seed.  ``lrs`` gives
    each schedule's learning rate, for the table."""
    if baseline not in results:
        raise ValueError(f"results must include the {baseline!r} schedule to compare against")
    base_runs = results[baseline]
    rows = []
    for name, runs in results.items():
        if len(runs) != len(base_runs):
            raise ValueError(f"schedule {name!r} has {len(runs)} seeds, the baseline {len(base_runs)}")
        flops_ratios, wall_ratios = [], []
        for run, base in zip(runs, base_runs):
            reached = cost_to_reach(run, base.final_val_loss)
            if reached is not None:
                flops_ratios.append(reached[0] / base.flops)
                wall_ratios.append(reached[1] / base.wall_seconds)
        every_seed = len(flops_ratios) == len(runs)
        finals = [r.final_val_loss for r in runs]
        diffs = [r.final_val_loss - b.final_val_loss for r, b in zip(runs, base_runs)]
        rows.append(MethodSummary(
            schedule=name, seeds=len(runs), lr=(lrs or {}).get(name), final_val_loss=statistics.mean(finals),
            final_val_loss_spread=_spread(finals), loss_diff=statistics.mean(diffs), loss_diff_spread=_spread(diffs),
            flops_ratio=statistics.mean(flops_ratios) if every_seed else None,
            flops_ratio_spread=_spread(flops_ratios) if every_seed else None,
            wall_ratio=statistics.mean(wall_ratios) if every_seed else None,
            wall_ratio_spread=_spread(wall_ratios) if every_seed else None,
            reached=len(flops_ratios),
            total_flops_ratio=statistics.mean(r.flops / b.flops for r, b in zip(runs, base_runs))))
    return rows


def _ratio(value: float | None, spread: tuple[float, float] | None, reached: int, seeds: int) -> str:
    if value is None:
        return f"not reached ({reached}/{seeds} seeds)"
    return f"{value:.2f} ({spread[0]:.2f}-{spread[1]:.2f})"


def markdown_table(rows: list[MethodSummary]) -> str:
    lines = ["| schedule | lr | final val loss (min-max) | loss - baseline, same FLOPs (min-max) | FLOPs to "
             "baseline loss (ratio) | wall time to baseline loss (ratio) | seeds reaching it | schedule FLOPs / "
             "baseline |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r.final_val_loss_spread
        d_lo, d_hi = r.loss_diff_spread
        lr = "-" if r.lr is None else f"{r.lr:g}"
        lines.append(f"| {r.schedule} | {lr} | {r.final_val_loss:.3f} ({lo:.3f}-{hi:.3f}) | "
                     f"{r.loss_diff:+.3f} ({d_lo:+.3f} to {d_hi:+.3f}) | "
                     f"{_ratio(r.flops_ratio, r.flops_ratio_spread, r.reached, r.seeds)} | "
                     f"{_ratio(r.wall_ratio, r.wall_ratio_spread, r.reached, r.seeds)} | "
                     f"{r.reached}/{r.seeds} | {r.total_flops_ratio:.2f} |")
    return "\n".join(lines)


def write_summary(rows: list[MethodSummary], out_dir: str, header: str = "") -> str:
    """summary.md and summary.csv in ``out_dir``; returns the markdown table."""
    os.makedirs(out_dir, exist_ok=True)
    table = markdown_table(rows)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write((header + "\n\n" if header else "") + table + "\n")
    with open(os.path.join(out_dir, "summary.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["schedule", "seeds", "lr", "final_val_loss", "final_val_loss_min", "final_val_loss_max",
                         "loss_diff", "loss_diff_min", "loss_diff_max", "flops_ratio", "flops_ratio_min",
                         "flops_ratio_max", "wall_ratio", "reached", "total_flops_ratio"])
        for r in rows:
            flops_spread = r.flops_ratio_spread or ("", "")
            writer.writerow([r.schedule, r.seeds, "" if r.lr is None else r.lr, r.final_val_loss,
                             *r.final_val_loss_spread, r.loss_diff, *r.loss_diff_spread,
                             "" if r.flops_ratio is None else r.flops_ratio, *flops_spread,
                             "" if r.wall_ratio is None else r.wall_ratio, r.reached, r.total_flops_ratio])
    return table


def write_tuning_table(sweep: dict[str, dict[float, float]], base_lr: float, out_dir: str, protocol: str) -> str:
    """tuning.md and tuning.csv: every arm's mean final validation loss at every multiplier it swept ("-" where
    another arm's sweep went further), its choice marked, and a warning where the choice still sits at an edge
    of its sweep (the optimum may lie beyond it)."""
    multipliers = sorted({m for losses in sweep.values() for m in losses})
    lines = [protocol, "", "| schedule | " + " | ".join(f"x{m:g} (lr {base_lr * m:g})" for m in multipliers)
             + " | chosen |", "|---|" + "---|" * (len(multipliers) + 1)]
    with open(os.path.join(out_dir, "tuning.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["schedule", "multiplier", "lr", "mean_final_val_loss", "chosen"])
        for name, losses in sweep.items():
            best = best_multiplier(losses)
            cells = ["-" if m not in losses else f"**{losses[m]:.3f}**" if m == best else f"{losses[m]:.3f}"
                     for m in multipliers]
            edge = " (at the edge of its sweep)" if best in (min(losses), max(losses)) else ""
            lines.append(f"| {name} | " + " | ".join(cells) + f" | x{best:g}{edge} |")
            for m in sorted(losses):
                writer.writerow([name, m, base_lr * m, losses[m], m == best])
    table = "\n".join(lines)
    with open(os.path.join(out_dir, "tuning.md"), "w") as f:
        f.write(table + "\n")
    return table


def plot_curves(results: dict[str, list[RunResult]], out_dir: str, title: str = "") -> list[str]:
    """loss_vs_flops.png and loss_vs_time.png (first seed of each schedule), titled ``title``; needs
    matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for index, (label, file_name) in enumerate((("FLOPs", "loss_vs_flops.png"), ("wall time (s)", "loss_vs_time.png"))):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, runs in results.items():
            evals = runs[0].evals
            ax.plot([e[1 + index] for e in evals], [e.val_loss for e in evals], marker=".", label=name)
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss")
        if title:
            ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, file_name)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
