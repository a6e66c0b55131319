"""PNG plots of a scaling-law fit: loss against compute, IsoFLOP curves, and N*, D* against compute.

matplotlib is imported inside each function, with the Agg backend, so that importing the scaling
package stays fast and needs no display.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fusionlab.scaling import approaches
from fusionlab.scaling.fit import ScalingLawParams


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain_ticks(axis) -> None:
    # a log axis spanning less than a decade labels ticks as 3x10^0; print the numbers instead
    from matplotlib.ticker import FormatStrFormatter

    axis.set_major_formatter(FormatStrFormatter("%.3g"))
    axis.set_minor_formatter(FormatStrFormatter("%.3g"))


def plot_loss_vs_flops(
    path: Path, params: ScalingLawParams, N, D, C, L, hull=None, frontier=None, title: str = ""
) -> Path:
    """Scatter loss against compute, coloured by model size, with the fitted law along each size.

    A size's curve is drawn at compute r * 6 N D, where r is the median C / (6 N D) of its runs,
    so that curves meet their points even when C includes vision-encoder compute.
    """
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    fig, ax = plt.subplots(figsize=(7, 5))
    groups = approaches.group_close_values(N, rtol=0.01)  # one group per model size
    norm = LogNorm(vmin=N.min(), vmax=N.max() * 1.0001)
    cmap = plt.get_cmap("viridis")
    for group in range(groups.max() + 1):
        m = groups == group
        size = float(np.median(N[m]))
        ratio = float(np.median(C[m] / (6 * N[m] * D[m])))
        D_curve = np.geomspace(D[m].min() / 2, D[m].max() * 2, 100)
        ax.plot(
            ratio * 6 * size * D_curve, params.predict(size, D_curve), color=cmap(norm(size)), lw=1, alpha=0.8
        )
        ax.scatter(C[m], L[m], color=cmap(norm(size)), s=14)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="parameters N")
    if hull is not None and len(hull) >= 2:
        ax.plot(C[hull], L[hull], "k--", lw=1, label="lower convex hull")
    if frontier is not None:
        C_line = np.geomspace(C.min(), C.max(), 50)
        ax.plot(
            C_line,
            frontier(C_line),
            color="crimson",
            lw=1.5,
            label=f"L = {frontier.k:.3g} C^{frontier.exponent:.4f}",
        )
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="validation loss", title=title)
    _plain_ticks(ax.yaxis)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_isoflop(
    path: Path, C, x, L, result: approaches.IsoFlopResult, rtol: float, x_label: str = "N", title: str = ""
) -> Path:
    """Plot loss against x for each compute budget with its parabola and minimum."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    groups = approaches.group_close_values(C, rtol)
    by_budget = {round(np.log(m.C), 6): m for m in result.minima}
    colours = plt.cm.plasma(np.linspace(0, 0.9, groups.max() + 1))
    for group in range(groups.max() + 1):
        m = groups == group
        C_group = float(np.exp(np.log(C[m]).mean()))
        ax.scatter(x[m], L[m], color=colours[group], s=12, label=f"C={C_group:.2g}")
        minimum = by_budget.get(round(np.log(C_group), 6))
        if minimum is not None:
            log_x = np.linspace(np.log(x[m]).min(), np.log(x[m]).max(), 100)
            ax.plot(np.exp(log_x), np.polyval(minimum.coef, log_x), color=colours[group], lw=1)
            ax.scatter(
                [minimum.x_opt], [minimum.L_opt], color=colours[group], marker="*", s=80, edgecolor="k"
            )
    if not result.minima:
        ax.text(0.5, 0.5, "no compute budget has 3 or more sizes", transform=ax.transAxes, ha="center")
    ax.set(xscale="log", xlabel=x_label, ylabel="validation loss", title=title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_optimal_sizes(
    path: Path, params: ScalingLawParams, C, minima_N=(), minima_D=(), title: str = ""
) -> Path:
    """Plot the closed-form N*(C) and D*(C) of the fit, with IsoFLOP minima where there are any."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    C_line = np.geomspace(C.min() / 10, C.max() * 100, 100)
    N_star, D_star = params.compute_optimal(C_line)
    ax.plot(C_line, N_star, color="tab:blue", label=f"N* ~ C^{params.a:.3f} (fit)")
    ax.plot(C_line, D_star, color="tab:orange", label=f"D* ~ C^{params.b:.3f} (fit)")
    if minima_N:
        ax.scatter(
            [m.C for m in minima_N],
            [m.x_opt for m in minima_N],
            color="tab:blue",
            marker="o",
            label="N*, IsoFLOP",
        )
    if minima_D:
        ax.scatter(
            [m.C for m in minima_D],
            [m.x_opt for m in minima_D],
            color="tab:orange",
            marker="s",
            label="D*, IsoFLOP",
        )
    ax.set(
        xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="parameters N* / tokens D*", title=title
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_all(out: Path, loss_type: str, params: ScalingLawParams, N, D, C, L, fit: dict) -> list[Path]:
    """Write the three plots of one fitted data type into `out` and return their paths."""
    frontier = fit.get("frontier", {})
    hull = np.asarray(frontier["hull_runs"]) if "hull_runs" in frontier else None
    law = approaches.PowerLaw(frontier["k"], frontier["c"]) if "c" in frontier else None
    rtol = fit.get("approach2", {}).get("budget_rtol", 0.05)
    by_N = approaches.isoflop_minima(C, N, L, rtol=rtol)
    by_D = approaches.isoflop_minima(C, D, L, rtol=rtol)
    title = f"val_loss {loss_type}"
    paths = [
        plot_loss_vs_flops(out / f"loss_vs_flops_{loss_type}.png", params, N, D, C, L, hull, law, title),
        plot_isoflop(out / f"isoflop_{loss_type}.png", C, N, L, by_N, rtol, "parameters N", title),
    ]
    if params.alpha > 0 and params.beta > 0:
        paths.append(
            plot_optimal_sizes(
                out / f"optimal_sizes_{loss_type}.png", params, C, by_N.minima, by_D.minima, title
            )
        )
    return paths
