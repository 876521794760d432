"""Calibration statistics: what `calibrate` learned about each tensor, and the JSON
sidecar that keeps it so calibration need not be repeated.

    stats = model.annotations["calibration"]        # a CalibrationStats
    lo, hi = stats.range("/2/Relu_output_0")         # the range of stats.method
    lo, hi = stats.range("/2/Relu_output_0", "entropy", bits=4)   # any other method
    stats.save("model.calib.json");  CalibrationStats.load("model.calib.json", model)

Every method's range is computed from the stored summary (exact min/max, moving
averages, histogram), so switching methods needs no new run. The file records a
fingerprint of the model's tensor names and the settings that shaped the statistics;
`load(path, model)` refuses a file made for another model.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Dict, Optional, Tuple

from qcompile._fileio import atomic_write
from qcompile.errors import QCompileError
from qcompile.ir import Model

from .observers import Histogram, TensorObserver, entropy_range, mse_range, percentile_range

__all__ = ["METHODS", "CalibrationStats", "TensorStats", "model_fingerprint"]

METHODS = ("minmax", "moving-average", "percentile", "entropy", "mse")
FORMAT = "qcompile-calibration"
VERSION = 1
Range = Tuple[float, float]


@dataclasses.dataclass
class TensorStats:
    """One tensor's summary. `count` finite values were observed; `nonfinite` values
    (NaN, +-inf, attention-mask fills) were excluded. min/max are None when no finite
    value was seen."""

    count: int = 0
    nonfinite: int = 0
    min: Optional[float] = None
    max: Optional[float] = None
    ma_min: Optional[float] = None
    ma_max: Optional[float] = None
    hist: Optional[Histogram] = None

    @classmethod
    def from_observer(cls, obs: TensorObserver) -> "TensorStats":
        h, m = obs.hist, obs.moving
        return cls(obs.count, obs.nonfinite, h.min, h.max, m.min, m.max, h.hist)

    def range(self, method: str, percentile: float = 99.99, bits: int = 8) -> Optional[Range]:
        """The range `method` chooses, or None when no finite value was seen."""
        if self.min is None:
            return None
        if method == "minmax":
            return (self.min, self.max)
        if method == "moving-average":
            return (self.ma_min, self.ma_max)
        if self.hist is None:
            return (self.min, self.max)
        if method == "percentile":
            return percentile_range(self.hist, percentile, (self.min, self.max))
        if method == "entropy":
            return entropy_range(self.hist, bits)
        if method == "mse":
            return mse_range(self.hist, bits)
        raise ValueError(f"unknown calibration method {method!r} (methods: {', '.join(METHODS)})")

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hist"] = None if self.hist is None else self.hist.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TensorStats":
        d = dict(d)
        hist = d.pop("hist", None)
        return cls(**d, hist=None if hist is None else Histogram.from_dict(hist))


def model_fingerprint(model: Model) -> str:
    """A hash of the main graph's input names and node output names: equal for the same
    graph, different once tensors are renamed, added or removed."""
    names = [v.name for v in model.graph.inputs] + ["|"] + sorted(v.name for n in model.graph for v in n.outputs)
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


@dataclasses.dataclass
class CalibrationStats:
    """Per-tensor statistics and how they were made. `method`, `percentile` and `bits`
    choose what `range(name)` returns; `settings` holds what shaped the data itself
    (source, samples, batch size, bins, momentum) and decides whether a saved file can
    be reused."""

    tensors: Dict[str, TensorStats]
    method: str = "minmax"
    percentile: float = 99.99
    bits: int = 8
    fingerprint: str = ""
    num_samples: int = 0
    settings: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def range(self, name: str, method: Optional[str] = None, **params: Any) -> Optional[Range]:
        """The range of tensor `name` by `method` (default: self.method); KeyError
        naming the tensor when it was not calibrated."""
        if name not in self.tensors:
            raise KeyError(f"tensor {name!r} was not calibrated (float tensors only)")
        params.setdefault("percentile", self.percentile)
        params.setdefault("bits", self.bits)
        return self.tensors[name].range(method or self.method, **params)

    def ranges(self, method: Optional[str] = None) -> Dict[str, Optional[Range]]:
        """{tensor name: range} for every calibrated tensor."""
        return {name: self.range(name, method) for name in self.tensors}

    def nonfinite(self) -> Dict[str, int]:
        """{tensor name: excluded value count} for tensors that had non-finite values."""
        return {name: t.nonfinite for name, t in self.tensors.items() if t.nonfinite}

    # -- JSON ------------------------------------------------------------------------
    def to_json(self) -> str:
        doc = {
            "format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint,
            "method": self.method, "percentile": self.percentile, "bits": self.bits,
            "num_samples": self.num_samples, "settings": self.settings,
            "tensors": {name: t.to_dict() for name, t in self.tensors.items()},
        }
        return json.dumps(doc, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, text: str, where: str = "calibration statistics") -> "CalibrationStats":
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise QCompileError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise QCompileError(f"{where}: not a qcompile calibration file (no \"format\": \"{FORMAT}\")")
        if doc.get("version") != VERSION:
            raise QCompileError(f"{where}: calibration file version {doc.get('version')!r}, "
                                f"this qcompile reads version {VERSION}; calibrate again")
        try:
            tensors = {name: TensorStats.from_dict(t) for name, t in doc["tensors"].items()}
            return cls(tensors, doc["method"], float(doc["percentile"]), int(doc["bits"]),
                       doc["fingerprint"], int(doc["num_samples"]), dict(doc.get("settings", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise QCompileError(f"{where}: malformed calibration file ({type(e).__name__}: {e}); calibrate again") from None

    def save(self, path: str) -> None:
        """Write the JSON sidecar atomically."""
        atomic_write(path, self.to_json(), mode="w")

    @classmethod
    def load(cls, path: str, model: Optional[Model] = None) -> "CalibrationStats":
        """Read a sidecar; with `model`, QCompileError unless it was made for that model."""
        try:
            with open(path) as f:
                text = f.read()
        except OSError as e:
            raise QCompileError(f"{path}: cannot read calibration statistics ({e.strerror})") from None
        stats = cls.from_json(text, path)
        if model is not None and not stats.matches(model):
            raise QCompileError(f"{path}: calibration statistics were made for another model "
                                "(its tensor names differ); calibrate again or delete the file")
        return stats

    def matches(self, model: Model) -> bool:
        """True when the statistics were made for a graph with `model`'s tensor names."""
        return self.fingerprint == model_fingerprint(model)
