"""The replay's outputs for people: a PNG (one panel per metric, one line per strategy, x =
window) with a JSON file of the full details beside it, and a console table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from services.evaluation.replay import ReplayResult


def write_report(result: ReplayResult, path: Path) -> list[Path]:
    """Write `path` (PNG) and `path` with suffix .json (`ReplayResult.details()`).

    Returns:
        The files written.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    k = result.settings.k
    panels = [
        (f"ndcg@{k}", f"NDCG@{k}"),
        (f"recall@{k}", f"Recall@{k}"),
        (f"hit@{k}", f"HitRate@{k}"),
        (f"mrr@{k}", f"MRR@{k}"),
        ("coverage", "catalogue coverage"),
        ("new_share", "share of new items"),
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    flat = list(axes.flat)
    windows = [p.name for p in result.split.windows]
    for ax, (key, title) in zip(flat, panels, strict=False):
        for name, rows in result.per_window.items():
            ax.plot(windows, [r[key] for r in rows], marker="o", label=name)
        ax.set_title(title)
        ax.set_xlabel("window")
        ax.grid(alpha=0.3)
    cost = flat[len(panels)]
    for name, rows in result.per_window.items():
        cost.plot(windows, [r["update"]["seconds"] for r in rows], marker="o", label=name)
    cost.set_title("update wall time (s)")
    cost.set_xlabel("window")
    cost.grid(alpha=0.3)
    forget = flat[len(panels) + 1]
    names = [n for n in result.forgetting if n != "holdout"]
    before = [result.forgetting[n][f"ndcg@{k}_after_bootstrap"] for n in names]
    after = [result.forgetting[n][f"ndcg@{k}_after_last"] for n in names]
    xs = range(len(names))
    forget.bar([x - 0.2 for x in xs], before, width=0.4, label="after bootstrap")
    forget.bar([x + 0.2 for x in xs], after, width=0.4, label="after last window")
    forget.set_xticks(list(xs), names)
    forget.set_title(f"early holdout NDCG@{k} (forgetting)")
    forget.legend(fontsize=8)
    flat[0].legend(fontsize=8)
    fig.suptitle(
        f"FreshRec replay: {result.dataset}, {result.settings.windows} windows, "
        f"{result.wall_seconds:.0f} s"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    details = path.with_suffix(".json")
    details.write_text(json.dumps(result.details(), indent=2, default=str))
    return [path, details]


def print_table(result: ReplayResult, console: Any) -> None:
    """Window-averaged metrics and update cost per strategy, then the issue's ratios."""
    from rich.table import Table

    k = result.settings.k
    table = Table(title=f"replay {result.dataset}: mean over {result.settings.windows} windows")
    columns = (f"ndcg@{k}", f"recall@{k}", f"hit@{k}", f"mrr@{k}", "coverage", "new_share")
    table.add_column("strategy")
    for column in (*columns, "update s", "examples"):
        table.add_column(column, justify="right")
    for name in result.per_window:
        s = result.strategy_summary(name)
        table.add_row(
            name,
            *(f"{s[c]:.4f}" for c in columns),
            f"{s['update_seconds']:.1f}",
            f"{s['examples_processed']:,}",
        )
    console.print(table)
    ratios = ", ".join(f"{k} {v}" for k, v in result.ratios().items())
    console.print(f"ratios: {ratios}")
    holdout = result.forgetting.get("holdout", {})
    parts = []
    for name, f in result.forgetting.items():
        if name == "holdout":
            continue
        part = f"{name} ndcg ×{f.get('ratio')}"
        if "auc_ratio" in f:
            part += f", auc {f['auc_after_bootstrap']:.4f} → {f['auc_after_last']:.4f}"
            part += f" (×{f['auc_ratio']}, lift ×{f['auc_lift_ratio']})"
        parts.append(part)
    console.print(
        f"forgetting on the early holdout ({holdout.get('users')} users; "
        f"{holdout.get('pairs', 0):,} pairs): " + "; ".join(parts)
    )
    console.print(f"wall time {result.wall_seconds:.0f} s")
