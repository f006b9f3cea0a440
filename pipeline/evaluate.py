"""Evaluation: top-1/top-5, cost per image from hard decisions, per-block execution rates.

    python -m pipeline.evaluate --run-dir runs/cifar10_r110 [--run-dir runs/other ...] [--stage joint]

writes `<run>/<stage>/eval.json` and `<run>/<stage>/block_rates.png` for each run,
`<run>/joint/path_groups.png` (the most frequent execution paths with some of their images, as in
the paper's Fig. 8) for routed runs, and `accuracy_vs_cost.png` (all runs given) into the first run
directory (or --out).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from rdinet import RDIOutput, model_cost, srm


class PathGroups:
    """Execution paths of evaluated images, with thumbnails of the first `keep` images."""

    def __init__(self, mean, std, keep: int = 4000, side: int = 32):
        self.mean, self.std = mean, std  # of the normalised images, 0..255 units
        self.keep, self.side = keep, side
        self.paths: list[torch.Tensor] = []
        self.thumbs: list[torch.Tensor] = []
        self.kept = 0

    def add(self, images: torch.Tensor, gates: torch.Tensor) -> None:
        self.paths.append(gates.bool().cpu())
        take = min(self.keep - self.kept, images.shape[0])
        if take > 0:
            x = srm.denormalise(images[:take], self.mean, self.std)
            if x.shape[-1] != self.side:
                x = torch.nn.functional.interpolate(x, size=(self.side, self.side), mode="bilinear", antialias=True)
            self.thumbs.append(x.clamp(0, 255).to(torch.uint8).cpu())
            self.kept += take

    def groups(self, count: int, per_group: int) -> list[tuple[str, int, torch.Tensor]]:
        """The `count` most frequent paths: (path as 0/1 string, images taking it, thumbnails)."""
        paths = torch.cat(self.paths)
        unique, inverse, counts = torch.unique(paths, dim=0, return_inverse=True, return_counts=True)
        thumbs = torch.cat(self.thumbs) if self.thumbs else torch.zeros(0, 3, self.side, self.side, dtype=torch.uint8)
        found = []
        for index in counts.argsort(descending=True)[:count].tolist():
            members = (inverse[:len(thumbs)] == index).nonzero().flatten()[:per_group]
            path = "".join("1" if bit else "0" for bit in unique[index].tolist())
            found.append((path, int(counts[index]), thumbs[members]))
        return found

    def plot(self, path: Path, title: str, count: int = 4, per_group: int = 8) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        groups = self.groups(count, per_group)
        total = sum(len(p) for p in self.paths)
        # one row of thumbnails per path, its label above it (figure text: axes titles would
        # squeeze the thumbnails)
        fig, axes = plt.subplots(len(groups), per_group, figsize=(per_group * 1.0, len(groups) * 1.35 + 0.4),
                                 squeeze=False, gridspec_kw={"hspace": 0.55, "wspace": 0.05})
        fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.45 / (len(groups) * 1.35 + 0.4))
        for row, (bits, n, thumbs) in enumerate(groups):
            for col in range(per_group):
                ax = axes[row][col]
                ax.axis("off")
                if col < len(thumbs):
                    ax.imshow(thumbs[col].permute(1, 2, 0).numpy(), interpolation="nearest")
            box = axes[row][0].get_position()
            fig.text(box.x0, box.y1 + 0.01, f"path {bits}: {n} of {total} images ({100 * n / total:.1f}%)",
                     fontsize=7, va="bottom")
        fig.suptitle(title, fontsize=8)
        fig.savefig(path, dpi=120)
        plt.close(fig)


DECISIVE_MARGIN = 1.0  # |execute - skip logit| below this: a decision Gumbel noise would often flip


class RouterStats:
    """Sums over evaluated images of how decisively each router decides: images with
    |margin| < DECISIVE_MARGIN, |margin|, and the noise-free execution probability
    p = softmax(logits / tau)[execute] and its square (for its spread over images; both taken
    about 0.5 against round-off), also each image's share of executed blocks and its square."""

    def __init__(self, blocks: int, tau: float, device):
        self.tau = tau
        self.sums = torch.zeros(4, blocks, dtype=torch.float64, device=device)
        self.image_rates = torch.zeros(2, dtype=torch.float64, device=device)

    def add(self, margins: torch.Tensor, gates: torch.Tensor) -> None:
        margins = margins.double()
        prob = torch.sigmoid(margins / self.tau) - 0.5  # the two-way softmax's execute entry, less 0.5
        self.sums += torch.stack([(margins.abs() < DECISIVE_MARGIN).double().sum(0), margins.abs().sum(0),
                                  prob.sum(0), (prob * prob).sum(0)])
        rate = gates.double().mean(1)
        self.image_rates += torch.stack([rate.sum(), (rate * rate).sum()])

    def packed(self) -> torch.Tensor:
        return torch.cat([self.sums.flatten(), self.image_rates])

    def metrics(self, packed: torch.Tensor, count: float) -> dict:
        blocks = self.sums.shape[1]
        sums, image_rates = packed[:4 * blocks].view(4, blocks) / count, packed[4 * blocks:] / count
        small, abs_margin, prob, prob_sq = sums  # prob: p - 0.5, a shift that leaves the spread as it is
        spread = (prob_sq - prob * prob).clamp(min=0).sqrt()
        return {"indecisive_share": float(small.mean()), "mean_abs_margin": float(abs_margin.mean()),
                "image_rate_std": float((image_rates[1] - image_rates[0] ** 2).clamp(min=0).sqrt()),
                "block_indecisive_share": small.tolist(), "block_mean_abs_margin": abs_margin.tolist(),
                "block_prob_std": spread.tolist()}


@torch.no_grad()
def evaluate(model, net, loader, accelerator, mode: str, cfg: dict, bf16: bool,
             paths: PathGroups | None = None) -> dict:
    """Run the validation split once (twice for a routed model). `model` is what is called (a
    DeepSpeed engine or the plain module), `net` the plain module (for modes and cost). Padding
    samples (label -1) are ignored. Sums are reduced across processes when `accelerator` is given.
    `paths`, when given, collects each image's execution path (this process's images only).

    A routed model ("joint") is also scored with the noise-free soft gates (top1_soft; soft_gap =
    top1_soft - top1, what the eval rule loses against what soft training optimised), and its
    routers' decisiveness is measured (RouterStats)."""
    was_training = net.training
    model.eval()
    net.set_mode(mode)
    device = next(net.parameters()).device
    sums = torch.zeros(5, device=device)  # top-1, top-5, samples, GMACs x samples, ratio x samples
    gate_sum = torch.zeros(net.num_blocks, device=device)
    routed = mode == "joint"
    stats = RouterStats(net.num_blocks, net.tau, device) if routed else None
    size = (3, loader_image_size(cfg), loader_image_size(cfg))
    for images, labels, out in _outputs(model, loader, accelerator, device, bf16):
        logits, labels, gates = out.logits.float(), labels, out.gates.float()
        topk = logits.topk(min(5, logits.shape[1]), dim=1).indices
        cost = model_cost(net, gates, input_size=size)
        n = gates.shape[0]
        sums += torch.tensor([float((topk[:, 0] == labels).sum()), float((topk == labels[:, None]).any(1).sum()),
                              n, cost["gmacs"] * n, cost["ratio"] * n], device=device)
        gate_sum += gates.sum(0)
        if stats is not None:
            stats.add(out.margins, gates)
        if paths is not None:
            paths.add(images, gates)
    soft_correct = torch.zeros(1, device=device)
    if routed:
        net.eval_gates = "soft"
        try:
            for _, labels, out in _outputs(model, loader, accelerator, device, bf16):
                soft_correct += (out.logits.float().argmax(1) == labels).sum()
        finally:
            net.eval_gates = "hard"
    packed = torch.cat([sums.double(), gate_sum.double(), soft_correct.double()] + ([stats.packed()] if routed else []))
    if accelerator is not None:
        packed = accelerator.reduce(packed, reduction="sum")
    blocks = net.num_blocks
    top1, top5, count, gmacs, ratio = (float(v) for v in packed[:5])
    gate_sum, soft_correct = packed[5:5 + blocks], float(packed[5 + blocks])
    n = max(count, 1.0)
    model.train(was_training)
    metrics = {"top1": top1 / n, "top5": top5 / n, "samples": int(count), "gmacs": gmacs / n,
               "gflops": 2 * gmacs / n, "ratio": ratio / n, "exec_rate": float(gate_sum.sum()) / n / blocks,
               "block_rates": [float(r) / n for r in gate_sum]}
    if routed:
        metrics.update(top1_soft=soft_correct / n, soft_gap=(soft_correct - top1) / n,
                       **stats.metrics(packed[6 + blocks:], n))
    return metrics


def _outputs(model, loader, accelerator, device, bf16: bool):
    """(images, labels, model output) of each batch's valid samples (label >= 0)."""
    for images, labels in loader:
        if not bf16:
            images = images.float()
        # A model compiled for training runs eagerly here: real skipping has data-dependent shapes.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and accelerator is None), \
                torch.compiler.set_stance("force_eager"):
            out = model(images)
        valid = labels >= 0
        if not valid.any():
            continue
        margins = None if out.margins is None else out.margins[valid]
        yield images[valid], labels[valid], RDIOutput(out.logits[valid], out.gates[valid], margins)


def loader_image_size(cfg: dict) -> int:
    return cfg["data"]["image_size"] if cfg["data"]["dataset"] == "imagenet" else 32


def evaluate_run(run_dir: Path, stage: str, data_overrides: list[str], path_groups: int = 0) -> dict:
    """Evaluate a completed stage's export on one process (GPU if there is one); with path_groups > 0
    a routed model's most frequent execution paths are drawn into path_groups.png."""
    from pipeline import checkpoint as ckpt
    from pipeline.config import _merge, parse_overrides, with_defaults
    from pipeline.data import build_loader
    from pipeline.build import build_model, stage_mode

    manifest = ckpt.read_manifest(run_dir / stage)
    if manifest is None:
        raise FileNotFoundError(f"{run_dir}/{stage}/final/manifest.json not found: the '{stage}' stage of "
                                f"this run has not completed (run pipeline/train.py --run-dir {run_dir})")
    cfg = with_defaults(manifest["config"])
    _merge(cfg, parse_overrides(data_overrides))
    model = build_model(cfg)
    model.load_state_dict(ckpt.load_final_weights(run_dir / stage, cfg["model"]["arch"], cfg["model"]["num_classes"]))
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    model = model.to(device, memory_format=torch.channels_last)
    loader = build_loader(cfg["data"], "val", device_id=0 if on_gpu else None, seed=cfg["seed"])
    mode = "full" if stage_mode(cfg, stage) == "uniform" else stage_mode(cfg, stage)
    paths = PathGroups(loader.mean, loader.std) if path_groups > 0 and mode == "joint" else None
    metrics = evaluate(model, model, loader, None, mode, cfg, bf16=on_gpu, paths=paths)
    metrics.update(run=str(run_dir), stage=stage, job=cfg["job"], arch=cfg["model"]["arch"], mode=mode,
                   t=cfg["loss"]["t"])
    (run_dir / stage / "eval.json").write_text(json.dumps(metrics, indent=1))
    if paths is not None:
        paths.plot(run_dir / stage / "path_groups.png", f"{cfg['job']}: most frequent execution paths "
                   f"(1 = block runs), held-out images", count=path_groups)
    return metrics


def plot_block_rates(metrics: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rates = metrics["block_rates"]
    fig, ax = plt.subplots(figsize=(max(6, len(rates) * 0.18), 3))
    ax.bar(range(1, len(rates) + 1), rates, color="tab:blue")
    ax.set_xlabel("block")
    ax.set_ylabel("execution rate")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{metrics['job']} ({metrics['stage']}): top-1 {metrics['top1']:.3f}, ratio {metrics['ratio']:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy_vs_cost(all_metrics: list[dict], path: Path, labels: list[str] | None = None) -> None:
    """Top-1 against GFLOPs: the static networks ("full" rows) as the frontier line a dynamic one
    must beat, every other row as a labelled point."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.5))
    labels = labels or [Path(m["run"]).name for m in all_metrics]
    static = sorted((m["gflops"], 100 * m["top1"]) for m in all_metrics if m.get("mode") == "full")
    if len(static) > 1:
        ax.plot(*zip(*static), color="0.5", linestyle="--", zorder=1, label="static ResNets")
        ax.legend(fontsize=7, loc="lower right")
    for m, label in zip(all_metrics, labels):
        ax.scatter(m["gflops"], 100 * m["top1"], marker="s" if m.get("mode") == "full" else "o",
                   color="0.4" if m.get("mode") == "full" else None, zorder=2)
        ax.annotate(label, (m["gflops"], 100 * m["top1"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set_xlabel("GFLOPs per image")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SUMMARY = ("{:<28} {:>7} {:>7} {:>8} {:>6} {:>6} {:>10} {:>9}",
           ("run", "top-1", "top-5", "GFLOPs", "ratio", "exec", "|m|<1", "soft-hard"))


def summary_line(metrics: dict) -> str:
    """One row of the human table: accuracy, cost and (routed runs) how decisive the routers are."""
    routed = "indecisive_share" in metrics
    run = Path(metrics["run"]).name + "/" + metrics["stage"]
    return SUMMARY[0].format(
        run[-28:], f"{100 * metrics['top1']:.2f}", f"{100 * metrics['top5']:.2f}", f"{metrics['gflops']:.4f}",
        f"{metrics['ratio']:.3f}", f"{metrics['exec_rate']:.3f}",
        f"{100 * metrics['indecisive_share']:.1f}%" if routed else "-",
        f"{100 * metrics['soft_gap']:+.2f}" if routed else "-")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Evaluate completed RDI-Net runs")
    parser.add_argument("--run-dir", action="append", required=True, type=Path)
    parser.add_argument("--stage", default=None, help="warmup or joint (default: the last completed)")
    parser.add_argument("--set", action="append", default=[], metavar="data.KEY=VALUE",
                        help="override data keys, e.g. data.root on another machine")
    parser.add_argument("--out", type=Path, default=None, help="where to write accuracy_vs_cost.png")
    parser.add_argument("--path-groups", type=int, default=4, metavar="N",
                        help="draw the N most frequent execution paths of a routed model (0: none; default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print each run's metrics as a JSON line instead of a table")
    args = parser.parse_args(argv)
    results, written = [], []
    try:
        for run in args.run_dir:
            stage = args.stage or ("joint" if (run / "joint" / "final").is_dir() else "warmup")
            metrics = evaluate_run(run, stage, args.set, args.path_groups)
            plot_block_rates(metrics, run / stage / "block_rates.png")
            written += [run / stage / name for name in ("eval.json", "block_rates.png", "path_groups.png")
                        if (run / stage / name).is_file()]
            if args.json:
                print(json.dumps({k: v for k, v in metrics.items() if not k.startswith("block_")}))
            results.append(metrics)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = sys.stderr if args.json else sys.stdout
    if not args.json:
        print(SUMMARY[0].format(*SUMMARY[1]))
        for metrics in results:
            print(summary_line(metrics))
        print("|m|<1: share of (image, block) decisions within 1 logit of a tie; soft-hard: top-1 points "
              "gained by noise-free soft gates over the eval rule")
    if any(m.get("mode") == "full" for m in results) and len(results) > 1:
        out = args.out or args.run_dir[0]
        plot = out / "accuracy_vs_cost.png" if out.is_dir() else out
        plot_accuracy_vs_cost(results, plot)
        written.append(plot)
    else:
        print("accuracy_vs_cost.png not drawn: it needs a static run (stages.joint.mode=full) beside the "
              "others, the frontier they are judged against", file=report)
    print("wrote: " + ", ".join(str(path) for path in written), file=report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
