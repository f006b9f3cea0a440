"""The whole training step as one CUDA graph: forward, loss terms, backward and the SGD update,
captured once and replayed for every batch (PyTorch's "whole-network capture" with
torch.cuda.graph).

torch.compile's reduce-overhead mode graphs the forward and the backward on their own and leaves
the host everything around them: hundreds of eager ops, the optimizer's Python over every tensor,
DeepSpeed's bookkeeping. For RDI-Net-110 on CIFAR that host work takes about as long as the GPU's
step, so any host jitter idles the GPU. Replaying a captured step is one launch.

What it needs: one process (a multi-GPU step all-reduces its gradients in DeepSpeed's Python,
between the backward and the update), ZeRO-0 (the torch optimizer updates the module's own
tensors), the fused SGD (no host work that a replay would skip), and static shapes (every
training batch has the same size: the loaders drop the last partial batch).
"""
from __future__ import annotations

import contextlib

import torch


class GraphedStep:
    """Captures `net`'s training step on the first batch and replays it for each batch after.

    `net` may be compiled (torch.compile's default mode, whose kernels are captured with the rest)
    or eager, not compiled with CUDA graphs of its own. A call copies the batch into the graph's
    input buffers, writes the optimizer's current learning rates (set on the host by the
    scheduler) into the device tensors the captured update reads, replays the step and returns
    its (loss terms, gates): the graph's own output tensors, overwritten by the next call.
    """

    def __init__(self, net, optimizer, loss_terms, images, labels, bf16: bool, warmup_steps: int = 3):
        if not (isinstance(optimizer, torch.optim.SGD) and all(g["fused"] for g in optimizer.param_groups)):
            raise TypeError(f"GraphedStep replays the fused torch SGD's update; got {type(optimizer).__name__}")
        if any(g["momentum"] > 0 and g["dampening"] != 0 for g in optimizer.param_groups):
            raise ValueError("GraphedStep needs SGD without dampening (a zero momentum buffer stands for none)")
        self.net, self.optimizer, self.loss_terms, self.bf16 = net, optimizer, loss_terms, bf16
        self.images, self.labels = images.clone(), labels.clone()  # the graph's inputs, fixed addresses
        self.lrs = [torch.tensor(float(g["lr"]), device=images.device) for g in optimizer.param_groups]

        # Warm-up steps compile, let cuDNN pick its algorithms and create the momentum buffers, on a
        # side stream as capture requires. They change the weights, so the state is put back after.
        saved = self._training_state()
        side = torch.cuda.Stream(images.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup_steps):
                optimizer.zero_grad(set_to_none=True)
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self._restore(saved)
        # Captured with no gradients, the backward writes them instead of adding to them.
        optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: DALI's threads keep queueing work on their own streams during the capture
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.outputs = self._step()

    def __call__(self, images, labels):
        self.images.copy_(images)
        self.labels.copy_(labels)
        for lr, group in zip(self.lrs, self.optimizer.param_groups):
            lr.fill_(group["lr"])  # a fill kernel: the host does not wait
        self.graph.replay()
        return self.outputs

    def _step(self):
        with torch.autocast(self.images.device.type, dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False):
            out = self.net(self.images)
        terms = self.loss_terms(self.images, out.logits, out.gates, self.labels)
        terms["loss"].backward()
        with self._device_lrs():
            self.optimizer.step()
        return terms, out.gates

    @contextlib.contextmanager
    def _device_lrs(self):
        """The fused SGD reads a tensor learning rate from device memory, so the captured update
        uses whatever the tensor holds at replay. The groups keep their float learning rates
        otherwise, for the scheduler and for checkpoints."""
        floats = [g["lr"] for g in self.optimizer.param_groups]
        for group, lr in zip(self.optimizer.param_groups, self.lrs):
            group["lr"] = lr
        try:
            yield
        finally:
            for group, lr in zip(self.optimizer.param_groups, floats):
                group["lr"] = lr

    def _training_state(self) -> dict:
        """Copies of the module's parameters and buffers and of the optimizer's state tensors."""
        module = {name: t.detach().clone() for name, t in self.net.state_dict(keep_vars=True).items()}
        optim = {p: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for p, s in self.optimizer.state.items()}
        return {"module": module, "optim": optim}

    @torch.no_grad()
    def _restore(self, saved: dict) -> None:
        """Put back the state from before the warm-up steps, in place (the graph will hold these
        tensors). Momentum buffers the warm-up created are zeroed: with no dampening, SGD's first
        step from a zero buffer is the same as from none."""
        for name, t in self.net.state_dict(keep_vars=True).items():
            t.copy_(saved["module"][name])
        for param, state in self.optimizer.state.items():
            before = saved["optim"].get(param, {})
            for key, value in state.items():
                if torch.is_tensor(value) and key in before:
                    value.copy_(before[key])
                elif torch.is_tensor(value):
                    value.zero_()
