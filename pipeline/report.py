"""The results table of a sweep, from its runs' evaluations (pipeline.evaluate) and timings.

    python -m pipeline.report --runs-dir runs/r32 [--out table.md] [--plot accuracy_vs_cost.png]

One line per row of the sweep: held-out top-1, GFLOPs per image and the cost relative to the static
network (routers included), the blocks' execution rate, the share of router decisions within 1
logit of a tie and the top-1 gained by noise-free soft gates over the eval rule (routed rows),
epochs, card and wall time. A row's wall
time includes the warm-up it shares; rows ran side by side on one card, so each wall time is what
that row took while sharing it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline import checkpoint as ckpt
from pipeline.evaluate import plot_accuracy_vs_cost
from pipeline.sweep import read_sweep

HEADER = ("| row | job | top-1 (%) | GFLOPs | ratio to static | blocks run | \\|margin\\| < 1 | soft - hard (points) | "
          "epochs (USW + joint) | card | wall (min) |\n|---|---|---|---|---|---|---|---|---|---|---|")


def rows(runs_dir: Path) -> list[dict]:
    """Every completed row of the sweep in `runs_dir` with its evaluation (warm-ups excluded)."""
    sweep = read_sweep(runs_dir)
    if not sweep:
        raise FileNotFoundError(f"{runs_dir}/sweep.json not found: run python -m pipeline.sweep --runs-dir {runs_dir} first")
    found = []
    for name, run in sweep["runs"].items():
        if run["stage"] == "warmup":
            continue
        stage_dir = runs_dir / name / run["final"]  # where the runs are now (they may have moved)
        eval_path = stage_dir / "eval.json"
        manifest = ckpt.read_manifest(stage_dir)
        if manifest is None or not eval_path.is_file():
            raise FileNotFoundError(f"{stage_dir}: no export or no eval.json; finish the sweep, then run "
                                    f"python -m pipeline.evaluate --run-dir {runs_dir / name}")
        metrics = json.loads(eval_path.read_text())
        stages = manifest["config"]["stages"]
        warmup = sweep["runs"][run["needs"]] if run["needs"] else None
        found.append({"row": name, "job": run["job"], "metrics": metrics, "card": sweep["card"],
                      "epochs": (stages["warmup"]["epochs"], stages["joint"]["epochs"]),
                      "wall_s": run["wall_s"] + (warmup["wall_s"] if warmup else 0.0)})
    return found


def table(found: list[dict]) -> str:
    lines = [HEADER]
    for r in found:
        m = r["metrics"]
        routed = "indecisive_share" in m  # static rows have no routers
        decisive = f"{100 * m['indecisive_share']:.1f} %" if routed else "-"
        gap = f"{100 * m['soft_gap']:+.2f}" if routed else "-"
        lines.append(f"| {r['row']} | {r['job']} | {100 * m['top1']:.2f} | {m['gflops']:.4f} | {m['ratio']:.3f} | "
                     f"{m['exec_rate']:.3f} | {decisive} | {gap} | {r['epochs'][0]} + {r['epochs'][1]} | {r['card']} | "
                     f"{r['wall_s'] / 60:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (Markdown)")
    parser.add_argument("--plot", type=Path, default=None, help="also draw top-1 against GFLOPs here (PNG)")
    args = parser.parse_args(argv)
    try:
        found = rows(args.runs_dir)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = table(found)
    print(text, end="")
    if args.out:
        ckpt.write_atomic(args.out, text.encode())
    if args.plot:
        plot_accuracy_vs_cost([r["metrics"] for r in found], args.plot, labels=[r["row"] for r in found])
    return 0


if __name__ == "__main__":
    sys.exit(main())
