"""RDI-Net (Relational Dynamic Inference Networks, ICCV 2021) as a plain PyTorch library.

    from rdinet import create_model, model_cost
    model = create_model("resnet110", num_classes=10)
    out = model(images)            # RDIOutput(logits, gates)

Submodules: rdinet.srm (colour histograms, rank loss), rdinet.losses (cost and total loss),
rdinet.cost (MACs from layer shapes), rdinet.inference (the frozen net for serving, whose skipped
blocks cost no time), rdinet.kernels (its Triton kernels, and training's). Nothing here imports
DALI, DeepSpeed or accelerate; triton is used where it is installed.
"""

from . import cost, inference, kernels, losses, srm
from .backbones import ARCHS, load_torchvision_weights
from .cost import model_cost
from .model import EXECUTORS, MODES, RDINet, RDIOutput, create_model

__all__ = [
    "ARCHS", "EXECUTORS", "MODES", "RDINet", "RDIOutput", "cost", "create_model", "inference", "kernels",
    "load_torchvision_weights", "losses", "model_cost", "srm",
]
