"""The training step behind one call, for the trainer and the benchmarks alike: the eager step
(forward, loss terms, backward, optimizer step, scheduler step, zero_grad) or the same step
captured as one CUDA graph and replayed (pipeline.graphed_step), with the step flags (a stop
requested, a non-finite loss) checked between the loss and the backward."""
from __future__ import annotations

import collections

import torch
import torch.distributed as dist

from pipeline.graphed_step import GraphedStep


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


def non_finite_message(terms: dict, step: int) -> str:
    return f"non-finite loss at step {step}: { {k: float(v) for k, v in terms.items()} }"


def raise_non_finite(terms: dict, step: int):
    raise FloatingPointError(non_finite_message(terms, step))


class TrainStep:
    """`train_step(images, labels, step=0)` trains on one batch and returns (loss terms, gates,
    stop): whether a stop was requested on any rank, as the flags tell `lag` steps late (False
    without flags). `step` numbers the batch in the flags' report of a non-finite loss.

    `model` and `optimizer` are a torch module and optimizer, or with `accelerator` the DeepSpeed
    engine and accelerate's wrappers of the optimizer and scheduler that accelerator.prepare
    returned: the engine autocasts its own forward, and accelerator.backward also steps and clears.
    A plain module's forward runs under bf16 autocast with `bf16`.

    The eager step: forward, loss terms, flags, backward, optimizer step, scheduler step (when one
    is given), zero_grad. `compiled`: the model has torch.compile CUDA graphs of its own, whose
    outputs each step may overwrite. With `cuda_graph` the forward, loss terms, backward and fused
    SGD update are captured on the first call (after any resume has loaded the state) and replayed
    for every call after; `recapture()` makes the next call capture again, for a change that the
    graph read at capture.

    `flags` (StepFlags) are pushed after the loss, before the backward, with `stop_requested()`;
    a non-finite loss reported there is passed as (terms, step) to `on_non_finite`, which raises
    (or returns, to train on).
    """

    def __init__(self, model, optimizer, loss_terms, *, bf16: bool = False, scheduler=None, accelerator=None,
                 compiled: bool = False, cuda_graph: bool = False, flags: StepFlags | None = None,
                 stop_requested=lambda: False, on_non_finite=raise_non_finite):
        self.model, self.optimizer, self.loss_terms, self.bf16 = model, optimizer, loss_terms, bf16
        self.scheduler, self.accelerator, self.compiled, self.cuda_graph = scheduler, accelerator, compiled, cuda_graph
        self.flags, self.stop_requested, self.on_non_finite = flags, stop_requested, on_non_finite
        self.graphed = None

    def recapture(self) -> None:
        self.graphed = None

    def __call__(self, images, labels, step: int = 0):
        terms, gates = self._replay(images, labels) if self.cuda_graph else self._forward(images, labels)
        stop = False
        if self.flags is not None:
            stop, bad = self.flags.push(self.stop_requested(), terms, step)
            if bad:
                self.on_non_finite(*bad)
        if not self.cuda_graph:  # the replay has made the update
            self._backward(terms["loss"])
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if self.accelerator is not None:  # accelerate's wrapper: DeepSpeed's own step clears
            self.optimizer.zero_grad()
        elif not self.cuda_graph:  # the replay writes the gradients it captured, in place
            self.optimizer.zero_grad(set_to_none=True)
        return terms, gates, stop

    def _forward(self, images, labels):
        if self.compiled:  # a new step: CUDA graph outputs of the previous one may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        if self.accelerator is not None:
            out = self.model(images)
        else:
            with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                out = self.model(images)
        return self.loss_terms(images, out.logits, out.gates, labels), out.gates

    def _backward(self, loss):
        if self.accelerator is not None:
            self.accelerator.backward(loss)
        else:
            loss.backward()

    def _replay(self, images, labels):
        if self.graphed is None:
            net, optimizer = self.model, self.optimizer
            if self.accelerator is not None:  # the module and the torch SGD the engine steps
                net, optimizer = self.accelerator.unwrap_model(self.model), self.optimizer.optimizer
            self.graphed = GraphedStep(net, optimizer, self.loss_terms, images, labels, self.bf16)
        return self.graphed(images, labels)
