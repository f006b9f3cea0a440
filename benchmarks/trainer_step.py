"""Where the trainer's step time goes beyond the model's: one compiled model, timed through more
and more of `pipeline/train.py`'s step loop in one process.

    python -m benchmarks.trainer_step [--job jobs/cifar10_r110.yaml] [--mode joint|full]
                                      [--compile reduce-overhead] [--steps 40] [--rounds 3]

Rows (ms per step, median of interleaved rounds; all share the one compiled module, so one
compile serves them all):
  module   the compiled module (with the engine's hooks, which run inside it), the trainer's
           loss terms, the plain backward and the fused SGD step (pipeline.step.TrainStep on the
           module and its torch SGD): what the model itself costs;
  engine   the same through the DeepSpeed engine as the trainer drives it (TrainStep on the engine:
           engine(images), accelerator.backward, which also steps the optimizer, the scheduler);
  flags    + the trainer's per-step StepFlags (the stop / non-finite check);
  flags2   the same with the flags read two steps later instead of one (StepFlags(lag=2)), which
           lets the host run one more step ahead of the GPU;
  loader   + batches from the job's DALI loader instead of one fixed batch;
  logged   + the trainer's TensorBoard logging every train.log_every steps: the trainer's loop;
  graphed  the trainer's loop with train.cuda_graph: the whole step replayed as one CUDA graph
           (pipeline.graphed_step). On a GPU and with --compile default or none only.
Each row also gets its host ms per step (the host's loop without the final wait for the GPU:
close to ms/step when the host is the bottleneck, below it when the GPU is) and the aten ops a
step dispatches outside the compiled graphs (on any device: host work, and on a GPU launches
outside CUDA graphs), listed by name. On a GPU also, per step (torch.profiler): GPU ms, the summed
duration of its kernels; gaps ms, the idle time between dependent kernels shorter than 20 us (the
GPU's own, inside CUDA graphs too); waits ms, the rest of ms/step: the GPU idle, waiting for the
host. Graphs that torch.compile could not put into CUDA graphs are listed with
inductor's reason.
--tiny runs a small network on small images, for the tests.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from benchmarks.timing import Timer, cuda_intervals, eager_ops_per_call, short_gaps_us
from benchmarks.workloads import from_loader
from pipeline import trainer
from pipeline.build import build_model, make_loss_terms, make_optimizer, prepare_engine, stage_mode, trainable_parameters
from pipeline.config import load_config
from pipeline.data import build_loader
from pipeline.data.generate import ensure_generated
from pipeline.distributed import make_accelerator, use_bf16
from pipeline.schedule import make_scheduler
from pipeline.step import StepFlags, TrainStep


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", default="jobs/cifar10_r110.yaml")
    parser.add_argument("--mode", default="joint", choices=("joint", "full"))
    parser.add_argument("--compile", default="reduce-overhead", help="train.compile (none, default, reduce-overhead)")
    parser.add_argument("--steps", type=int, default=40, help="steps per timed window")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="resnet20, batch 8, few images (CPU tests)")
    return parser.parse_args(argv)


def job_config(args, root: Path) -> dict:
    # The rows build their steps themselves; the job's train.cuda_graph would refuse reduce-overhead.
    overrides = [f"stages.joint.mode={args.mode}", f"train.compile={args.compile}", "train.cuda_graph=false",
                 "data.generate=true", f"data.root={root}", "train.progress=false"]
    if args.tiny:
        overrides += ["model.arch=resnet20", "data.batch_size=8", "data.generated_size=8", "train.log_every=2",
                      "data.generated_val_size=2", "data.num_threads=1"]
    else:  # epochs of the trainer's CIFAR length (45,000 images), so epoch ends come as often
        overrides += ["data.generated_size=4500", "data.generated_val_size=10"]
    return load_config(args.job, overrides)


def build(cfg: dict, run_dir: str):
    """The trainer's own pieces, put together as `pipeline.trainer` does for the joint stage."""
    accelerator = make_accelerator(cfg, run_dir)
    on_gpu = accelerator.device.type == "cuda"
    mode = stage_mode(cfg, "joint")
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg).set_mode(mode)
    ensure_generated(cfg["data"])
    loader = build_loader(cfg["data"], "train", device_id=accelerator.local_process_index if on_gpu else None,
                          seed=cfg["seed"])
    optimizer = make_optimizer(trainable_parameters(model, mode), cfg["optim"], cfg["data"]["batch_size"])
    scheduler = make_scheduler(optimizer, len(loader), [], cfg["optim"]["lr_decay"], 0)
    engine, optimizer, scheduler = prepare_engine(accelerator, model, optimizer, scheduler, cfg["train"]["compile"])
    if accelerator.state.deepspeed_plugin.zero_stage != 0:  # the module row steps the torch SGD itself
        raise SystemExit(f"{cfg['train']['deepspeed_config']} is ZeRO-{accelerator.state.deepspeed_plugin.zero_stage};"
                         " this benchmark needs ZeRO-0 (the CIFAR jobs' jobs/deepspeed/zero0.json)")
    loss_terms = make_loss_terms(mode, cfg["loss"], loader.mean, loader.std, cfg["train"]["compile"])
    return accelerator, engine, optimizer, scheduler, loss_terms, loader, use_bf16(cfg, on_gpu)


def step_functions(accelerator, engine, optimizer, scheduler, loss_terms, loader, bf16, compiled, log=None,
                   graph_whole_step=False):
    """One function per row; `log` is (SummaryWriter, every, mode) for the logged rows."""
    fixed = tuple(t.clone() for t in next(iter(loader)))  # DALI reuses the buffers it handed out
    fixed_batch = lambda: fixed  # noqa: E731
    loader_batch = from_loader(loader)
    device_type = accelerator.device.type

    def batch_of(source):
        images, labels = source()
        return (images if bf16 else images.float()), labels

    # The bare model step: the engine's module and the torch SGD it holds, stepped directly.
    module_step = TrainStep(engine.module, engine.optimizer, loss_terms, bf16=bf16, compiled=compiled)

    def trainer_step(source, flags_lag, log=None, cuda_graph=False):
        flags = StepFlags(accelerator.device, lag=flags_lag) if flags_lag else None
        train_step = TrainStep(engine, optimizer, loss_terms, bf16=bf16, scheduler=scheduler, accelerator=accelerator,
                               compiled=compiled, cuda_graph=cuda_graph, flags=flags,
                               on_non_finite=lambda terms, step: None)  # timed, not checked
        done = [0]  # steps

        def step():
            terms, gates, _ = train_step(*batch_of(source))
            done[0] += 1
            if log is not None and done[0] % log[1] == 0:
                writer, _, mode = log
                trainer._log_train(writer, done[0], terms, gates, scheduler, 0.0, mode)
        return step

    rows = {"module": lambda: module_step(*batch_of(fixed_batch)), "engine": trainer_step(fixed_batch, 0),
            "flags": trainer_step(fixed_batch, 1), "flags2": trainer_step(fixed_batch, 2),
            "loader": trainer_step(loader_batch, 1), "logged": trainer_step(loader_batch, 1, log)}
    if device_type == "cuda" and graph_whole_step:  # captured on its first call, in the warm-up
        rows["graphed"] = trainer_step(loader_batch, 1, log, cuda_graph=True)
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    skipped = CudagraphSkips()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = job_config(args, Path(tmp) / "data")
        parts = build(cfg, str(Path(tmp) / "run"))
        device = parts[0].device
        writer = SummaryWriter(str(Path(tmp) / "tensorboard"))
        log = (writer, cfg["train"]["log_every"], stage_mode(cfg, "joint"))
        steps = step_functions(*parts, compiled=args.compile != "none", log=log,
                               graph_whole_step=args.compile in ("none", "default"))
        rows = list(steps)
        tick = time.perf_counter()
        for step in steps.values():  # compiles once, then warms every row
            for _ in range(3):
                step()
        warmup_s = time.perf_counter() - tick
        window = Timer(device, warmup=0, iters=args.steps, repeats=1)  # one window per row and round
        times = {row: [] for row in rows}
        for _ in range(args.rounds):
            for row in rows:
                times[row].append(1000 * window(steps[row]))
        result = {row: statistics.median(times[row]) for row in rows}
        host_clock = Timer(device, warmup=0, iters=args.steps, repeats=1, clock="host")
        host = {row: 1000 * host_clock(steps[row]) for row in rows}
        profiled = 5  # steps
        spans = {row: cuda_intervals(steps[row], profiled) for row in rows} if device.type == "cuda" else {}
        gpu = {row: sum(end - start for start, end in spans[row]) / profiled / 1000 for row in spans}
        gaps = {row: short_gaps_us(spans[row]) / profiled / 1000 for row in spans}
        eager = {row: eager_ops_per_call(steps[row]) for row in rows}
        batch = cfg["data"]["batch_size"]
        print(f"{cfg['model']['arch']} {args.mode}, batch {batch}, compile {args.compile}, {device}; "
              f"compile and warm-up {warmup_s:.0f} s")
        print(f"{'row':8s} {'ms/step':>8s} {'img/s':>8s} {'host ms':>8s} {'GPU ms':>8s} {'gaps ms':>8s} "
              f"{'waits ms':>8s} {'eager ops':>9s}")
        for row in rows:
            gpu_cols = (f"{gpu[row]:8.2f} {gaps[row]:8.2f} {result[row] - gpu[row] - gaps[row]:8.2f}" if row in gpu
                        else " ".join(f"{'-':>8s}" for _ in range(3)))
            print(f"{row:8s} {result[row]:8.2f} {batch / result[row] * 1000:8.0f} {host[row]:8.2f} {gpu_cols} "
                  f"{sum(eager[row].values()):9.0f}")
        for row in rows:  # the most frequent first
            print(f"eager ops a step, {row}: " + ", ".join(f"{name} {n:g}" for name, n in list(eager[row].items())[:12]))
        from torch._dynamo.utils import counters
        print(f"graphs torch.compile kept out of CUDA graphs: {counters['inductor']['cudagraph_skips']}")
        for reason in sorted(set(skipped.reasons)):
            print(f"not in a CUDA graph ({skipped.reasons.count(reason)}x): {reason}")
        writer.close()
    return {"ms_per_step": result, "host_ms_per_step": host, "gpu_ms_per_step": gpu, "gpu_gaps_ms_per_step": gaps,
            "eager_ops_per_step": eager,
            "cudagraph_skips": skipped.reasons}


class CudagraphSkips(logging.Handler):
    """Collects inductor's "skipping cudagraphs due to ..." messages (first line of each)."""

    LOGGER = "torch._inductor.cudagraph_utils.__cudagraphs"

    def __init__(self):
        super().__init__()
        self.reasons: list[str] = []
        logging.getLogger(self.LOGGER).addHandler(self)

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("skipping cudagraphs"):
            self.reasons.append(message.splitlines()[0])


if __name__ == "__main__":
    main()
