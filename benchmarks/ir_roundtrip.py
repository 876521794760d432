"""Cost of the IR round trip against plain onnx, on onnx's light test models.

For each model: qcompile.load + qcompile.check (the verifier) + qcompile.save, against
onnx.load + onnx.save of the same file, each the median of --runs runs, and their ratio.
When onnx-ir (onnxscript's IR) is installed, its load + save is shown beside, for scale.
Run: python benchmarks/ir_roundtrip.py [--runs N]
"""
from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, List

import onnx

import qcompile

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


def median_seconds(fn: Callable[[], None], runs: int) -> float:
    """Median wall time of `runs` calls of `fn`, after one warm-up call."""
    fn()
    times: List[float] = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="timed runs per model (median reported)")
    args = parser.parse_args(argv)
    paths = sorted(glob.glob(os.path.join(LIGHT, "*.onnx")))
    try:
        import onnx_ir
    except ImportError:
        onnx_ir = None
    print(f"{'model':<22}{'nodes':>7}{'KiB':>7}{'qcompile ms':>13}{'onnx ms':>10}{'ratio':>8}"
          + (f"{'onnx-ir ms':>12}{'ratio':>8}" if onnx_ir else ""))
    ratios, peer_ratios = [], []
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.onnx")

        for path in paths:
            def ours(path=path) -> None:
                model = qcompile.load(path)
                qcompile.check(model)
                qcompile.save(model, out)

            def theirs(path=path) -> None:
                onnx.save(onnx.load(path), out)

            def peer(path=path) -> None:
                onnx_ir.save(onnx_ir.load(path), out)

            t_ours = median_seconds(ours, args.runs)
            t_theirs = median_seconds(theirs, args.runs)
            ratios.append(t_ours / t_theirs)
            name = os.path.splitext(os.path.basename(path))[0].replace("light_", "")
            nodes = len(onnx.load(path).graph.node)
            line = (f"{name:<22}{nodes:>7}{os.path.getsize(path) / 1024:>7.0f}{t_ours * 1e3:>13.2f}"
                    f"{t_theirs * 1e3:>10.2f}{ratios[-1]:>8.1f}")
            if onnx_ir:
                t_peer = median_seconds(peer, args.runs)
                peer_ratios.append(t_peer / t_theirs)
                line += f"{t_peer * 1e3:>12.2f}{peer_ratios[-1]:>8.1f}"
            print(line)
    line = f"{'geometric mean':<59}{statistics.geometric_mean(ratios):>8.1f}"
    if peer_ratios:
        line += f"{statistics.geometric_mean(peer_ratios):>20.1f}"
    print(line)
    print("ratio: time over onnx.load + onnx.save (lower is better); one process, one thread")
    return 0


if __name__ == "__main__":
    sys.exit(main())
