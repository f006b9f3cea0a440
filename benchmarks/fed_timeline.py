"""Where a DALI-fed training step waits: its GPU timeline per CUDA stream, fed against synthetic data.

    python -m benchmarks.fed_timeline [--cuda-graph] [--steps 8] [--tiny]

RDI-Net-50 joint training (benchmarks.workloads.train_step_fn; with --cuda-graph one captured step
serves every feed) on synthetic batches, then fed by the generated ImageNet loader decoding its JPEGs on the
GPU (data.decode_device=mixed) and on DALI's CPU threads (cpu). Per feed, from torch.profiler:
ms per step of the GPU's span, of the training stream's operations and of its idle gaps (a step
waiting for its batch shows here, as gaps longer than 0.2 ms), and per other stream (DALI's,
nvJPEG's) its operations and ms per step. Then img/s of each feed, timed by benchmarks.timing.Timer.
Both loaders stay open through the run, so a feed's profile can also catch the loader before it
refilling its prefetch queue (the other streams' counts then include that).
"""
import argparse
import collections
import tempfile
from pathlib import Path

import torch

from benchmarks.timing import Timer, cuda_events, idle_gaps_us
from benchmarks.workloads import MEAN, STD, from_loader, generated_loader, make_training_model, synthetic, train_step_fn

DECODERS = ("mixed", "cpu")


def stream_intervals(step, steps: int) -> dict[int, list[tuple[float, float]]]:
    """{stream id: [(start us, end us)]} of every GPU operation `steps` calls of `step` run."""
    streams = collections.defaultdict(list)
    for e in cuda_events(step, steps, warmup=3):
        streams[e.device_resource_id].append((e.time_range.start, e.time_range.end))
    return streams


def report(feed: str, streams, steps: int) -> None:
    busy_ms = {stream: sum(end - start for start, end in spans) / steps / 1000 for stream, spans in streams.items()}
    training = max(busy_ms, key=busy_ms.get)
    every = [span for spans in streams.values() for span in spans]
    span_ms = (max(end for _, end in every) - min(start for start, _ in every)) / steps / 1000
    gaps = idle_gaps_us(streams[training])
    long_gaps = [g for g in gaps if g > 200]
    other_ops = sum(len(spans) for stream, spans in streams.items() if stream != training) / steps
    other_ms = sum(ms for stream, ms in busy_ms.items() if stream != training)
    print(f"{feed:10} GPU span {span_ms:6.2f} ms/step | training stream {busy_ms[training]:6.2f} ms of ops, idle "
          f"{sum(gaps) / steps / 1000:5.2f} ms ({len(long_gaps) / steps:.1f} gaps > 0.2 ms a step, "
          f"{sum(long_gaps) / steps / 1000:.2f} ms) | {len(streams) - 1} other streams: {other_ops:.0f} ops, "
          f"{other_ms:.2f} ms a step")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuda-graph", action="store_true", help="capture the step as one CUDA graph (train.cuda_graph)")
    parser.add_argument("--steps", type=int, default=8, help="profiled steps per feed")
    parser.add_argument("--tiny", action="store_true", help="batch 8 of 64-px images (a smoke run)")
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    batch, size = (8, 64) if args.tiny else (256, 224)
    model = make_training_model("resnet50", 1000, "joint", device)
    feeds = {"synthetic": synthetic(batch, size, 1000, device)}
    with tempfile.TemporaryDirectory() as tmp:
        for decode_device in DECODERS:
            loader = generated_loader("resnet50", batch, device, Path(tmp), args.tiny, decode_device)
            feeds[f"dali_{decode_device}"] = from_loader(loader)
        feed = {"next": feeds["synthetic"]}
        step = train_step_fn(model, lambda: feed["next"](), True, MEAN, STD, joint=True, cuda_graph=args.cuda_graph)
        print(f"RDI-Net-50 joint, batch {batch}, {torch.cuda.get_device_name()}"
              + (", the step as one CUDA graph" if args.cuda_graph else ", eager"))
        timer = Timer(device, warmup=2 if args.tiny else 10, iters=2 if args.tiny else 10, repeats=3)
        speeds = {}
        for name, source in feeds.items():
            feed["next"] = source
            report(name, stream_intervals(step, args.steps), args.steps)
            speeds[name] = batch / timer(step)
        print("img/s: " + ", ".join(f"{name} {v:.0f} ({v / speeds['synthetic']:.3f})"
                                    for name, v in speeds.items()))


if __name__ == "__main__":
    main()
