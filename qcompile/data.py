"""Sample data for running a model: calibration sets, simulation inputs.

    samples = load_samples("calib.npz", model)      # or a folder of .npz, or feeds
    for feed in samples.batches(16):                # {input name: batched array}
        session.run(None, feed)

A source is one of:
  1. an `.npz` file whose keys are the model's input names, each array holding N
     samples along one extra leading axis (N x the input's shape). When the input's
     first dimension is symbolic, an array of the input's own rank is also accepted and
     read as N samples of batch 1;
  2. a folder of such files, read in name order, one file at a time;
  3. a Python iterable of feed dicts {input name: array of the input's shape}.

Names, per-sample shapes and dtypes are checked against the model's inputs before any
data is read (files: from the .npy headers; iterables: as each feed arrives), and NaN
is checked batch by batch; every mistake is a one-line QCompileError naming the file
(or feed), the input and what was expected. Data is read lazily, sample by sample from
the zip member, so memory holds one batch, never the whole set.
"""
from __future__ import annotations

import logging
import os
import zipfile
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._fileio import atomic_path
from .errors import QCompileError
from .ir.model import Model
from .ir.types import TensorType

__all__ = ["InputSpec", "SampleSet", "Batch", "load_samples", "save_samples"]

logger = logging.getLogger(__name__)

Feed = Dict[str, np.ndarray]
Source = Union[str, "os.PathLike[str]", Iterable[Feed]]


class InputSpec:
    """What a model input accepts: name, numpy dtype, declared shape (ints for fixed
    dims, str/None for symbolic ones; None when even the rank is unknown)."""

    def __init__(self, name: str, dtype: np.dtype, shape: Optional[Tuple[Any, ...]], required: bool = True):
        self.name, self.dtype, self.shape, self.required = name, np.dtype(dtype), shape, required

    @property
    def batchable(self) -> bool:
        """True when samples can be concatenated along axis 0 (a symbolic first dim)."""
        return self.shape is not None and len(self.shape) > 0 and not isinstance(self.shape[0], int)

    def shape_text(self) -> str:
        if self.shape is None:
            return "[?]"
        return "[" + ",".join("?" if d is None else str(d) for d in self.shape) + "]"

    def matches(self, shape: Tuple[int, ...]) -> bool:
        if self.shape is None:
            return True
        return len(shape) == len(self.shape) and all(
            not isinstance(d, int) or d == s for d, s in zip(self.shape, shape))

    def __str__(self) -> str:
        return f"{self.name} {self.dtype}{self.shape_text()}"


def model_inputs(model: Model) -> List[InputSpec]:
    """The InputSpecs of the model's graph inputs (inputs with an initializer are optional)."""
    specs = []
    for v in model.graph.inputs:
        if not isinstance(v.type, TensorType):
            raise QCompileError(f"model input {v.name!r} is not a tensor ({v.type}); sample data cannot feed it")
        specs.append(InputSpec(v.name, v.type.dtype.numpy_dtype, v.type.shape, required=not v.is_initializer))
    return specs


class Batch(dict):
    """A feed {input name: batched array}; `samples` says how many samples it holds."""

    samples: int = 0


class SampleSet:
    """Validated samples from one source, read lazily. `len()` works except for a
    one-shot iterator (its length is unknown until consumed); `notes` lists the
    conversions made (float64 -> float32 and the like)."""

    def __init__(self, inputs: List[InputSpec], readers: List["_Reader"], label: str, count: Optional[int]):
        self.inputs = inputs
        self.label = label
        self.notes: List[str] = []
        self._readers = readers
        self._count = count
        self._consumed = False

    @property
    def count(self) -> Optional[int]:
        """Number of samples, or None when the source is a one-shot iterator."""
        return self._count

    def __len__(self) -> int:
        if self._count is None:
            raise TypeError(f"the number of samples of {self.label} is unknown until it is read")
        return self._count

    @property
    def batchable(self) -> bool:
        """True when every input has a symbolic first dim, so samples concatenate."""
        return bool(self.inputs) and all(s.batchable for s in self.inputs)

    def samples(self, limit: Optional[int] = None) -> Iterator[Tuple[str, int, Feed]]:
        """(where, index, feed) for each sample in order, at most `limit` (None: all)."""
        if self._consumed and self._count is None:
            raise QCompileError(f"{self.label} is a one-shot iterator and was already read; pass a list to read it twice")
        self._consumed = True
        n = 0
        for reader in self._readers:
            for where, index, feed in reader.read(self):
                if limit is not None and n >= limit:
                    return
                yield where, index, feed
                n += 1

    def batches(self, batch_size: Union[int, Callable[[], int]] = 1, limit: Optional[int] = None) -> Iterator[Batch]:
        """Batches of up to `batch_size` samples concatenated along axis 0 when the model's
        first dims are symbolic (consecutive samples of equal shape only), else one sample
        per batch. `batch_size` may be a function, asked before each batch (adaptive
        batching). NaN in a batch is a QCompileError naming file, input and sample."""
        size = batch_size if callable(batch_size) else (lambda: batch_size)
        pending: List[Tuple[str, int, Feed]] = []
        for item in self.samples(limit):
            if pending and (not self.batchable or len(pending) >= max(1, size()) or not _same_shapes(pending[0][2], item[2])):
                yield self._collate(pending)
                pending = []
            pending.append(item)
        if pending:
            yield self._collate(pending)

    def _collate(self, items: List[Tuple[str, int, Feed]]) -> Batch:
        batch = Batch()
        for spec in self.inputs:
            if spec.name not in items[0][2]:
                continue
            arrays = [feed[spec.name] for _, _, feed in items]
            data = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
            if data.dtype.kind in "fc" and np.isnan(data).any():
                for where, index, feed in items:
                    if np.isnan(feed[spec.name]).any():
                        raise QCompileError(f"{where}: input {spec.name!r} sample {index} contains NaN; "
                                            "calibration data must be NaN-free")
            batch[spec.name] = np.ascontiguousarray(data)
        batch.samples = len(items)
        return batch


def _same_shapes(a: Feed, b: Feed) -> bool:
    return all(a[k].shape[1:] == b[k].shape[1:] for k in a)


# -- readers -------------------------------------------------------------------------

class _Reader:
    def read(self, owner: SampleSet) -> Iterator[Tuple[str, int, Feed]]:
        raise NotImplementedError


class _NpzReader(_Reader):
    """One .npz file: headers checked at construction, samples streamed from the zip
    members (stored or deflated) one at a time."""

    def __init__(self, path: str, specs: List[InputSpec], notes: List[str]):
        self.path = path
        self.members: Dict[str, Tuple[str, Tuple[int, ...], np.dtype, bool, bool]] = {}
        try:
            with zipfile.ZipFile(path) as zf:
                headers = {}
                for info in zf.infolist():
                    if not info.filename.endswith(".npy"):
                        continue
                    with zf.open(info) as f:
                        headers[info.filename[:-4]] = (info.filename, *_read_header(f))
        except (OSError, zipfile.BadZipFile, ValueError) as e:
            raise QCompileError(f"{path}: not a readable .npz file ({e})") from None
        _check_names(path, specs, headers)
        counts = {}
        for spec in specs:
            if spec.name not in headers:
                continue
            member, shape, dtype, fortran = headers[spec.name]
            unbatched = False
            if spec.shape is not None and len(shape) == len(spec.shape) and spec.batchable:
                unbatched = True  # N samples of batch 1
                sample_shape = (1,) + tuple(shape[1:])
            elif len(shape) >= 1:
                sample_shape = tuple(shape[1:])
            else:
                sample_shape = None
            if sample_shape is None or not spec.matches(sample_shape):
                got = "a scalar" if sample_shape is None else f"{list(sample_shape)}"
                raise QCompileError(
                    f"{path}: input {spec.name!r} expects samples of shape {spec.shape_text()} "
                    f"(arrays of shape [N]+{spec.shape_text()}), got samples of shape {got} (array shape {list(shape)})")
            _check_dtype(path, spec, dtype, notes)
            counts[spec.name] = shape[0]
            self.members[spec.name] = (member, sample_shape, dtype, fortran, unbatched)
        if len(set(counts.values())) > 1:
            listing = ", ".join(f"{k} {n}" for k, n in counts.items())
            raise QCompileError(f"{path}: arrays hold different numbers of samples ({listing})")
        self.count = next(iter(counts.values()), 0)

    def read(self, owner: SampleSet) -> Iterator[Tuple[str, int, Feed]]:
        specs = {s.name: s for s in owner.inputs}
        with zipfile.ZipFile(self.path) as zf:
            streams = {}
            try:
                for name, (member, shape, dtype, fortran, _) in self.members.items():
                    if fortran:  # samples are not contiguous: load the array once
                        streams[name] = _Loaded(np.load(self.path)[name])
                        continue
                    streams[name] = zf.open(member)
                    _read_header(streams[name])
                for i in range(self.count):
                    feed = {}
                    for name, (member, shape, dtype, _, _) in self.members.items():
                        a = streams[name].take(shape, dtype) if isinstance(streams[name], _Loaded) \
                            else _read_sample(streams[name], shape, dtype)
                        feed[name] = a.astype(specs[name].dtype, copy=False)
                    yield self.path, i, feed
            finally:
                for f in streams.values():
                    f.close()


class _Loaded:
    """A whole array in memory (fortran-ordered members), read like a stream."""

    def __init__(self, array: np.ndarray):
        self.array, self.i = array, 0

    def take(self, shape, dtype) -> np.ndarray:
        a = np.asarray(self.array[self.i]).reshape(shape)
        self.i += 1
        return a

    def close(self) -> None:
        self.array = None


def _read_header(f) -> Tuple[Tuple[int, ...], np.dtype, bool]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if dtype.hasobject:
        raise ValueError("object arrays are not supported")
    return tuple(shape), dtype, fortran


def _read_sample(f, shape: Tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = f.read(nbytes)
    if len(buf) != nbytes:
        raise QCompileError(f"{getattr(f, 'name', 'npz member')}: truncated array data")
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


class _FeedReader(_Reader):
    """An iterable of feed dicts, each checked as it arrives."""

    def __init__(self, feeds: Iterable[Feed]):
        self.feeds = feeds

    def read(self, owner: SampleSet) -> Iterator[Tuple[str, int, Feed]]:
        for i, feed in enumerate(self.feeds):
            where = f"calibration feed {i}"
            if not isinstance(feed, dict):
                raise QCompileError(f"{where}: expected a dict {{input name: array}}, got {type(feed).__name__}")
            _check_names(where, owner.inputs, feed)
            out = {}
            for spec in owner.inputs:
                if spec.name not in feed:
                    continue
                a = np.asarray(feed[spec.name])
                if not spec.matches(a.shape):
                    raise QCompileError(f"{where}: input {spec.name!r} expects shape {spec.shape_text()}, got {list(a.shape)}")
                _check_dtype(where, spec, a.dtype, owner.notes if i == 0 else [])
                out[spec.name] = a.astype(spec.dtype, copy=False)
            yield where, i, out


# -- checks --------------------------------------------------------------------------

def _check_names(where: str, specs: List[InputSpec], names: Iterable[str]) -> None:
    names = list(names)
    listing = ", ".join(str(s) for s in specs)
    known = {s.name for s in specs}
    for s in specs:
        if s.required and s.name not in names:
            raise QCompileError(f"{where}: no data for model input {s.name!r} (model inputs: {listing}; "
                                f"found: {', '.join(names) or 'nothing'})")
    for n in names:
        if n not in known:
            raise QCompileError(f"{where}: {n!r} is not a model input (model inputs: {listing})")


def _check_dtype(where: str, spec: InputSpec, dtype: np.dtype, notes: List[str]) -> None:
    """Same dtype: fine. Another float for a float input, or a safely castable integer
    for an integer input: converted, with a note. Anything else: an error."""
    want = spec.dtype
    if dtype == want:
        return
    ok = (want.kind == "f" and dtype.kind == "f") or (want.kind in "iu" and np.can_cast(dtype, want, "safe"))
    if not ok:
        raise QCompileError(f"{where}: input {spec.name!r} is {want} but the data is {dtype}; "
                            f"convert it (array.astype(np.{want}))")
    note = f"{where}: input {spec.name!r}: {dtype} data converted to {want}"
    logger.info(note)
    notes.append(note)


# -- entry points --------------------------------------------------------------------

def load_samples(source: Source, model: Model) -> SampleSet:
    """A SampleSet over `source` (.npz path, folder of .npz files, or iterable of feed
    dicts) checked against `model`'s inputs. Raises QCompileError on a mismatch."""
    specs = model_inputs(model)
    notes: List[str] = []
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".npz"))
            if not files:
                raise QCompileError(f"{path}: folder holds no .npz files")
            readers: List[_Reader] = [_NpzReader(f, specs, notes) for f in files]
        elif os.path.isfile(path):
            readers = [_NpzReader(path, specs, notes)]
        else:
            raise QCompileError(f"{path}: no such file or folder")
        count: Optional[int] = sum(r.count for r in readers)  # type: ignore[attr-defined]
        label = path
    elif isinstance(source, dict):
        raise QCompileError("sample data: a single dict is one feed; pass a list of feeds, or an .npz path")
    elif isinstance(source, Iterable):
        readers = [_FeedReader(source)]
        count = len(source) if isinstance(source, Sequence) else None
        label = "calibration feeds"
    else:
        raise QCompileError(f"sample data must be an .npz path, a folder or an iterable of feeds, not {type(source).__name__}")
    samples = SampleSet(specs, readers, label, count)
    samples.notes.extend(dict.fromkeys(notes))
    return samples


def save_samples(path: str, feeds: Union[Dict[str, np.ndarray], Iterable[Feed]]) -> None:
    """Write samples as an uncompressed .npz, atomically. `feeds` is {name: array with
    N samples along axis 0} or an iterable of per-sample feed dicts (stacked here)."""
    if isinstance(feeds, dict):
        arrays = {k: np.asarray(v) for k, v in feeds.items()}
    else:
        collected: Dict[str, List[np.ndarray]] = {}
        for i, feed in enumerate(feeds):
            if i and set(feed) != set(collected):
                raise QCompileError(f"save_samples: feed {i} has inputs {sorted(feed)}, feed 0 has {sorted(collected)}")
            for k, v in feed.items():
                collected.setdefault(k, []).append(np.asarray(v))
        arrays = {k: np.stack(v) for k, v in collected.items()}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
