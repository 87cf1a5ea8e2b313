"""Put every method beside training from scratch: FLOPs and wall time to reach the baseline's final
validation loss, final validation loss, with the spread over seeds."""

from __future__ import annotations

import csv
import os
import statistics
from dataclasses import dataclass

import numpy as np

from growlib.train.metrics import RunResult
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


def _seed_curve(runs: list[RunResult], axis: str) -> dict[str, np.ndarray]:
    """One schedule's seeds aligned by step: a schedule's seeds evaluate at the same steps (only steps every
    seed evaluated are kept) but spend slightly different FLOPs / wall time to get there, so ``x`` is the seeds'
    mean ``axis`` ("flops" or "wall") at each step; ``mean``, ``low``, ``high`` are the mean, min and max
    validation loss over the seeds there; ``coarse`` marks the steps where a seed evaluated a model smaller than
    its final one (a coarse level, a shallow stage: never counted as reaching the target, see cost_to_reach)."""
    at = [{e.step: e for e in run.evals} for run in runs]
    steps = sorted(set.intersection(*(set(a) for a in at)))
    loss = np.array([[a[s].val_loss for s in steps] for a in at]).reshape(len(runs), len(steps))
    x = np.array([[getattr(a[s], axis) for s in steps] for a in at]).reshape(len(runs), len(steps))
    coarse = [any(a[s].parameters < run.evals[-1].parameters for a, run in zip(at, runs)) for s in steps]
    return {"x": x.mean(0), "mean": loss.mean(0), "low": loss.min(0), "high": loss.max(0),
            "coarse": np.array(coarse, dtype=bool)}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def curve_figure(results: dict[str, list[RunResult]], axis: str, title: str = ""):
    """The validation loss of every schedule against ``axis`` ("flops" or "wall"): per schedule, in one colour,
    the mean over its seeds (aligned by step, see _seed_curve) with a min-max band; evaluations of a model
    smaller than the final one as hollow markers; the baseline's mean final loss (the target) as a dashed line;
    the legend outside the axes.  Artists carry gids "<schedule> mean" / "band" / "coarse" and "target"."""
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fig, ax = plt.subplots(figsize=(8, 4.5))
    any_coarse = False
    for index, (name, runs) in enumerate(results.items()):
        curve, colour = _seed_curve(runs, axis), f"C{index}"
        coarse = curve["coarse"]
        any_coarse |= bool(coarse.any())
        ax.fill_between(curve["x"], curve["low"], curve["high"], color=colour, alpha=0.2, linewidth=0,
                        gid=f"{name} band")
        ax.plot(curve["x"], curve["mean"], color=colour, marker="o", markersize=3, markevery=(~coarse).tolist(),
                label=f"{name} ({len(runs)} seeds)", gid=f"{name} mean")
        ax.plot(curve["x"][coarse], curve["mean"][coarse], linestyle="none", marker="o", markersize=6,
                markerfacecolor="white", markeredgecolor=colour, gid=f"{name} coarse")
    if "baseline" in results:
        target = statistics.mean(run.final_val_loss for run in results["baseline"])
        ax.axhline(target, color="black", linestyle="--", linewidth=1, label="baseline's final loss (mean)",
                   gid="target")
    handles = ax.get_legend_handles_labels()[0] + [Patch(color="grey", alpha=0.2, label="min-max over seeds")]
    if any_coarse:
        handles.append(Line2D([], [], linestyle="none", marker="o", markerfacecolor="white", markeredgecolor="grey",
                              label="smaller model (coarse level /\nshallow stage): not counted"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize="small")
    ax.set_xlabel("FLOPs" if axis == "flops" else "wall time (s)")
    ax.set_ylabel("validation loss")
    ax.set_title(title or "validation loss: " + ", ".join(results), fontsize="medium")
    return fig


def plot_curves(results: dict[str, list[RunResult]], out_dir: str, title: str = "") -> list[str]:
    """loss_vs_flops.png and loss_vs_time.png (curve_figure: every seed counts, as the mean over seeds aligned
    by step, x the seeds' mean FLOPs / wall time there, with a min-max band), titled ``title``; needs
    matplotlib."""
    plt = _pyplot()
    written = []
    for axis, file_name in (("flops", "loss_vs_flops.png"), ("wall", "loss_vs_time.png")):
        fig = curve_figure(results, axis, title)
        path = os.path.join(out_dir, file_name)
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written
