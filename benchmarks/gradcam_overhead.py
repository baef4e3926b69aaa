"""What CAMAL costs in train_dl_camal.py, in one run.

    python benchmarks/gradcam_overhead.py                    # CPU: batch 8, all six models
    python benchmarks/gradcam_overhead.py --cuda --batch-size 32

(1) Training-step time with CAMAL over the time without (CE only, no CAM), for each model at the same batch:
    the paper's Table 6 reports 0.2 % to 72.6 % overhead; the target here is 10 % or less.
(2) Grad-CAM extraction: one batch-level backward of the summed ground-truth logits (Eq. 4) against one backward
    per sample, at B = 1, 2, 4, 8, 16, 32 (the paper's Figure 2), from the forward's end to the gradient at the
    CAM layer. The CAM arithmetic after it (weights, ReLU, scaling, upsampling) is the same for both and is shown
    apart. Target: flat in B, and at least 0.8 x B times faster than per-sample at B = 32.
Each figure is the median of --repeats timed calls after a warm-up; in (1) the two steps alternate, so drift hits
both alike. Read ratios: machines are shared and noisy.
"""

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("train_dl_camal", ROOT / "train_dl_camal.py")
dl = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dl)


def timed(fns, repeats, device):
    """Median time of each function, calling them in turn `repeats` times after one warm-up each."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def batch(n, device, classes=10):
    gen = torch.Generator().manual_seed(n)
    images = torch.randint(0, 256, (n, 3, 224, 224), dtype=torch.uint8, generator=gen).to(device)
    masks = torch.zeros(n, 224, 224, dtype=torch.bool)
    masks[:, 56:168, 56:168] = True
    return images, masks.to(device), torch.randint(0, classes, (n,), generator=gen).to(device)


def training_step(name, batch_size, device, autocast, capturable=False):
    """One model, its AdamW and a fixed batch; returns step(camal). step(True) is train_dl_camal.py's own train_step
    with --method camal; step(False) is CE alone (no CAM at all), the baseline of Table 6."""
    torch.manual_seed(0)
    model = dl.CamModel(name, 10).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, capturable=capturable)
    images, masks, labels = batch(batch_size, device)

    def step(camal):
        if camal:
            dl.train_step(model, opt, (images, masks, labels), dl.METHODS["camal"]["term"], 1.0, autocast)
            return
        opt.zero_grad(set_to_none=True)
        with autocast:
            logits, _ = model(dl.normalise(images))
        F.cross_entropy(logits.float(), labels).backward()
        opt.step()

    return step


def step_overhead(name, opts, device, autocast):
    step = training_step(name, opts.batch_size, device, autocast)
    return timed([lambda: step(False), lambda: step(True)], opts.repeats, device)


def step_profile(name, batch_size, device, autocast, steps=3):
    """Where CAMAL's extra step time goes, from torch.profiler: per step, the wall time, the summed time of the
    kernels (on CUDA; of the operators' own CPU time on a CPU), how many there are, and the operators that add most.
    Wall time rising by more than the kernel time means the GPU waits on the host (launches, Python)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    step = training_step(name, batch_size, device, autocast)
    out = {}
    for camal in (False, True):
        for _ in range(2):
            step(camal)  # warm-up: cuDNN's choices and the allocator settle
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            for _ in range(steps):
                step(camal)
            if cuda:
                torch.cuda.synchronize()
            wall = (time.perf_counter() - t) / steps
        rows = {}
        for e in prof.key_averages():
            if cuda and e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = e.self_device_time_total if cuda else e.self_cpu_time_total
            rows[e.key] = (us / steps / 1e3, e.count / steps)  # ms and calls per step
        out["camal" if camal else "ce"] = {"wall_ms": 1e3 * wall, "rows": rows}
    ce, cm = out["ce"]["rows"], out["camal"]["rows"]
    extra = {k: cm[k][0] - ce.get(k, (0.0, 0))[0] for k in cm}
    return {
        "model": name,
        "ce_wall_ms": out["ce"]["wall_ms"],
        "camal_wall_ms": out["camal"]["wall_ms"],
        "ce_kernel_ms": sum(v[0] for v in ce.values()),
        "camal_kernel_ms": sum(v[0] for v in cm.values()),
        "ce_kernels": sum(v[1] for v in ce.values()),
        "camal_kernels": sum(v[1] for v in cm.values()),
        "top_extra_ms": sorted(([k[:90], round(v, 3)] for k, v in extra.items()), key=lambda kv: -kv[1])[:8],
    }


def graphed_overhead(name, batch_size, repeats, device, autocast):
    """CE and CAMAL steps each captured once as a CUDA graph and replayed (CUDA only): the same kernels with no
    Python and no per-kernel launch cost. Returns the median seconds of (CE, CAMAL).

    normalise() makes its mean and std with torch.tensor(list, device=...), a copy from host memory that a graph
    cannot capture; here they are made once, before the capture (same numbers)."""
    made, original = {}, dl.normalise

    def normalise(images, dtype=torch.float32):
        if (images.device, dtype) not in made:
            made[images.device, dtype] = [
                torch.tensor(v, device=images.device, dtype=dtype).view(1, 3, 1, 1) for v in (dl.MEAN, dl.STD)
            ]
        mean, std = made[images.device, dtype]
        return (images.to(dtype) / 255.0 - mean) / std

    # a graph keeps its own memory pool, not the model, optimizer and batch it reads: keep the steps alive with it
    steps, replays = [], []
    dl.normalise = normalise
    try:
        for camal in (False, True):
            step = training_step(name, batch_size, device, autocast, capturable=True)
            steps.append(step)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up on a side stream, as torch.cuda.graph's documentation asks
                for _ in range(3):
                    step(camal)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step(camal)
            replays.append(graph.replay)
        return timed(replays, repeats, device)
    finally:
        dl.normalise = original


def extraction(name, sizes, opts, device):
    torch.manual_seed(0)
    model = dl.CamModel(name, 10).to(device).eval()
    rows = []
    for n in sizes:
        images, _, labels = batch(n, device)
        logits, acts = model(dl.normalise(images))
        score = logits.gather(1, labels[:, None]).squeeze(1)

        def batch_level():  # what grad_cam does: one backward of the summed scores
            torch.autograd.grad(score, acts, grad_outputs=torch.ones_like(score), retain_graph=True)

        def per_sample():  # the textbook way: one backward from each sample's own logit
            for b in range(n):
                torch.autograd.grad(score[b], acts, retain_graph=True)

        def whole():  # grad_cam end to end: the backward plus the CAM arithmetic
            dl.grad_cam(acts, score, (224, 224), create_graph=False, to_nchw=model.to_nchw)

        fast, slow, total = timed([batch_level, per_sample, whole], opts.repeats, device)
        rows.append((n, fast, slow, max(total - fast, 0.0)))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(dl.MODELS))
    p.add_argument("--batch-size", type=int, default=8, help="batch of part (1); the paper's is 32")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="batch sizes of part (2)")
    p.add_argument("--extraction-models", nargs="+", default=["resnet18", "vit_b_16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cuda", action="store_true")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on the GPU")
    opts = p.parse_args()
    device = torch.device("cuda" if opts.cuda and torch.cuda.is_available() else "cpu")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if opts.amp and device.type == "cuda" else dl.nullcontext()

    print(f"(1) training step, batch {opts.batch_size} x 3 x 224 x 224, {device}, median of {opts.repeats}")
    print(f"{'model':<17}{'CE only (s)':>12}{'CAMAL (s)':>11}{'overhead':>10}")
    for name in opts.models:
        plain, camal = step_overhead(name, opts, device, autocast)
        print(f"{name:<17}{plain:>12.3f}{camal:>11.3f}{100 * (camal / plain - 1):>9.1f}%", flush=True)

    for name in opts.extraction_models:
        print(
            f"\n(2) Grad-CAM extraction, {name}, {device}, median of {opts.repeats}: backward passes to the CAM layer"
        )
        print(
            f"{'B':>4}{'batch-level (ms)':>18}{'per-sample (ms)':>17}{'speed-up':>10}{'0.8 x B':>9}"
            f"{'CAM arithmetic (ms)':>21}"
        )
        for n, fast, slow, arith in extraction(name, opts.sizes, opts, device):
            print(
                f"{n:>4}{1000 * fast:>18.2f}{1000 * slow:>17.2f}{slow / fast:>10.1f}{0.8 * n:>9.1f}"
                f"{1000 * arith:>21.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
