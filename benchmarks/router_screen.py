"""A cheap screen of router-training levers on one GPU: the rdinet library and plain torch, no
DALI or DeepSpeed, every variant a process of its own on the same card (the step is launch-bound,
so several fill the GPU better than one).

    python -m benchmarks.router_screen --archive cifar10-train-jpeg.tar.gz --out OUT [--arch resnet110]
        [--warmup 5] [--joint 20] [--variants base,anneal,...] [--deadline SECONDS]

The archive holds train/<class>/<n>.jpg (the image-folder layout of CIFAR-10's training split).
A fixed 5,000 of its images are held out and scored; the rest train. One USW warm-up is shared by
every routed variant; each variant then trains its joint stage from it (docs/method.md, "Gates that
decide", lists the variants and what they measured). Writes OUT/<variant>.json per variant.
This is a screen, not the pipeline: pipeline.sweep gives the numbers of record.
"""
from __future__ import annotations

import argparse
import copy
import io
import itertools
import json
import math
import tarfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import rdinet
from rdinet import srm
from rdinet.cost import cost_table, model_cost
from rdinet.losses import cost_loss, total_loss
from pipeline.evaluate import RouterStats
from pipeline.step import TrainStep

MEAN = (0.4914 * 255, 0.4822 * 255, 0.4465 * 255)
STD = (0.2470 * 255, 0.2435 * 255, 0.2616 * 255)
HOLDOUT = 5000
LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# Each variant: overrides of the base (soft Gumbel gates, router BatchNorm, the paper's loss).
VARIANTS = {
    "static": {"mode": "full"},
    "static_r56": {"mode": "full", "arch": "resnet56"},
    "static_r32": {"mode": "full", "arch": "resnet32"},
    "static_r20": {"mode": "full", "arch": "resnet20"},
    "paper": {"router_norm": "none"},
    "base": {},
    "anneal": {"tau_end": 0.1},            # tau 1 -> 0.1, geometric over the joint stage
    "hard_cost": {"hard_cost": True},      # L_cost on the hard decisions, straight-through
    "anneal05": {"tau_end": 0.5},          # a milder anneal, tau 1 -> 0.5
    "anneal_hard_cost": {"tau_end": 0.1, "hard_cost": True},
    "router_wd0": {"router_wd": 0.0},      # no weight decay on the routers
    "router_lr10": {"router_lr": 10.0},    # routers at 10x the blocks' learning rate
    "router_lr10_anneal05": {"router_lr": 10.0, "tau_end": 0.5},
    "vanilla": {"gamma": 0.0, "alpha": 0.0},
    "st_anneal": {"straight_through": True, "tau_end": 0.1},
    "hard_tail": {"hard_tail": 0.25},      # the last quarter of the joint stage straight-through
    "hard_tail_anneal05": {"hard_tail": 0.25, "tau_end": 0.5},
    "hard_tail50": {"hard_tail": 0.5},
    "hard_tail_frozen": {"hard_tail": 0.25, "tail_router_lr": 0.0},  # decisions fixed in the tail
    "base_s1": {"seed": 1},                # the joint stage again from another seed: the noise
    "hard_tail_s1": {"hard_tail": 0.25, "seed": 1},
    "net_cost": {"cost_over": "network"},  # one cost over all blocks: each block's rate free
    "net_cost_tail": {"cost_over": "network", "hard_tail": 0.25},
    "net_cost_tail_anneal05": {"cost_over": "network", "hard_tail": 0.25, "tau_end": 0.5},
    "net_cost_s1": {"cost_over": "network", "seed": 1},
    "net_cost_tail_s1": {"cost_over": "network", "hard_tail": 0.25, "seed": 1},
    "net_cost_tail_t03": {"cost_over": "network", "hard_tail": 0.25, "t": 0.3},
    "net_cost_tail_t07": {"cost_over": "network", "hard_tail": 0.25, "t": 0.7},
    "scratch_net_cost_tail": {"cost_over": "network", "hard_tail": 0.25, "from_warmup": False},
    "scratch_vanilla_net_cost_tail": {"cost_over": "network", "hard_tail": 0.25, "gamma": 0.0, "alpha": 0.0,
                                      "from_warmup": False},  # Table 2's vanilla row: no USW
    "warm_static": {"mode": "full", "from_warmup": True},  # what the warm-up gives a static net
    "vanilla_net_cost_tail": {"cost_over": "network", "hard_tail": 0.25, "gamma": 0.0, "alpha": 0.0},
}
BASE = {"mode": "joint", "arch": None, "router_norm": "batch", "straight_through": False, "gamma": 0.5,
        "alpha": 0.2, "t": 0.5, "tau_end": 1.0, "hard_cost": False, "router_wd": None, "router_lr": 1.0,
        "hard_tail": 0.0, "tail_router_lr": None, "seed": 0, "cost_over": "block",
        "from_warmup": None}  # None: joint rows start from the warm-up, static rows from scratch


def load_archive(path: Path):
    from PIL import Image
    images, labels = [], []
    with tarfile.open(path) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")), key=lambda m: m.name)
        for m in members:
            img = Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")
            images.append(np.asarray(img, dtype=np.uint8))
            labels.append(LABELS.index(m.name.split("/")[-2]))
    images, labels = np.stack(images), np.asarray(labels)
    order = np.random.default_rng(0).permutation(len(labels))
    held, train = order[:HOLDOUT], order[HOLDOUT:]
    return (images[train], labels[train]), (images[held], labels[held])


class GPUData:
    """The split on the GPU as normalised float tensors; batches with pad-4 random crop and flip."""

    def __init__(self, images, labels, device):
        x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float()
        mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
        self.x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
        self.y = torch.from_numpy(labels).to(device)
        self.span = torch.arange(32, device=device).view(1, 32)

    def __len__(self):
        return len(self.y)

    def train_batches(self, batch: int, generator: torch.Generator):
        n = len(self.y)
        order = torch.randperm(n, device=self.x.device, generator=generator)
        padded = F.pad(self.x, (4, 4, 4, 4))
        for i in range(0, n - batch + 1, batch):  # drop the last partial batch, as the loader does
            idx = order[i:i + batch]
            dy, dx = torch.randint(0, 9, (2, batch, 1), generator=generator, device=self.x.device)
            flip = torch.rand(batch, 1, device=self.x.device, generator=generator) < 0.5
            cols = torch.where(flip, 31 - self.span, self.span) + dx  # a flip reverses the columns
            rows = self.span + dy
            # per-image crop and flip by indexing: (B, 32, 32, C) -> (B, C, 32, 32)
            x = padded[idx[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
            yield x.contiguous(memory_format=torch.channels_last), self.y[idx]


def make_model(v: dict, device):
    model = rdinet.create_model(v["arch"], num_classes=10, gamma=v["gamma"], r=2, d=256,
                                straight_through=v["straight_through"], executor="masked",
                                router_norm=v["router_norm"])
    return model.to(device).to(memory_format=torch.channels_last)


def make_optimizer(model, v: dict, lr: float):
    groups = [{"params": list(model.block_parameters()), "weight_decay": 1e-4}]
    if v["mode"] == "joint":
        wd = 1e-4 if v["router_wd"] is None else v["router_wd"]
        groups.append({"params": list(model.router_parameters()), "weight_decay": wd, "lr": lr * v["router_lr"]})
    for g in groups:
        g.setdefault("lr", lr)
        g["initial_lr"] = g["lr"]
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, fused=fused)


def make_loss_terms(v: dict):
    def loss_terms(images, logits, gates, labels):
        if v["mode"] != "joint":
            cls = F.cross_entropy(logits.float(), labels)
            return {"loss": cls}
        gates = gates.float()
        hist = srm.color_histograms(images, bins=16, mean=MEAN, std=STD) if v["alpha"] > 0 else None
        terms = total_loss(logits, labels, gates, hist, t=v["t"], alpha=v["alpha"], cost_over=v["cost_over"])
        if v["hard_cost"]:  # the cost of the sampled hard decisions, straight-through
            hard = gates + ((gates > 0.5).float() - gates).detach()
            terms["loss"] = terms["loss"] - terms["cost"] + cost_loss(hard, v["t"], v["cost_over"])
        return terms
    return loss_terms


def train_stage(model, data, v, epochs, milestones, tau_end, log, deadline):
    """SGD 0.1 / 0.9 / 1e-4, batch 256, x0.1 at each milestone; the step one CUDA graph on a GPU.
    tau goes geometrically from 1 to tau_end over the stage, through a device tensor that the
    captured step reads."""
    opt = make_optimizer(model, v, 0.1)
    gen = torch.Generator(device=data.x.device).manual_seed(1 + v["seed"])
    steps = len(data) // 256
    total = epochs * steps
    on_gpu = data.x.device.type == "cuda"
    tau = torch.ones((), device=data.x.device)
    model._tau = tau  # a tensor in place of the float: read at replay, not at capture
    train_step = TrainStep(model, opt, make_loss_terms(v), bf16=True, cuda_graph=on_gpu)
    step = 0
    hard_from = epochs - round(epochs * v["hard_tail"])
    for epoch in range(epochs):
        model.train()
        if epoch == hard_from and v["hard_tail"] and not model.straight_through:
            model.straight_through = True
            train_step.recapture()  # the captured step read the flag at capture
            if v["tail_router_lr"] is not None and len(opt.param_groups) > 1:
                opt.param_groups[1]["initial_lr"] *= v["tail_router_lr"]
        for x, y in data.train_batches(256, gen):
            factor = 0.1 ** sum(epoch >= m for m in milestones)
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * factor
            tau.fill_(tau_end ** (step / max(total - 1, 1)))
            terms, _, _ = train_step(x, y)
            step += 1
        log(f"epoch {epoch + 1}/{epochs} loss {terms['loss'].item():.3f} tau {float(tau):.3f} {time.time():.0f}")
        if time.time() > deadline:
            log("deadline reached: stopping early")
            done = epoch + 1
            break
    else:
        done = epochs
    model.tau = float(tau)
    return done


@torch.no_grad()
def evaluate(model, data, v, train_data=None) -> dict:
    """Hard and soft top-1 and decisiveness; for routed nets also hard top-1 after recomputing
    BatchNorm statistics under the hard decisions (the blocks' over all samples, the same with the
    routers', the blocks' over the samples that execute them)."""
    result = score(model, data, v)
    if v["mode"] != "joint" or train_data is None:
        return result
    gen = torch.Generator(device=data.x.device).manual_seed(2)
    for key, routers, executor in (("recal", False, "masked"), ("recal_routers", True, "masked"),
                                   ("recal_skip", False, "skip")):
        calibrated = copy.deepcopy(model)
        with torch.autocast(data.x.device.type, dtype=torch.bfloat16):
            recalibrate_bn(calibrated, (x for x, _ in train_data.train_batches(256, gen)), routers, executor)
        after = score(calibrated, data, {**v, "soft": False})
        result.update({f"top1_{key}": after["top1_hard"], f"cost_{key}": after["cost_ratio"],
                       f"indecisive_{key}": after.get("indecisive_share")})
    return result


@torch.no_grad()
def score(model, data, v) -> dict:
    model.eval()
    result = {}
    rules = ["hard", "soft"] if v["mode"] == "joint" and v.get("soft", True) else ["hard"]
    for rule in rules:
        model.eval_gates = rule
        correct, gates = 0, []
        stats = RouterStats(model.num_blocks, model.tau, data.x.device)
        for i in range(0, len(data), 500):
            with torch.autocast(data.x.device.type, dtype=torch.bfloat16):
                out = model(data.x[i:i + 500])
            correct += int((out.logits.argmax(1) == data.y[i:i + 500]).sum())
            gates.append(out.gates.float().cpu())
            if out.margins is not None:
                stats.add(out.margins, out.gates)
        result[f"top1_{rule}"] = 100.0 * correct / len(data)
        if rule == "hard":
            g = torch.cat(gates)
            result["cost_ratio"] = model_cost(model, g)["ratio"]
            result["block_rates"] = g.mean(0).tolist()
            result["image_rate_std"] = float(g.mean(1).std())
            if v["mode"] == "joint":  # the pipeline's measures of decisiveness
                routing = stats.metrics(stats.packed(), len(data))
                result.update({k: routing[k] for k in ("indecisive_share", "mean_abs_margin")})
    model.eval_gates = "hard"
    if "top1_soft" in result:
        result["soft_gap"] = result["top1_soft"] - result["top1_hard"]
    return result


@torch.no_grad()
def recalibrate_bn(model, batches: Iterable[torch.Tensor], routers: bool = False,
                executor: str = "masked") -> int:
    """Recompute the running statistics of the stem's and the blocks' BatchNorms (and the routers'
    with routers=True) from `batches` of images under the hard eval decisions: the lever that
    asks whether the soft-hard gap is one of BatchNorm statistics (docs/method.md: it is not).
    executor "masked" shows each block's BatchNorms every sample, as training does; "skip" only
    those that execute it. torch.optim.swa_utils.update_bn would put the routers in train mode,
    where they sample soft gates."""
    norms = _batch_norms(model, routers)
    batches = iter(batches)
    first = next(batches, None)
    if first is None:  # checked before any statistic is reset
        raise ValueError("recalibrate needs at least one batch of images; `batches` was empty")
    if not norms:
        return 0
    saved = (model.training, model.executor, model.eval_gates)
    momenta = [bn.momentum for bn in norms]
    model.eval()
    model.executor, model.eval_gates = executor, "hard"
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over every batch, not an exponential one
        bn.train()
    seen = 0
    try:
        for images in itertools.chain([first], batches):
            model(images)
            seen += images.shape[0]
    finally:
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum
            bn.eval()
        model.executor, model.eval_gates = saved[1], saved[2]
        model.train(saved[0])
    return seen


def _batch_norms(model, routers: bool) -> list:
    parts = [model.stem, model.blocks] + ([model.routers] if routers else [])
    return [m for part in parts for m in part.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def starts_from_warmup(overrides: dict) -> bool:
    v = {**BASE, **overrides}
    return v["mode"] == "joint" if v["from_warmup"] is None else v["from_warmup"]


def run_variant(name, overrides, args, warm_path, out_dir):
    v = {**BASE, "arch": args.arch, **overrides}
    torch.manual_seed(v["seed"])
    torch.set_num_threads(1)
    device = torch.device(args.device)
    logf = open(out_dir / f"{name}.log", "w")
    log = lambda msg: (logf.write(msg + "\n"), logf.flush())  # noqa: E731
    (train, held) = torch.load(out_dir / "data.pt", weights_only=False)
    train_data, held_data = GPUData(*train, device), GPUData(*held, device)
    model = make_model(v, device)
    deadline = args.start + args.deadline
    t0 = time.time()
    model.set_mode(v["mode"])
    if starts_from_warmup(v):  # the warm-up's blocks, fresh routers, the joint stage's schedule
        blocks = torch.load(warm_path, map_location=device)
        model.load_state_dict({k: t for k, t in blocks.items() if not k.startswith("routers.")}, strict=False)
        epochs, milestones = args.joint, [round(args.joint * 0.6), round(args.joint * 0.85)]
    else:  # from scratch for as many epochs as warm-up and joint stage together
        epochs = args.warmup + args.joint
        milestones = [round(epochs * 0.68), round(epochs * 0.88)]
    done = train_stage(model, train_data, v, epochs, milestones, v["tau_end"], log, deadline)
    result = {"variant": name, "settings": v, "epochs_done": done, "train_s": time.time() - t0,
              **evaluate(model, held_data, v, train_data if args.recal else None)}
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
    log(json.dumps({k: val for k, val in result.items() if k != "block_rates"}))


def warm_up(args, out_dir) -> Path:
    """The shared USW warm-up (routers off, each block of each sample runs with probability 0.5)."""
    path = out_dir / f"warmup_{args.arch}.pt"
    if path.exists():
        return path
    torch.manual_seed(0)
    device = torch.device(args.device)
    (train, _) = torch.load(out_dir / "data.pt", weights_only=False)
    v = {**BASE, "arch": args.arch, "mode": "uniform"}
    model = make_model(v, device).set_mode("uniform")
    logf = open(out_dir / "warmup.log", "w")
    train_stage(model, GPUData(*train, device), v, args.warmup, [], 1.0,
                lambda m: (logf.write(m + "\n"), logf.flush()), math.inf)
    torch.save(model.state_dict(), path)
    return path


def plot_records(records: list[Path], path: Path, arch: str) -> None:
    """Top-1 against GFLOPs of the rows in JSON-lines `records` (the screen's printed results), the
    static ResNets as the frontier: the pipeline's accuracy-vs-cost plot."""
    from pipeline.evaluate import plot_accuracy_vs_cost
    metrics = []
    for line in (line for f in records for line in f.read_text().splitlines() if line.strip()):
        row = json.loads(line)
        v = {**BASE, "arch": arch, **VARIANTS[row["variant"]]}
        static = cost_table(rdinet.create_model(v["arch"], num_classes=10)).static  # the row's backbone
        metrics.append({"run": row["variant"], "mode": v["mode"], "top1": row["top1_hard"] / 100,
                        "gflops": 2 * row["cost_ratio"] * static / 1e9})
    plot_accuracy_vs_cost(metrics, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archive", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--arch", default="resnet110")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--joint", type=int, default=20)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--limit", type=int, default=0, help="train on this many images only (a smoke test)")
    ap.add_argument("--deadline", type=float, default=math.inf, help="seconds after which variants stop training")
    ap.add_argument("--plot", type=Path, help="with --records: draw their accuracy against cost here and stop")
    ap.add_argument("--records", type=Path, nargs="*", default=[], help="JSON lines of rows, one per line")
    ap.add_argument("--recal", action="store_true",
                    help="also score after recomputing BatchNorm statistics under the hard decisions")
    args = ap.parse_args()
    if args.plot:
        return plot_records(args.records, args.plot, args.arch)
    if args.archive is None or args.out is None:
        ap.error("a screen needs --archive (the CIFAR-10 JPEG tarball) and --out (its work folder)")
    args.start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    if not (args.out / "data.pt").exists():
        (train, held) = load_archive(args.archive)
        if args.limit:
            train, held = (train[0][:args.limit], train[1][:args.limit]), (held[0][:500], held[1][:500])
        torch.save((train, held), args.out / "data.pt")
    print(f"data ready {time.time() - args.start:.0f}s", flush=True)
    warm = warm_up(args, args.out) if any(starts_from_warmup(VARIANTS[n]) for n in names) else None
    print(f"warm-up done {time.time() - args.start:.0f}s", flush=True)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=run_variant, args=(n, VARIANTS[n], args, warm, args.out)) for n in names]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    print(f"variants done {time.time() - args.start:.0f}s", flush=True)
    rows = [json.loads((args.out / f"{n}.json").read_text()) for n in names if (args.out / f"{n}.json").exists()]
    for r in rows:
        print(f"{r['variant']:18s} ep {r['epochs_done']:3d} top1 {r['top1_hard']:6.2f} "
              f"soft {r.get('top1_soft', float('nan')):6.2f} cost {r['cost_ratio']:.3f} "
              f"|m|<1 {r.get('indecisive_share', float('nan')):.3f} img_std {r['image_rate_std']:.3f} "
              f"recal {r.get('top1_recal', float('nan')):6.2f} @{r.get('cost_recal', float('nan')):.3f} "
              f"recal+routers {r.get('top1_recal_routers', float('nan')):6.2f}")


if __name__ == "__main__":
    main()
