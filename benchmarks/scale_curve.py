"""The H_c curve over the number of erased concepts (issue 13), from finished `make compare` runs.

    python benchmarks/scale_curve.py outputs/compare/toy-characters-100/*/compare.json [--out docs/img/scale_curve.png]

One point per (method, compare run): x = how many classes the run erased, y = its headline number with its 95 %
bootstrap interval; a line per method; a second panel with adaptation seconds (log y). Prints the table as markdown.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def points(paths: list[Path]) -> dict[str, list[tuple[int, float, float, float, float]]]:
    """method -> sorted [(n erased, headline, ci low, ci high, adapt seconds)]."""
    out: dict[str, list] = {}
    for p in paths:
        c = json.loads(p.read_text())
        n, head = len(c["settings"]["erased"] or []), c["headline"]
        for method, row in c["table"].items():
            if method == "base":
                continue
            lo, hi = row["ci"].get(head, (float("nan"),) * 2)
            out.setdefault(method, []).append((n, row["metrics"][head], lo, hi,
                                               row["cost"].get("cost/adapt_seconds", float("nan"))))
    return {m: sorted(v) for m, v in out.items()}


def plot(curves: dict, head: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ace_lightning.utils import atomic_save

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    for m, pts in curves.items():
        n = [p[0] for p in pts]
        ax.errorbar(n, [p[1] for p in pts], yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]], marker="o",
                    capsize=3, label=m)
        bx.plot(n, [p[4] for p in pts], marker="o", label=m)
    for a in (ax, bx):
        a.set_xscale("log")
        a.set_xlabel("concepts erased at once")
        a.legend()
    ax.set_ylabel(f"{head} (%)")
    ax.set_ylim(-2, 102)
    bx.set_yscale("log")
    bx.set_ylabel("adaptation seconds (2 CPU cores)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("compare_json", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("outputs/scale_curve.png"))
    args = ap.parse_args(argv)
    curves = points(args.compare_json)
    head = json.loads(args.compare_json[0].read_text())["headline"]
    print(f"| method | n | {head} | 95 % CI | adapt s |\n|---|---|---|---|---|")
    for m, pts in curves.items():
        for n, y, lo, hi, s in pts:
            print(f"| {m} | {n} | {y:.1f} | [{lo:.1f}, {hi:.1f}] | {s:.1f} |")
    print(f"plot: {plot(curves, head, args.out)}")


if __name__ == "__main__":
    main()
