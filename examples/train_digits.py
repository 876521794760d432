"""Train the small CNN of the examples on scikit-learn's bundled digits and export it.

Usage:
    python examples/train_digits.py [--out DIR] [--epochs 40] [--seed 0]

Writes to DIR (default: this folder):
  digits_cnn.onnx    the float model, opset 17: input "input" [N,1,8,8] (dynamic batch
                     "N"), output "logits" [N,10]; BatchNormalization nodes are kept
                     (not folded into the convolutions) so `canonicalize` has work to do.
  digits_calib.npz   200 training images for calibration.
  digits_eval.npz    300 held-out images and their labels for evaluation.

The .npz convention, shared by calibration and evaluation: one key per model input,
holding N samples stacked along one extra leading axis (here "input": (N, 1, 1, 8, 8)
float32, i.e. N samples of the input shape [1, 1, 8, 8]); evaluation files add "label":
(N,) int64. Needs torch and scikit-learn (`pip install 'qcompile[torch,examples]'`).
The split, initialisation and training are seeded, so reruns give the same files up to
floating-point nondeterminism of the platform.
"""
from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
EVAL_SIZE = 300
CALIB_SIZE = 200


def make_model() -> nn.Module:
    """Conv-BN-ReLU x2, 2x2 max pool, linear classifier: about 3.7k parameters."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


def split(seed: int):
    """Images scaled to [0, 1] as (N, 1, 8, 8) float32, labels int64, split into
    train / calib (a subset of train) / eval (disjoint from train)."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    labels = digits.target.astype(np.int64)
    order = np.random.RandomState(seed).permutation(len(labels))
    eval_idx, train_idx = order[:EVAL_SIZE], order[EVAL_SIZE:]
    calib_idx = train_idx[:CALIB_SIZE]
    return (images[train_idx], labels[train_idx]), images[calib_idx], (images[eval_idx], labels[eval_idx])


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> None:
    """Adam with cross-entropy in minibatches of 64, learning rate decayed by cosine."""
    generator = torch.Generator().manual_seed(seed)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(ys), generator=generator).split(64):
            optimizer.zero_grad()
            loss_fn(model(xs[batch]), ys[batch]).backward()
            optimizer.step()
        schedule.step()
    model.eval()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def export(model: nn.Module, path: str) -> None:
    """TorchScript exporter, opset 17. TrainingMode.PRESERVE on an eval-mode model
    writes BatchNormalization in inference form and skips the exporter's Conv+BN fusion
    (which only runs for TrainingMode.EVAL), while other constants still fold."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, 1, 8, 8),),
            path,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
            training=torch.onnx.TrainingMode.PRESERVE,
            dynamo=False,
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=HERE, help="output folder (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    (x_train, y_train), x_calib, (x_eval, y_eval) = split(args.seed)
    model = make_model()
    start = time.perf_counter()
    train(model, x_train, y_train, args.epochs, args.seed)
    elapsed = time.perf_counter() - start

    os.makedirs(args.out, exist_ok=True)
    onnx_path = os.path.join(args.out, "digits_cnn.onnx")
    export(model, onnx_path)
    np.savez_compressed(os.path.join(args.out, "digits_calib.npz"), input=x_calib[:, None])
    np.savez_compressed(os.path.join(args.out, "digits_eval.npz"), input=x_eval[:, None], label=y_eval)
    print(f"trained {args.epochs} epochs on {len(y_train)} images in {elapsed:.1f} s")
    print(f"train accuracy {accuracy(model, x_train, y_train):.4f}, eval accuracy {accuracy(model, x_eval, y_eval):.4f} "
          f"({len(y_eval)} held-out images)")
    print(f"wrote {onnx_path}, digits_calib.npz ({len(x_calib)} samples), digits_eval.npz ({len(y_eval)} samples)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
