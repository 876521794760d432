"""Peak memory and time of `calibrate` on a ResNet-50-sized model.

    python benchmarks/calibration_memory.py [--samples 1000] [--size 224] [--method mse]

Builds a ResNet-50 (bottleneck blocks 3-4-6-3, 25.6 M parameters, written here in torch
so torchvision is not needed), exports it with qcompile.from_torch, writes random
calibration samples to a temporary .npz, then, in a fresh process, loads the model and
calibrates. Prints the resident set after loading (the baseline), the peak during
calibration (VmHWM of this process: ru_maxrss would include the memory of the parent
that forked it), the peak minus the baseline, and the wall time. The claim:
the peak beyond the model stays at a few hundred MB, whatever the number of samples.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    """This process's peak resident set (VmHWM), which exec resets, unlike ru_maxrss."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def build(path: str, data: str, samples: int, size: int) -> None:
    import numpy as np
    import torch
    from torch import nn

    import qcompile
    from qcompile.data import save_samples

    class Bottleneck(nn.Module):
        def __init__(self, cin, mid, stride):
            super().__init__()
            cout = mid * 4
            self.body = nn.Sequential(
                nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            return torch.relu(self.body(x) + (x if self.down is None else self.down(x)))

    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for mid, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(Bottleneck(cin, mid, stride if i == 0 else 1))
            cin = mid * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 1000)]
    torch.manual_seed(0)
    net = nn.Sequential(*layers).eval()
    model = qcompile.from_torch(net, torch.randn(1, 3, size, size), input_names=["image"],
                                dynamic_axes={"image": {0: "N"}})
    qcompile.save(model, path)
    rng = np.random.default_rng(0)
    save_samples(data, {"image": rng.standard_normal((samples, 1, 3, size, size), dtype=np.float32)})


def calibrate(path: str, data: str, method: str, batch: int, memory_mb: int) -> None:
    import warnings

    import qcompile
    import qcompile.passes.calibrate as cal

    model = qcompile.load(path)
    params = sum(v.const_value.size for v in model.graph.initializers.values() if v.const_value is not None)
    base = _rss_mb()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = cal.Calibrate(data=data, method=method, batch_size=batch, memory_mb=memory_mb, threads=2)
        p(model)
    wall = time.perf_counter() - start
    peak = _peak_mb()
    stats = model.annotations["calibration"]
    print(f"model: {len(model.graph)} nodes, {params / 1e6:.1f} M parameters, {len(stats.tensors)} tensors calibrated")
    print(f"samples: {stats.num_samples}, method {method}, batches {p.stats['batches']}, "
          f"onnxruntime runs {p.stats['onnxruntime runs']}")
    print(f"RSS after loading the model: {base:.0f} MB; peak during calibration: {peak:.0f} MB; "
          f"peak beyond the loaded model: {peak - base:.0f} MB")
    print(f"wall time: {wall:.1f} s ({1000 * wall / stats.num_samples:.0f} ms per sample)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--size", type=int, default=224, help="input height and width")
    ap.add_argument("--method", default="mse")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--memory-mb", type=int, default=256)
    ap.add_argument("--_run", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._run:
        calibrate(*args._run, args.method, args.batch, args.memory_mb)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path, data = os.path.join(tmp, "resnet50.onnx"), os.path.join(tmp, "calib.npz")
        build(path, data, args.samples, args.size)
        cmd = [sys.executable, __file__, "--_run", path, data, "--method", args.method,
               "--batch", str(args.batch), "--memory-mb", str(args.memory_mb)]
        subprocess.run(cmd, check=True)  # a fresh process: the build's memory does not count


if __name__ == "__main__":
    main()
