"""Per-block view of real skipping: one ResNet-50 bottleneck of each stage at batch 256, timed as
the eager block (bf16 autocast, the static network's block), the frozen block on every sample,
the frozen block on the executing samples, and the earlier gather/scatter executor; with the
frozen block checked against the eager one. Then the whole frozen net: wall time per batch
against the GPU's kernel time (their gap is the host launching), static and skipping.

    python -m benchmarks.frozen_blocks [--rate 0.65] [--batch 256] [--bucket 8]
"""
import argparse

import torch

import rdinet
from rdinet import inference
from rdinet.executor import run_selected
from benchmarks.timing import Timer, gpu_ms_per_call


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=0.65)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--bucket", type=int, default=8)
    args = parser.parse_args()
    device = torch.device("cuda")
    timer = Timer(device, warmup=5, iters=20, repeats=5)
    model = rdinet.create_model("resnet50").to(device, memory_format=torch.channels_last).eval()
    frozen = inference.freeze(model, bucket=args.bucket)
    # the second block of each stage (no projection) and the first (projection, stride)
    picks = {"layer1.1": (1, 56), "layer2.0": (3, 56), "layer2.1": (4, 28), "layer3.1": (8, 14), "layer4.1": (14, 7)}
    torch.manual_seed(0)
    print(f"batch {args.batch}, {args.rate:.0%} of samples executing, ms per block (median)")
    print(f"{'block':10} {'eager':>8} {'frozen all':>11} {'frozen skip':>12} {'old skip32':>11} {'rel err':>8}"
          f" {'3x3+relu':>9} {'cudnn fused':>11}")
    for name, (n, size) in picks.items():
        block, fblock = model.blocks[n], frozen.blocks[n]
        channels = block.conv1.in_channels
        x = torch.randn(args.batch, channels, size, size, device=device).contiguous(memory_format=torch.channels_last)
        xb = x.to(torch.bfloat16)
        gate = (torch.rand(args.batch, device=device) < args.rate).float()
        index = gate.nonzero().squeeze(1)

        def eager():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return block(xb)  # in the eager network, blocks pass bf16 on

        def old():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return run_selected(block, xb, gate, inplace=False, bucket=32)
        # the frozen blocks write in place: give each call its own copy (the copy is timed apart)
        work = xb.clone(memory_format=torch.channels_last)
        copy_ms = 1000 * timer(lambda: work.copy_(xb))
        t_eager = 1000 * timer(eager)
        t_all = 1000 * timer(lambda: fblock(work.copy_(xb), None, args.bucket)) - copy_ms
        t_skip = 1000 * timer(lambda: fblock(work.copy_(xb), index, args.bucket)) - copy_ms
        t_old = 1000 * timer(old)
        ref = torch.where(gate.bool().view(-1, 1, 1, 1), eager().float(),
                          (block.shortcut(x) if block.downsample is not None else x).float())
        got = fblock(xb.clone(memory_format=torch.channels_last), index, args.bucket).float()
        err = float((got - ref).norm() / ref.norm())
        # the 3x3 convolution on the executing samples: conv + bias, then ReLU, or cuDNN's fused op
        conv = fblock.conv2
        y1 = torch.randn(len(index), conv.weight.shape[1], size, size, device=device, dtype=torch.bfloat16)
        y1 = y1.contiguous(memory_format=torch.channels_last)
        t_conv = 1000 * timer(lambda: conv(y1).relu_())
        t_fused = 1000 * timer(lambda: torch.cudnn_convolution_relu(y1, conv.weight, conv.bias, conv.stride,
                                                                    conv.padding, (1, 1), 1))
        print(f"{name:10} {t_eager:8.3f} {t_all:11.3f} {t_skip:12.3f} {t_old:11.3f} {err:8.1e} "
              f"{t_conv:9.3f} {t_fused:11.3f}")
    whole_net(model, frozen, args, timer)


def whole_net(model, frozen, args, timer):
    images = torch.randn(args.batch, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    print(f"whole frozen net, batch {args.batch}: wall ms per batch | GPU kernel ms per batch")
    for mode, rate in (("full", 1.0), ("uniform", args.rate)):
        model.set_mode(mode)
        model.uniform_rate = rate
        wall = 1000 * timer(lambda: frozen(images))
        busy = gpu_ms_per_call(lambda: frozen(images), calls=5)
        print(f"  {mode:8} rate {rate:.2f}: {wall:7.2f} | {busy:7.2f}")


if __name__ == "__main__":
    main()
