"""One training stage (USW warm-up or joint), resumable, on a DeepSpeed engine prepared by accelerate.

run_stage runs a Stage, whose methods read in order: setup (the model, loaders and engine, from
pipeline.build), resume (the latest checkpoint), make_step (pipeline.step's TrainStep), then
run_epoch and end_epoch (validation, checkpoint) epoch by epoch, and export (the final weights
and manifest).
"""
from __future__ import annotations

import functools
import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline import checkpoint as ckpt
from pipeline.build import build_model, init_weights, make_loss_terms, make_optimizer, prepare_engine, stage_mode, \
    trainable_parameters
from pipeline.data import build_loader
from pipeline.data.defaults import resolve as resolve_data
from pipeline.data.generate import ensure_generated
from pipeline.distributed import make_accelerator, use_bf16
from pipeline.evaluate import evaluate
from pipeline.rundir import REQUEUE_EXIT, mark_stopped_for_requeue
from pipeline.schedule import make_scheduler
from pipeline.step import StepFlags, TrainStep, non_finite_message


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


def state_in_parameter_layout(optimizer) -> None:
    """Give each optimizer state tensor its parameter's memory layout. The fused SGD reads weight,
    gradient and momentum as flat memory: a momentum saved contiguous (by a run from before the
    weights were channels_last) would otherwise resume with its elements paired wrongly, silently."""
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param).copy_(value)


def run_stage(cfg: dict, stage: str, run_dir: Path, on_start=None) -> int:
    """Train one stage; returns 0 when complete, REQUEUE_EXIT when stopped by a signal. `on_start()`
    is called on every rank once the stage has started: its model built and its data loaders made."""
    try:
        return Stage(cfg, stage, run_dir).run(on_start or (lambda: None))
    finally:
        # The next stage builds its own engine in this process. accelerate allows one DeepSpeed
        # plugin per AcceleratorState, so forget it (the process group itself stays up).
        from accelerate.state import AcceleratorState, GradientState
        AcceleratorState._reset_state()
        GradientState._reset_state()


class Stage:
    """One stage in this process: setup (model, loaders, engine), resume (the latest checkpoint),
    then run_epoch and end_epoch (validation, checkpoint) until the last epoch, and export."""

    def __init__(self, cfg: dict, stage: str, run_dir: Path):
        self.cfg, self.stage, self.run_dir = cfg, stage, run_dir
        self.stage_dir = run_dir / stage
        self.ckpt_dir = self.stage_dir / "checkpoints"
        self.tcfg, self.stage_cfg = cfg["train"], cfg["stages"][stage]
        self.mode = stage_mode(cfg, stage)
        self.epochs = self.stage_cfg["epochs"]
        self.compiled = self.tcfg["compile"] != "none"

    def run(self, on_start) -> int:
        self.setup(on_start)
        self.resume()
        self.make_step()
        while self.state["epoch"] < self.epochs:
            code = self.run_epoch()
            if code is not None:
                return code
        return self.export()

    def setup(self, on_start) -> None:
        """The accelerator, the model with its starting weights, the loaders and the engine."""
        cfg, stage = self.cfg, self.stage
        self.stopper = process_stopper()
        self.accelerator = accelerator = make_accelerator(cfg, str(self.run_dir))
        rank, self.world = accelerator.process_index, accelerator.num_processes
        self.log = accelerator.print
        on_gpu = accelerator.device.type == "cuda"
        self.bf16 = use_bf16(cfg, on_gpu)

        if self.tcfg["deterministic"]:
            torch.use_deterministic_algorithms(True)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.manual_seed(cfg["seed"])  # identical init everywhere (DeepSpeed broadcasts rank 0's too)
        model = build_model(cfg)
        init_weights(model, cfg, stage, self.run_dir, self.log)
        model.set_mode(self.mode)
        torch.manual_seed(cfg["seed"] * 1000 + rank + (1 if stage == "joint" else 0))  # per-rank Gumbel/USW noise

        data_cfg = cfg["data"]
        if data_cfg["generate"]:
            ensure_generated(data_cfg)
        loader = functools.partial(build_loader, data_cfg, shard_id=rank, num_shards=self.world, seed=cfg["seed"],
                                   device_id=accelerator.local_process_index if on_gpu else None)
        self.train_loader, self.val_loader = loader("train"), loader("val")
        on_start()
        self.steps_per_epoch = len(self.train_loader)
        self.global_batch = data_cfg["batch_size"] * self.world

        optimizer = make_optimizer(trainable_parameters(model, self.mode), cfg["optim"], self.global_batch)
        scheduler = make_scheduler(optimizer, self.steps_per_epoch, self.stage_cfg["milestones"],
                                   cfg["optim"]["lr_decay"], cfg["optim"]["warmup_epochs"])
        self.engine, self.optimizer, self.scheduler = prepare_engine(accelerator, model, optimizer, scheduler,
                                                                     self.tcfg["compile"])
        self.net = accelerator.unwrap_model(self.engine)

    def resume(self) -> None:
        """The state of the latest checkpoint, if any; the stage's summary line; TensorBoard."""
        accelerator, stage, tcfg = self.accelerator, self.stage, self.tcfg
        zero_stage = accelerator.state.deepspeed_plugin.zero_stage
        self.state = {"stage": stage, "step": 0, "epoch": 0, "batch_in_epoch": 0}
        latest = ckpt.latest_checkpoint(self.ckpt_dir)
        if latest is not None:
            self.state = ckpt.load_checkpoint(accelerator, latest, self.train_loader)
            if zero_stage == 0:  # the torch SGD's own state
                state_in_parameter_layout(self.optimizer.optimizer)
            self.log(f"{stage}: resumed from {latest} (epoch {self.state['epoch']}, step {self.state['step']})")
        self.log(f"{stage}: {self.world} process(es), DeepSpeed ZeRO-{zero_stage}, "
                 f"{'bf16 autocast' if self.bf16 else 'fp32'}, mode {self.mode}, {self.steps_per_epoch} steps/epoch, "
                 f"{'compile ' + tcfg['compile'] + ', ' if self.compiled else ''}"
                 f"global batch {self.global_batch}")
        self.writer = None
        if accelerator.is_main_process:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.run_dir / "tensorboard" / stage), purge_step=self.state["step"] + 1)
        self.metrics = self.state.get("metrics", {})  # a stage resumed after its last validation still exports them

    def make_step(self) -> None:
        """The training step (eager, or one CUDA graph with train.cuda_graph) and the stage's clocks."""
        stage, tcfg = self.stage, self.tcfg
        loss_terms = make_loss_terms(self.mode, self.cfg["loss"], self.train_loader.mean, self.train_loader.std,
                                     tcfg["compile"])
        # Logged once, after the epoch that compiled.
        self.cache_counts = compile_cache_counts() if self.compiled else None
        cuda_graph = tcfg["cuda_graph"] and _can_graph_step(self.accelerator, self.log, stage)
        if cuda_graph and _decodes_jpegs_on_gpu(self.cfg["data"]):
            self.log(f"{stage}: data.decode_device=mixed under train.cuda_graph: the captured step leaves the GPU no "
                     "idle time, and the JPEG decoder's per-image GPU work waits behind it, so each step waits for its "
                     "batch; data.decode_device=cpu keeps the decoding off the GPU (docs/performance.md)")
        self.step = TrainStep(self.engine, self.optimizer, loss_terms, bf16=self.bf16, scheduler=self.scheduler,
                              accelerator=self.accelerator, compiled=self.compiled, cuda_graph=cuda_graph,
                              flags=StepFlags(self.accelerator.device), stop_requested=lambda: self.stopper.flag,
                              on_non_finite=self.raise_non_finite)
        self.hard_from = hard_tail_start(self.stage_cfg, self.mode)
        # The stage's pace is this process's: steps restored from a checkpoint took no time here.
        self.pace_since, self.pace_first_step = time.perf_counter(), self.state["step"]

    def eta(self) -> str:
        return stage_eta(self.state["step"], self.pace_first_step, time.perf_counter() - self.pace_since,
                         self.epochs * self.steps_per_epoch)

    def run_epoch(self) -> int | None:
        """Train the rest of the epoch, then end it; REQUEUE_EXIT when stopped, else None."""
        state, tcfg = self.state, self.tcfg
        self.engine.train()
        self.net.set_mode(self.mode)
        if state["epoch"] >= self.hard_from and not self.net.straight_through:
            self.net.straight_through = True
            self.step.recapture()  # the captured step read the soft rule at capture
            self.log(f"{self.stage}: epochs {self.hard_from + 1}-{self.epochs} train with hard decisions "
                     "(stages.joint.hard_tail)")
        progress = _progress(self.accelerator, tcfg, self.stage, state, self.steps_per_epoch, self.epochs, self.eta())
        tick, seen, requeue = time.perf_counter(), 0, False
        for images, labels in self.train_loader:
            if not self.bf16:
                images = images.float()
            terms, gates, stop = self.step(images, labels, state["step"] + 1)
            state["step"] += 1
            state["batch_in_epoch"] += 1
            seen += images.shape[0] * self.world
            if progress is not None:
                progress.update(1)
            if self.writer is not None and state["step"] % tcfg["log_every"] == 0:
                self.log_train(progress, terms, gates, seen / (time.perf_counter() - tick))
            requeue = stop or state["step"] == tcfg["stop_at_step"]
            if state["batch_in_epoch"] == self.steps_per_epoch:
                break  # the epoch's end (validation, checkpoint) is handled below
            if requeue:
                if progress is not None:  # ends the bar's line: the messages that follow start on their own
                    progress.close()
                self.save()
                return self.exit_for_requeue()
            if tcfg["checkpoint_every"] > 0 and state["step"] % tcfg["checkpoint_every"] == 0:
                self.save()
        if progress is not None:
            progress.close()
        return self.end_epoch(tick, seen, requeue)

    def log_train(self, progress, terms, gates, rate: float) -> None:
        _log_train(self.writer, self.state["step"], terms, gates, self.scheduler, rate, self.mode)
        if progress is not None:
            progress.set_description_str(_epoch_label(self.stage, self.state, self.epochs, self.eta()), refresh=False)
            progress.set_postfix(loss=f"{float(terms['loss'].detach()):.3f}", img_s=f"{rate:.0f}")

    def end_epoch(self, tick: float, seen: int, requeue: bool) -> int | None:
        """The epoch's report, validation when due and its checkpoint; REQUEUE_EXIT when a stop
        came in the epoch and epochs are left, else None."""
        stage, state = self.stage, self.state
        stop, bad = self.step.flags.drain()  # waits for the last step's flags, so the GPU has caught up
        epoch_s = time.perf_counter() - tick
        self.log(f"{stage} epoch {state['epoch'] + 1}/{self.epochs}: trained {seen} images in {epoch_s:.1f} s "
                 f"({seen / epoch_s:.0f} img/s), stage ETA {self.eta()}")
        if bad:
            self.raise_non_finite(*bad)
        if self.cache_counts is not None:
            loaded, built = (now - before for now, before in zip(compile_cache_counts(), self.cache_counts))
            self.log(f"{stage}: torch.compile: {loaded} graph(s) loaded from the cache in "
                     f"{os.environ.get('TORCHINDUCTOR_CACHE_DIR')}, {built} compiled")
            self.cache_counts = None
        state["epoch"] += 1
        state["batch_in_epoch"] = 0
        if state["epoch"] % self.tcfg["eval_every"] == 0 or state["epoch"] == self.epochs:
            eval_mode = "full" if self.mode == "uniform" else self.mode
            self.metrics = evaluate(self.engine, self.net, self.val_loader, self.accelerator, eval_mode, self.cfg,
                                    self.bf16)
            state["metrics"] = self.metrics
            self.log(f"{stage} epoch {state['epoch']}/{self.epochs}: " + ", ".join(
                f"{k} {v:.4f}" for k, v in self.metrics.items() if isinstance(v, float)))
            if self.writer is not None:
                _log_eval(self.writer, state["step"], self.metrics)
        self.save()
        if (requeue or stop) and state["epoch"] < self.epochs:
            return self.exit_for_requeue()
        return None

    def raise_non_finite(self, terms: dict, step: int):
        raise FloatingPointError(f"{self.stage}: {non_finite_message(terms, step)}. The last good checkpoint is "
                                 f"kept in {self.ckpt_dir}; lower optim.lr or check the data.")

    def save(self) -> None:
        # Never let a checkpoint hold non-finite weights: the last one saved stays the last good one.
        finite = torch.stack([torch.isfinite(p).all() for p in self.net.parameters()]).all().float()
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() < 1:
            raise FloatingPointError(f"{self.stage}: non-finite weights after step {self.state['step']}; not saved. "
                                     f"The last good checkpoint is kept in {self.ckpt_dir}; lower optim.lr.")
        ckpt.save_checkpoint(self.accelerator, self.ckpt_dir, self.state, self.train_loader,
                             self.tcfg["keep_checkpoints"])

    def exit_for_requeue(self) -> int:
        """Once the step's checkpoint is complete on every rank: say so, mark the run (pipeline.rundir)
        for the launchers, and return the requeue code."""
        self.log(f"{self.stage}: stop requested; checkpoint written at step {self.state['step']}; exiting for requeue")
        if self.accelerator.is_main_process:
            mark_stopped_for_requeue(self.run_dir, self.stage, self.state["step"])
        return REQUEUE_EXIT

    def export(self) -> int:
        """The final weights and manifest (rank 0), once every epoch has run."""
        cfg = self.cfg
        if self.accelerator.is_main_process:
            manifest = {"stage": self.stage, "job": cfg["job"], "arch": cfg["model"]["arch"],
                        "num_classes": cfg["model"]["num_classes"], "mode": self.mode, "epochs": self.epochs,
                        "steps": self.state["step"], "world_size": self.world, "metrics": self.metrics, "config": cfg}
            final = ckpt.export_final(self.stage_dir, self.net.state_dict(), manifest)
            self.log(f"{self.stage}: complete; exported {final}")
            self.writer.close()
        self.accelerator.wait_for_everyone()
        return 0


def hard_tail_start(stage_cfg: dict, mode: str) -> float:
    """The first epoch of the joint stage's straight-through tail (inf: none)."""
    tail = round(stage_cfg["epochs"] * stage_cfg["hard_tail"]) if mode == "joint" else 0
    return stage_cfg["epochs"] - tail if tail > 0 else math.inf


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
