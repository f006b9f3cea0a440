"""One training stage (USW warm-up or joint), resumable, on a DeepSpeed engine prepared by accelerate.

Reads top to bottom: build the model, loaders and optimizer; resume from the latest checkpoint;
train epoch by epoch with validation; export the final weights and manifest.
"""
from __future__ import annotations

import collections
import functools
import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import rdinet
from rdinet import srm
from rdinet.losses import total_loss
from pipeline import checkpoint as ckpt
from pipeline.config import MODEL_ARGS
from pipeline.data import build_loader
from pipeline.data.defaults import resolve as resolve_data
from pipeline.data.generate import ensure_generated
from pipeline.distributed import make_accelerator, use_bf16
from pipeline.evaluate import evaluate
from pipeline.graphed_step import GraphedStep
from pipeline.rundir import REQUEUE_EXIT, mark_stopped_for_requeue
from pipeline.schedule import make_scheduler, scaled_lr


class StopRequested:
    """SIGTERM / SIGUSR1 set a flag; the step loop checkpoints and exits at the next step."""

    def __init__(self):
        self.flag = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.flag = True


_STOPPER = None


def process_stopper() -> StopRequested:
    """The one stop flag of this process: a signal that arrives between two stages is kept too."""
    global _STOPPER
    if _STOPPER is None:
        _STOPPER = StopRequested()
    return _STOPPER


def stage_mode(cfg: dict, stage: str) -> str:
    return "uniform" if stage == "warmup" else cfg["stages"]["joint"]["mode"]


def build_model(cfg: dict):
    return rdinet.create_model(**{name: cfg["model"][name] for name in MODEL_ARGS})


def init_weights(model, cfg: dict, stage: str, run_dir: Path, log) -> None:
    """Joint after a warm-up starts from its export: blocks loaded, routers fresh (section 3.4)."""
    if stage == "joint" and cfg["stages"]["warmup"]["epochs"] > 0:
        weights = ckpt.load_final_weights(run_dir / "warmup", cfg["model"]["arch"], cfg["model"]["num_classes"])
        blocks = {k: v for k, v in weights.items() if not k.startswith("routers.")}
        missing, unexpected = model.load_state_dict(blocks, strict=False)
        missing = [k for k in missing if not k.startswith("routers.")]
        if missing or unexpected:
            raise ValueError(f"warm-up export does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        log(f"joint: blocks initialised from {run_dir / 'warmup' / 'final'}; routers fresh")
    elif cfg["model"]["pretrained"]:
        from rdinet.backbones import load_torchvision_weights
        load_torchvision_weights(model, cfg["model"]["pretrained"])
        log(f"blocks initialised from torchvision weights {cfg['model']['pretrained']}")


def trainable_parameters(model, mode: str):
    """Routers train only in joint mode; elsewhere they are frozen so DeepSpeed sees no unused grads."""
    for p in model.router_parameters():
        p.requires_grad_(mode == "joint")
    return [p for p in model.parameters() if p.requires_grad]


class StepFlags:
    """Did any rank get a stop signal or a non-finite loss? One small all-reduce per step, started
    asynchronously and read `lag` steps later, so the host never waits for the step it just queued
    (on a GPU, a per-step host sync would stall the launch queue of these many small kernels).
    Reading step n's flags waits until the GPU has finished step n's loss, so `lag` also caps how
    many steps the host can run ahead of the GPU.

    On a GPU the reduced flags are copied to pinned host memory as soon as they are ready, on a
    stream of their own and behind an event. Reading them on the device one step later
    (`.tolist()`) would queue the copy behind the forward pass the host has just launched, and
    wait for that; copying them on the training stream would make it wait for every rank."""

    def __init__(self, device, lag: int = 1):
        self.device, self.lag = device, lag
        self.pending = collections.deque()
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def push(self, stop: bool, terms: dict, step: int):
        """Queue this step's flags; return the outcome of the step `lag` steps back (see `resolve`)."""
        # torch.full fills on the device; torch.tensor(x, device=...) would copy from the host
        # and wait for the GPU to drain first.
        flags = torch.stack([torch.full((), float(stop), device=self.device),
                             (~torch.isfinite(terms["loss"].detach())).float()])
        work = dist.all_reduce(flags, op=dist.ReduceOp.MAX, async_op=True)
        wait = work.wait
        if self.copy_stream is not None:
            host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            copied = torch.cuda.Event()
            with torch.cuda.stream(self.copy_stream):
                work.wait()  # NCCL: this stream waits for the reduce; the host does not
                host.copy_(flags, non_blocking=True)
                copied.record()
            flags.record_stream(self.copy_stream)
            flags, wait = host, copied.synchronize
        # Copies: compiled (CUDA graph) outputs are overwritten by the next step's replay.
        self.pending.append((wait, flags, {k: v.detach().clone() for k, v in terms.items()}, step))
        return self.resolve(self.pending.popleft() if len(self.pending) > self.lag else None)

    def drain(self):
        """The outcome of every step still pending: a stop anywhere, the first non-finite loss."""
        outcomes = [self.resolve(item) for item in self.pending]
        self.pending.clear()
        return any(stop for stop, _ in outcomes), next((bad for _, bad in outcomes if bad), None)

    @staticmethod
    def resolve(item):
        """(stop requested anywhere, (terms, step) of a non-finite loss or None)."""
        if item is None:
            return False, None
        wait, flags, terms, step = item
        wait()
        stop, bad = flags.tolist()
        return stop > 0, ((terms, step) if bad > 0 else None)


def make_optimizer(params, optim_cfg: dict, global_batch: int):
    """SGD with the job's settings, fused: one kernel per step, not one per group of tensors."""
    return torch.optim.SGD(params, lr=scaled_lr(optim_cfg, global_batch), momentum=optim_cfg["momentum"],
                           weight_decay=optim_cfg["weight_decay"], nesterov=optim_cfg["nesterov"], fused=True)


def prepare_engine(accelerator, model, optimizer, scheduler, compile_mode: str):
    """The DeepSpeed engine (with its optimizer and scheduler wrappers), set up for speed."""
    engine, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    zero_stage = accelerator.state.deepspeed_plugin.zero_stage
    if zero_stage == 0:
        # Weights channels_last like the loader's images. A contiguous weight gets a channels_last
        # gradient from the convolution, which autograd then copies into the weight's layout: one
        # copy per convolution per step, outside the compiled graph. Only after prepare: DeepSpeed
        # broadcasts each weight as bytes, which needs it contiguous. (ZeRO-1/2 point the weights
        # into their flat partitions, which a new layout would cut loose.)
        accelerator.unwrap_model(engine).to(memory_format=torch.channels_last)
        # DeepSpeed's ZeRO-0 step clears the gradients by walking module.named_parameters(): 0.6 ms
        # of host time a step for RDI-Net-110, whose compiled step leaves the host little to spare.
        # The optimizer holds the same tensors (every parameter that gets a gradient) in a list.
        engine.zero_grad = functools.partial(engine.optimizer.zero_grad, set_to_none=True)
        if accelerator.num_processes == 1:
            # An all-reduce over one rank is the identity, yet DeepSpeed's ZeRO-0 path flattens all
            # gradients, reduces the copy and copies them back one by one: 605 small kernels and
            # their Python per step for ResNet-110. (ZeRO-1/2 keep it: their reduce fills the partitions.)
            engine.enable_backward_allreduce = False
    if compile_mode != "none":  # training shapes are static (soft gates blend); evaluation stays eager
        engine.compile(compile_kwargs={"mode": compile_mode})
    return engine, optimizer, scheduler


def state_in_parameter_layout(optimizer) -> None:
    """Give each optimizer state tensor its parameter's memory layout. The fused SGD reads weight,
    gradient and momentum as flat memory: a momentum saved contiguous (by a run from before the
    weights were channels_last) would otherwise resume with its elements paired wrongly, silently."""
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param).copy_(value)


def make_loss_terms(mode: str, loss_cfg: dict, mean, std):
    """(images, logits, gates, labels) -> the step's loss terms: eq. 16 in joint mode, else L_cls."""
    def loss_terms(images, logits, gates, labels):
        logits = logits.float()
        if mode != "joint":
            cls = F.cross_entropy(logits, labels)
            return {"loss": cls, "cls": cls}
        hist = srm.color_histograms(images, bins=loss_cfg["bins"], mean=mean, std=std) \
            if loss_cfg["alpha"] > 0 else None
        return total_loss(logits, labels, gates.float(), hist, t=loss_cfg["t"], alpha=loss_cfg["alpha"],
                          phi=loss_cfg["phi"], tie_eps=loss_cfg["tie_eps"], cost_over=loss_cfg["cost_over"])
    return loss_terms


def _raise_non_finite(stage: str, bad, ckpt_dir: Path):
    terms, step = bad
    values = {k: float(v) for k, v in terms.items()}
    raise FloatingPointError(f"{stage}: non-finite loss at step {step}: {values}. The last good checkpoint is "
                             f"kept in {ckpt_dir}; lower optim.lr or check the data.")


def run_stage(cfg: dict, stage: str, run_dir: Path, on_start=None) -> int:
    """Train one stage; returns 0 when complete, REQUEUE_EXIT when stopped by a signal. `on_start()`
    is called on every rank once the stage has started: its model built and its data loaders made."""
    try:
        return _run_stage(cfg, stage, run_dir, on_start or (lambda: None))
    finally:
        # The next stage builds its own engine in this process. accelerate allows one DeepSpeed
        # plugin per AcceleratorState, so forget it (the process group itself stays up).
        from accelerate.state import AcceleratorState, GradientState
        AcceleratorState._reset_state()
        GradientState._reset_state()


def _run_stage(cfg: dict, stage: str, run_dir: Path, on_start) -> int:
    stage_dir = run_dir / stage
    ckpt_dir = stage_dir / "checkpoints"
    stopper = process_stopper()
    accelerator = make_accelerator(cfg, str(run_dir))
    rank, world = accelerator.process_index, accelerator.num_processes
    log = accelerator.print
    on_gpu = accelerator.device.type == "cuda"
    bf16 = use_bf16(cfg, on_gpu)
    tcfg, stage_cfg = cfg["train"], cfg["stages"][stage]
    mode = stage_mode(cfg, stage)

    if tcfg["deterministic"]:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(cfg["seed"])  # identical init everywhere (DeepSpeed broadcasts rank 0's too)
    model = build_model(cfg)
    init_weights(model, cfg, stage, run_dir, log)
    model.set_mode(mode)
    torch.manual_seed(cfg["seed"] * 1000 + rank + (1 if stage == "joint" else 0))  # per-rank Gumbel/USW noise

    data_cfg = cfg["data"]
    if data_cfg["generate"]:
        ensure_generated(data_cfg)
    device_id = accelerator.local_process_index if on_gpu else None
    train_loader = build_loader(data_cfg, "train", shard_id=rank, num_shards=world, device_id=device_id, seed=cfg["seed"])
    val_loader = build_loader(data_cfg, "val", shard_id=rank, num_shards=world, device_id=device_id, seed=cfg["seed"])
    on_start()
    steps_per_epoch = len(train_loader)
    global_batch = data_cfg["batch_size"] * world

    optimizer = make_optimizer(trainable_parameters(model, mode), cfg["optim"], global_batch)
    scheduler = make_scheduler(optimizer, steps_per_epoch, stage_cfg["milestones"], cfg["optim"]["lr_decay"],
                               cfg["optim"]["warmup_epochs"])
    engine, optimizer, scheduler = prepare_engine(accelerator, model, optimizer, scheduler, tcfg["compile"])
    net = accelerator.unwrap_model(engine)
    compiled = tcfg["compile"] != "none"

    state = {"stage": stage, "step": 0, "epoch": 0, "batch_in_epoch": 0}
    latest = ckpt.latest_checkpoint(ckpt_dir)
    if latest is not None:
        state = ckpt.load_checkpoint(accelerator, latest, train_loader)
        if accelerator.state.deepspeed_plugin.zero_stage == 0:  # the torch SGD's own state
            state_in_parameter_layout(optimizer.optimizer)
        log(f"{stage}: resumed from {latest} (epoch {state['epoch']}, step {state['step']})")
    log(f"{stage}: {world} process(es), DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}, "
        f"{'bf16 autocast' if bf16 else 'fp32'}, mode {mode}, {steps_per_epoch} steps/epoch, "
        f"{'compile ' + tcfg['compile'] + ', ' if compiled else ''}"
        f"global batch {global_batch}")

    writer = None
    if accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(run_dir / "tensorboard" / stage), purge_step=state["step"] + 1)

    def save():
        # Never let a checkpoint hold non-finite weights: the last one saved stays the last good one.
        finite = torch.stack([torch.isfinite(p).all() for p in net.parameters()]).all().float()
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() < 1:
            raise FloatingPointError(f"{stage}: non-finite weights after step {state['step']}; not saved. "
                                     f"The last good checkpoint is kept in {ckpt_dir}; lower optim.lr.")
        ckpt.save_checkpoint(accelerator, ckpt_dir, state, train_loader, tcfg["keep_checkpoints"])

    metrics = state.get("metrics", {})  # a stage resumed after its last validation still exports them
    flags = StepFlags(accelerator.device)
    epochs = stage_cfg["epochs"]
    loss_terms = make_loss_terms(mode, cfg["loss"], train_loader.mean, train_loader.std)
    if compiled:  # the SRM histograms, rank and cost terms: a few fused kernels instead of ~40
        loss_terms = torch.compile(loss_terms, mode=tcfg["compile"])
    cache_counts = compile_cache_counts() if compiled else None  # logged once, after the epoch that compiled
    graphed_step, graphed = tcfg["cuda_graph"] and _can_graph_step(accelerator, log, stage), None
    if graphed_step and _decodes_jpegs_on_gpu(cfg["data"]):
        log(f"{stage}: data.decode_device=mixed under train.cuda_graph: the captured step leaves the GPU no idle "
            "time, and the JPEG decoder's per-image GPU work waits behind it, so each step waits for its batch; "
            "data.decode_device=cpu fed RDI-Net-50 at 0.99 of synthetic-data speed against 0.87-0.88 (H200, 16 cores)")
    hard_from = hard_tail_start(stage_cfg, mode)
    # The stage's pace is this process's: steps restored from a checkpoint took no time here.
    pace_since, pace_first_step, stage_steps = time.perf_counter(), state["step"], epochs * steps_per_epoch

    def eta() -> str:
        return stage_eta(state["step"], pace_first_step, time.perf_counter() - pace_since, stage_steps)

    while state["epoch"] < epochs:
        engine.train()
        net.set_mode(mode)
        if state["epoch"] >= hard_from and not net.straight_through:
            net.straight_through = True
            graphed = None  # the captured step read the soft rule at capture: capture it again
            log(f"{stage}: epochs {hard_from + 1}-{epochs} train with hard decisions (stages.joint.hard_tail)")
        progress = _progress(accelerator, tcfg, stage, state, steps_per_epoch, epochs, eta())
        tick, seen, requeue = time.perf_counter(), 0, False
        for images, labels in train_loader:
            if not bf16:
                images = images.float()
            if graphed_step:  # the update is part of the replay
                if graphed is None:  # captured here, after any resume has loaded the state
                    graphed = GraphedStep(net, optimizer.optimizer, loss_terms, images, labels, bf16)
                terms, gates = graphed(images, labels)
            else:
                if compiled:  # a new step: CUDA graph outputs of the previous one may be overwritten
                    torch.compiler.cudagraph_mark_step_begin()
                out = engine(images)
                terms, gates = loss_terms(images, out.logits, out.gates, labels), out.gates
            stop, bad = flags.push(stopper.flag, terms, state["step"] + 1)
            if bad:
                _raise_non_finite(stage, bad, ckpt_dir)
            if not graphed_step:
                accelerator.backward(terms["loss"])
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            state["step"] += 1
            state["batch_in_epoch"] += 1
            seen += images.shape[0] * world
            if progress is not None:
                progress.update(1)
            if writer is not None and state["step"] % tcfg["log_every"] == 0:
                rate = seen / (time.perf_counter() - tick)
                _log_train(writer, state["step"], terms, gates, scheduler, rate, mode)
                if progress is not None:
                    progress.set_description_str(_epoch_label(stage, state, epochs, eta()), refresh=False)
                    progress.set_postfix(loss=f"{float(terms['loss'].detach()):.3f}", img_s=f"{rate:.0f}")
            requeue = stop or state["step"] == tcfg["stop_at_step"]
            if state["batch_in_epoch"] == steps_per_epoch:
                break  # the epoch's end (validation, checkpoint) is handled below
            if requeue:
                if progress is not None:  # ends the bar's line: the messages that follow start on their own
                    progress.close()
                save()
                return _exit_for_requeue(accelerator, run_dir, stage, state["step"], log)
            if tcfg["checkpoint_every"] > 0 and state["step"] % tcfg["checkpoint_every"] == 0:
                save()
        if progress is not None:
            progress.close()
        stop, bad = flags.drain()  # waits for the last step's flags, so the GPU has caught up
        epoch_s = time.perf_counter() - tick
        log(f"{stage} epoch {state['epoch'] + 1}/{epochs}: trained {seen} images in {epoch_s:.1f} s "
            f"({seen / epoch_s:.0f} img/s), stage ETA {eta()}")
        if bad:
            _raise_non_finite(stage, bad, ckpt_dir)
        if cache_counts is not None:
            loaded, built = (now - before for now, before in zip(compile_cache_counts(), cache_counts))
            log(f"{stage}: torch.compile: {loaded} graph(s) loaded from the cache in "
                f"{os.environ.get('TORCHINDUCTOR_CACHE_DIR')}, {built} compiled")
            cache_counts = None
        requeue = requeue or stop
        state["epoch"] += 1
        state["batch_in_epoch"] = 0
        if state["epoch"] % tcfg["eval_every"] == 0 or state["epoch"] == epochs:
            eval_mode = "full" if mode == "uniform" else mode
            metrics = evaluate(engine, net, val_loader, accelerator, eval_mode, cfg, bf16)
            state["metrics"] = metrics
            log(f"{stage} epoch {state['epoch']}/{epochs}: " + ", ".join(
                f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
            if writer is not None:
                _log_eval(writer, state["step"], metrics)
        save()
        if requeue and state["epoch"] < epochs:
            return _exit_for_requeue(accelerator, run_dir, stage, state["step"], log)

    if accelerator.is_main_process:
        manifest = {"stage": stage, "job": cfg["job"], "arch": cfg["model"]["arch"],
                    "num_classes": cfg["model"]["num_classes"], "mode": mode, "epochs": epochs,
                    "steps": state["step"], "world_size": world, "metrics": metrics, "config": cfg}
        final = ckpt.export_final(stage_dir, net.state_dict(), manifest)
        log(f"{stage}: complete; exported {final}")
        writer.close()
    accelerator.wait_for_everyone()
    return 0


def hard_tail_start(stage_cfg: dict, mode: str) -> float:
    """The first epoch of the joint stage's straight-through tail (inf: none)."""
    tail = round(stage_cfg["epochs"] * stage_cfg["hard_tail"]) if mode == "joint" else 0
    return stage_cfg["epochs"] - tail if tail > 0 else math.inf


def _exit_for_requeue(accelerator, run_dir: Path, stage: str, step: int, log) -> int:
    """Once step's checkpoint is complete on every rank: say so, mark the run (pipeline.rundir) for
    the launchers, and return the requeue code."""
    log(f"{stage}: stop requested; checkpoint written at step {step}; exiting for requeue")
    if accelerator.is_main_process:
        mark_stopped_for_requeue(run_dir, stage, step)
    return REQUEUE_EXIT


def _can_graph_step(accelerator, log, stage: str) -> bool:
    """train.cuda_graph applies to one GPU process with ZeRO-0 (see pipeline.graphed_step)."""
    zero_stage = accelerator.state.deepspeed_plugin.zero_stage
    why_not = ("no GPU" if accelerator.device.type != "cuda" else
               f"{accelerator.num_processes} processes (it captures one)" if accelerator.num_processes > 1 else
               f"ZeRO-{zero_stage} (it needs ZeRO-0)" if zero_stage != 0 else None)
    log(f"{stage}: train.cuda_graph: " + (f"not captured: {why_not}" if why_not else "the step is one CUDA graph"))
    return why_not is None


def _decodes_jpegs_on_gpu(data_cfg: dict) -> bool:
    """An ImageNet-style loader on the GPU that decodes there (data.decode_device mixed)."""
    data = resolve_data(data_cfg)
    return data["dataset"] == "imagenet" and data["device"] != "cpu" and data["decode_device"] == "mixed"


def compile_cache_counts() -> tuple[int, int]:
    """(graphs loaded from inductor's cache, graphs compiled) so far in this process."""
    from torch._dynamo.utils import counters
    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]


def stage_eta(step: int, first_step: int, elapsed_s: float, stage_steps: int) -> str:
    """Time left for the stage's steps after `step`, at the pace of the steps this process ran since
    `first_step` in `elapsed_s` (validation and checkpoints included); "?" before it has run one."""
    done_here = step - first_step
    if done_here <= 0 or elapsed_s <= 0:
        return "?"
    return tqdm.format_interval(elapsed_s / done_here * max(stage_steps - step, 0))


def _epoch_label(stage: str, state: dict, epochs: int, eta: str) -> str:
    return f"{stage} {state['epoch'] + 1}/{epochs}, stage ETA {eta}"


def _progress(accelerator, tcfg, stage, state, steps_per_epoch, epochs, eta):
    """The epoch's bar (its own ETA is the epoch's); its label carries the whole stage's."""
    if not (accelerator.is_main_process and tcfg["progress"]):
        return None
    return tqdm(total=steps_per_epoch, initial=state["batch_in_epoch"], dynamic_ncols=True,
                desc=_epoch_label(stage, state, epochs, eta), mininterval=2.0)


def _log_train(writer, step, terms, gates, scheduler, rate, mode):
    for name, value in terms.items():
        writer.add_scalar(f"train/{name}", float(value.detach()), step)
    writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
    writer.add_scalar("train/img_per_s", rate, step)
    if mode == "joint":
        rates = gates.detach().float().mean(0).cpu()
        writer.add_scalar("train/exec_rate", float(rates.mean()), step)
        writer.add_histogram("train/block_exec_rates", rates, step)


def _log_eval(writer, step, metrics):
    for name, value in metrics.items():
        if isinstance(value, float) and math.isfinite(value):
            writer.add_scalar(f"val/{name}", value, step)
    writer.add_histogram("val/block_exec_rates", torch.tensor(metrics["block_rates"]), step)
    for name in ("block_indecisive_share", "block_mean_abs_margin", "block_prob_std"):
        if name in metrics:  # routed models: how decisively each block's router decides
            writer.add_histogram(f"val/{name}", torch.tensor(metrics[name]), step)
