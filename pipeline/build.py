"""What a stage trains, built from its config: the model, its starting weights, the trainable
parameters, the optimizer, the DeepSpeed engine and the loss terms. Used by the trainer, the
evaluation and the benchmarks, so they all build the same thing."""
from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F

import rdinet
from rdinet import srm
from rdinet.losses import total_loss
from pipeline import checkpoint as ckpt
from pipeline.config import MODEL_ARGS
from pipeline.schedule import scaled_lr


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
        # DeepSpeed's ZeRO-0 step clears the gradients by walking module.named_parameters(), host
        # time the compiled step cannot spare (docs/performance.md). The optimizer holds the same
        # tensors (every parameter that gets a gradient) in a list.
        engine.zero_grad = functools.partial(engine.optimizer.zero_grad, set_to_none=True)
        if accelerator.num_processes == 1:
            # An all-reduce over one rank is the identity, yet DeepSpeed's ZeRO-0 path flattens all
            # gradients, reduces the copy and copies them back one by one: a small kernel and its
            # Python per tensor per step. (ZeRO-1/2 keep it: their reduce fills the partitions.)
            engine.enable_backward_allreduce = False
    if compile_mode != "none":  # training shapes are static (soft gates blend); evaluation stays eager
        engine.compile(compile_kwargs={"mode": compile_mode})
    return engine, optimizer, scheduler


def make_loss_terms(mode: str, loss_cfg: dict, mean, std, compile_mode: str = "none"):
    """(images, logits, gates, labels) -> the step's loss terms: eq. 16 in joint mode, else L_cls.
    With a compile mode, compiled: the SRM histograms, rank and cost terms as a few fused kernels."""
    def loss_terms(images, logits, gates, labels):
        logits = logits.float()
        if mode != "joint":
            cls = F.cross_entropy(logits, labels)
            return {"loss": cls, "cls": cls}
        hist = srm.color_histograms(images, bins=loss_cfg["bins"], mean=mean, std=std) \
            if loss_cfg["alpha"] > 0 else None
        return total_loss(logits, labels, gates.float(), hist, t=loss_cfg["t"], alpha=loss_cfg["alpha"],
                          phi=loss_cfg["phi"], tie_eps=loss_cfg["tie_eps"], cost_over=loss_cfg["cost_over"])
    return loss_terms if compile_mode == "none" else torch.compile(loss_terms, mode=compile_mode)
