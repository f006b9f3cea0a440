"""On a GPU, a training step queues its work without waiting for the GPU: no op of the model's
joint forward/backward, the SRM or the losses synchronises the host (CUDA's sync debug mode)."""
import pytest
import torch

import rdinet
from rdinet import srm
from rdinet.losses import total_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
MEAN, STD = (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)


def test_joint_training_step_never_waits_for_the_gpu():
    model = rdinet.create_model("resnet20", num_classes=10).cuda().train()
    images = torch.randn(64, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (64,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(images)
        hist = srm.color_histograms(images, bins=16, mean=MEAN, std=STD)
        terms = total_loss(out.logits.float(), labels, out.gates.float(), hist, t=0.5, alpha=0.2)
        terms["loss"].backward()
    step()  # first call: allocations, cuDNN setup and the cached mean/std tensors
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
