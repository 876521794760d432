"""The ONNX round-trip conformance harness: onnx's own test models through qcompile.

Every case is run in onnxruntime before and after a qcompile round trip, and the outputs
must be equal bit for bit. Cases come from three places:

1. the node test cases that `onnx.backend.test.case.node.collect_testcases(None)`
   generates, with the inputs they ship (suite "node");
2. the data-dir models under `onnx/backend/test/data/{pytorch-converted,pytorch-operator,
   simple}`: `model.onnx` plus `test_data_set_N/input_*.pb`, read the way onnx's own
   runner reads them (TensorProto, SequenceProto, OptionalProto, MapProto);
3. the light models `onnx/backend/test/data/light/*.onnx`, which ship no inputs: they
   get seeded random inputs of the declared shapes and element types (suite "light").

A case is *runnable* when onnxruntime (CPU, one thread, the same SessionOptions for every
session) builds a session for the ORIGINAL model and runs it on the case's inputs; cases
it cannot run say why and are counted apart. A runnable case *passes* when the model
imported with `from_proto`, verified and exported with `to_proto` (and, for file-based
cases, also `qcompile.load`, verify, `qcompile.save` through a temporary folder) gives
outputs of the same type, shape and bytes as the original: NaNs must sit in the same
places with the same bits; sequences, optionals and maps are compared element by element.

Beyond outputs, `check_structure` asks every case, runnable or not, for the same
ModelProto back (`structure_difference`: equal once fields explicitly set to their
default value count as unset).

Run `python tests/roundtrip_cases.py [-k SUBSTRING] [--suite NAME] [--not-runnable]` for
the counts per suite and the failures; tests/test_roundtrip_conformance.py runs the same
cases in pytest.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import dataclasses
import functools
import glob
import os
import re
import sys
import tempfile
import time
import warnings
import zlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

import qcompile
from qcompile.onnx_io import from_proto, to_proto

__all__ = [
    "Case", "Result", "SUITES", "all_cases", "check_structure", "compare_outputs", "light_cases", "data_dir_cases",
    "node_cases", "random_inputs", "reason_kind", "run_case", "run_model", "session_options", "structure_difference",
    "main",
]

DATA_DIR = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")
DATA_SUITES = ("pytorch-converted", "pytorch-operator", "simple")
SUITES = ("node",) + DATA_SUITES + ("light",)

Inputs = Dict[str, Any]  # graph input name -> value


@dataclasses.dataclass
class Case:
    """One model with its input sets. `path` is the model file for file-based suites
    (they are also round-tripped through qcompile.load/save); `load` gives the proto and
    the input sets when first needed, so listing the cases stays cheap."""

    suite: str
    name: str
    load: Callable[[], Tuple[onnx.ModelProto, List[Inputs]]]
    path: Optional[str] = None

    @property
    def id(self) -> str:
        return f"{self.suite}/{self.name}"


@dataclasses.dataclass
class Result:
    """status: "passed", "failed" or "not-runnable"; `reason` says why for the last two."""

    case: str
    suite: str
    status: str
    reason: str = ""
    seconds: float = 0.0

    @property
    def runnable(self) -> bool:
        return self.status != "not-runnable"


# -- cases ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _node_testcases() -> tuple:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # the generators overflow and divide by zero on purpose
        return tuple(collect_testcases(None))


def node_cases() -> List[Case]:
    """The generated node test cases (about 1,900), with their shipped inputs."""
    cases = []
    for tc in _node_testcases():
        names = _fed_input_names(tc.model)
        sets = [dict(zip(names, inputs)) for inputs, _ in tc.data_sets or []]
        cases.append(Case("node", tc.name, functools.partial(lambda m, s: (m, s), tc.model, sets)))
    return cases


def data_dir_cases(suites: Sequence[str] = DATA_SUITES) -> List[Case]:
    """The model folders of onnx's test data: model.onnx and test_data_set_N inputs."""
    cases = []
    for suite in suites:
        for folder in sorted(glob.glob(os.path.join(DATA_DIR, suite, "*", ""))):
            path = os.path.join(folder, "model.onnx")
            if os.path.exists(path):
                name = os.path.basename(os.path.dirname(folder))
                cases.append(Case(suite, name, functools.partial(_load_data_dir, path), path))
    return cases


def light_cases() -> List[Case]:
    """The light models (weights replaced by ConstantOfShape), on seeded random inputs."""
    cases = []
    for path in sorted(glob.glob(os.path.join(DATA_DIR, "light", "*.onnx"))):
        name = os.path.splitext(os.path.basename(path))[0]
        cases.append(Case("light", name, functools.partial(_load_light, path, name), path))
    return cases


def all_cases(suites: Sequence[str] = SUITES) -> List[Case]:
    cases: List[Case] = []
    if "node" in suites:
        cases += node_cases()
    cases += data_dir_cases([s for s in DATA_SUITES if s in suites])
    if "light" in suites:
        cases += light_cases()
    return cases


def _load_data_dir(path: str) -> Tuple[onnx.ModelProto, List[Inputs]]:
    model = onnx.load(path)
    sets = []
    for folder in sorted(glob.glob(os.path.join(os.path.dirname(path), "test_data_set_*"))):
        files = sorted(glob.glob(os.path.join(folder, "input_*.pb")), key=lambda f: int(f.rsplit("_", 1)[1][:-3]))
        inputs = model.graph.input
        sets.append({inputs[i].name: _read_value(f, inputs[i].type) for i, f in enumerate(files)})
    return model, sets


def _fed_input_names(model: onnx.ModelProto) -> List[str]:
    """The graph inputs that no initializer backs, which a test feeds in order."""
    inits = {t.name for t in model.graph.initializer}
    return [vi.name for vi in model.graph.input if vi.name not in inits]


def _read_value(path: str, tp: onnx.TypeProto) -> Any:
    """A serialized input as onnx's runner reads it, chosen by the input's declared type."""
    with open(path, "rb") as f:
        data = f.read()
    which = tp.WhichOneof("value")
    proto = {"sequence_type": onnx.SequenceProto, "optional_type": onnx.OptionalProto,
             "map_type": onnx.MapProto}.get(which, onnx.TensorProto)()
    proto.ParseFromString(data)
    if isinstance(proto, onnx.SequenceProto):
        return numpy_helper.to_list(proto)
    if isinstance(proto, onnx.OptionalProto):
        return numpy_helper.to_optional(proto)
    if isinstance(proto, onnx.MapProto):
        return numpy_helper.to_dict(proto)
    return numpy_helper.to_array(proto)


def _load_light(path: str, name: str) -> Tuple[onnx.ModelProto, List[Inputs]]:
    model = onnx.load(path)
    return model, [random_inputs(model, seed=zlib.crc32(name.encode()))]


def random_inputs(model: onnx.ModelProto, seed: int) -> Inputs:
    """Seeded random data for the graph inputs that no initializer backs: the declared
    shape (unknown or symbolic dims become 1) and element type; floats are standard
    normal, integers in [0, 4), booleans fair coins."""
    rng = np.random.default_rng(seed)
    names = set(_fed_input_names(model))
    values = {}
    for vi in model.graph.input:
        if vi.name not in names:
            continue
        tt = vi.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tt.shape.dim)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if dtype == np.bool_:
            values[vi.name] = rng.random(shape) < 0.5
        elif np.issubdtype(dtype, np.integer):
            values[vi.name] = rng.integers(0, 4, shape).astype(dtype)
        else:
            values[vi.name] = rng.standard_normal(shape).astype(dtype)
    return values


# -- onnxruntime -----------------------------------------------------------------------
def session_options() -> ort.SessionOptions:
    """The options of every session: CPU, one intra-op and one inter-op thread, quiet."""
    ort.set_default_logger_severity(4)  # a model onnxruntime rejects is reported, not logged
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 4
    return so


def _feed_value(value: Any, as_ort_value: bool = False) -> Any:
    """An input as onnxruntime takes it: arrays of the types numpy lacks (bfloat16,
    float8, int4, ...: ml_dtypes arrays) become OrtValues of their ONNX type, and so does
    every tensor when `as_ort_value` (run_with_ort_values takes nothing else)."""
    if isinstance(value, onnx.TensorProto):
        value = numpy_helper.to_array(value)
    if isinstance(value, list):
        return [_feed_value(v) for v in value]
    if isinstance(value, np.generic):
        value = np.asarray(value)
    if isinstance(value, np.ndarray) and (as_ort_value or value.dtype.type.__module__ == "ml_dtypes"):
        elem = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(np.ascontiguousarray(value), elem)
    return value


def _raw_output(v: ort.OrtValue) -> Any:
    """A tensor output numpy cannot hold (bfloat16): its element type, shape and bytes."""
    if not v.is_tensor():
        raise TypeError(f"cannot read a {v.data_type()} output")
    data = ctypes.string_at(v.data_ptr(), v.tensor_size_in_bytes()) if v.tensor_size_in_bytes() else b""
    return ("raw", v.data_type(), tuple(v.shape()), data)


def run_model(model: Any, inputs: Inputs) -> List[Any]:
    """Run `model` (a ModelProto, serialized bytes or a file path) on `inputs` in
    onnxruntime; the outputs in graph-output order."""
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    sess = ort.InferenceSession(model, session_options(), providers=["CPUExecutionProvider"])
    try:
        return sess.run(None, {name: _feed_value(v) for name, v in inputs.items()})
    except Exception as e:  # noqa: BLE001 - onnxruntime raises plain exceptions
        if "No corresponding Numpy type" not in str(e):
            raise
    feeds = {name: _feed_value(v, as_ort_value=True) for name, v in inputs.items()}
    return [_raw_output(v) for v in sess.run_with_ort_values(None, feeds)]


# -- comparison ------------------------------------------------------------------------
def compare_outputs(expected: Sequence[Any], actual: Sequence[Any]) -> Optional[str]:
    """None when the two output lists are equal bit for bit, else what differs first."""
    if len(expected) != len(actual):
        return f"{len(actual)} outputs instead of {len(expected)}"
    for i, (e, a) in enumerate(zip(expected, actual)):
        why = _difference(e, a)
        if why is not None:
            return f"output {i}: {why}"
    return None


def _difference(e: Any, a: Any) -> Optional[str]:
    if type(e) is not type(a):
        return f"{type(a).__name__} instead of {type(e).__name__}"
    if isinstance(e, np.ndarray):
        if e.dtype != a.dtype or e.shape != a.shape:
            return f"{a.dtype}{list(a.shape)} instead of {e.dtype}{list(e.shape)}"
        if e.dtype.kind in "OUS":  # strings: compare the elements, not object pointers
            same = e.shape == a.shape and all(x == y for x, y in zip(e.ravel().tolist(), a.ravel().tolist()))
        else:
            same = np.ascontiguousarray(e).tobytes() == np.ascontiguousarray(a).tobytes()
        if not same:
            return f"{_count_diff(e, a)} of {e.size} elements differ"
        return None
    if isinstance(e, (list, tuple)):
        if len(e) != len(a):
            return f"length {len(a)} instead of {len(e)}"
        for j, (x, y) in enumerate(zip(e, a)):
            why = _difference(x, y)
            if why is not None:
                return f"[{j}] {why}"
        return None
    if isinstance(e, dict):
        if list(e) != list(a):
            return "different keys"
        for k in e:
            why = _difference(np.asarray(e[k]), np.asarray(a[k]))
            if why is not None:
                return f"[{k!r}] {why}"
        return None
    if isinstance(e, (float, int, str, bytes, bool)) or e is None:
        return None if np.asarray(e).tobytes() == np.asarray(a).tobytes() else f"{a!r} instead of {e!r}"
    return f"cannot compare {type(e).__name__}"


def _count_diff(e: np.ndarray, a: np.ndarray) -> int:
    if e.dtype.kind in "OUS":
        return int(np.sum(e != a))
    view = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}.get(e.dtype.itemsize, np.uint8)
    return int(np.sum(np.ascontiguousarray(e).view(view) != np.ascontiguousarray(a).view(view)))


# -- structure -------------------------------------------------------------------------
def structure_difference(original: Any, exported: Any) -> Optional[str]:
    """None when two protos (models, graphs, ...) are the same once scalar fields set to
    their default value are treated as unset (onnx's protos are proto2: `domain: ""`
    written out and left out read the same), else the first differing line of their
    text forms."""
    a, b = _normalized(original), _normalized(exported)
    if a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True):
        return None
    from google.protobuf import text_format

    lines_a = text_format.MessageToString(a).splitlines()
    lines_b = text_format.MessageToString(b).splitlines()
    for i, (x, y) in enumerate(zip(lines_a, lines_b)):
        if x != y:
            return f"text line {i + 1}: {x.strip()!r} became {y.strip()!r}"
    return f"{len(lines_b)} text lines instead of {len(lines_a)}"


def _normalized(proto: Any) -> Any:
    copy = type(proto)()
    copy.CopyFrom(proto)
    _clear_defaults(copy)
    return copy


def _clear_defaults(msg) -> None:
    for field, value in msg.ListFields():
        if field.message_type is not None:
            for m in value if field.is_repeated else [value]:
                _clear_defaults(m)
        elif not field.is_repeated and value == field.default_value:
            msg.ClearField(field.name)


# -- running a case --------------------------------------------------------------------
def round_trip(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Import, verify and export in memory."""
    model = from_proto(proto)
    qcompile.check(model)
    return to_proto(model)


def file_round_trip(path: str, folder: str) -> str:
    """qcompile.load then verify then qcompile.save into `folder`; the new file's path."""
    model = qcompile.load(path)
    qcompile.check(model)
    out = os.path.join(folder, os.path.basename(path))
    qcompile.save(model, out)
    return out


def check_structure(case: Case) -> Optional[str]:
    """None when the round trip (and, for file-based cases, load/save too) gives back the
    same proto (see structure_difference), else what differs. Runs for every case,
    runnable or not."""
    proto, _ = case.load()
    try:
        difference = structure_difference(proto, round_trip(proto))
        if difference is None and case.path is not None:
            with tempfile.TemporaryDirectory(prefix="qcompile-rt-") as tmp:
                saved = onnx.load(file_round_trip(case.path, tmp), load_external_data=False)
            difference = structure_difference(proto, saved)
            return None if difference is None else f"load/save: {difference}"
    except Exception as e:  # noqa: BLE001
        return f"round trip raised {type(e).__name__}: {_first_line(e)}"
    return difference


def run_case(case: Case) -> Result:
    """Run one case through onnxruntime before and after the round trip; never raises
    for a failure of the case itself."""
    start = time.perf_counter()

    def result(status: str, reason: str = "") -> Result:
        return Result(case.id, case.suite, status, reason, time.perf_counter() - start)

    proto, sets = case.load()
    if not sets:
        return result("not-runnable", "no input sets")
    try:
        expected = [run_model(proto, inputs) for inputs in sets]
    except Exception as e:  # noqa: BLE001
        return result("not-runnable", "onnxruntime: " + _first_line(e))
    try:
        exported: List[Tuple[str, Any]] = [("from_proto/to_proto", round_trip(proto).SerializeToString())]
    except Exception as e:  # noqa: BLE001
        return result("failed", f"round trip raised {type(e).__name__}: {_first_line(e)}")
    with tempfile.TemporaryDirectory(prefix="qcompile-rt-") as tmp:
        if case.path is not None:
            try:
                exported.append(("load/save", file_round_trip(case.path, tmp)))
            except Exception as e:  # noqa: BLE001
                return result("failed", f"load/save raised {type(e).__name__}: {_first_line(e)}")
        for how, model in exported:
            for k, inputs in enumerate(sets):
                try:
                    actual = run_model(model, inputs)
                except Exception as e:  # noqa: BLE001
                    return result("failed", f"{how}: onnxruntime rejects the exported model: {_first_line(e)}")
                why = compare_outputs(expected[k], actual)
                if why is not None:
                    return result("failed", f"{how}: input set {k}: {why}")
    return result("passed")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def run_cases(cases: Sequence[Case]) -> Iterator[Tuple[Result, Optional[str]]]:
    """Each case's Result and its structure difference (None when identical)."""
    for case in cases:
        with _quiet():
            yield run_case(case), check_structure(case)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        yield


# -- report ----------------------------------------------------------------------------
def summarize(results: Sequence[Result]) -> Dict[str, Dict[str, int]]:
    """{suite: {"cases", "runnable", "passed", "failed", "not-runnable"}}."""
    table: Dict[str, Dict[str, int]] = {}
    for r in results:
        row = table.setdefault(r.suite, {"cases": 0, "runnable": 0, "passed": 0, "failed": 0, "not-runnable": 0})
        row["cases"] += 1
        row["runnable"] += r.runnable
        row[r.status] += 1
    return table


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", action="append", choices=SUITES, help="only these suites (repeatable)")
    parser.add_argument("-k", default="", help="only cases whose id contains this text")
    parser.add_argument("--not-runnable", action="store_true", help="also list the cases onnxruntime cannot run")
    args = parser.parse_args(argv)
    cases = [c for c in all_cases(args.suite or SUITES) if args.k in c.id]
    start = time.perf_counter()
    pairs = list(run_cases(cases))
    elapsed = time.perf_counter() - start
    results = [r for r, _ in pairs]
    table = summarize(results)
    identical: Dict[str, int] = {}
    for r, diff in pairs:
        identical[r.suite] = identical.get(r.suite, 0) + (diff is None)
    columns = ("passed", "runnable", "cases", "not-runnable")
    print(f"{'suite':<20}{'passed':>8}{'runnable':>10}{'cases':>8}{'not runnable':>14}{'same proto':>12}")
    total = dict.fromkeys(columns + ("same",), 0)
    for suite in SUITES:
        if suite in table:
            row = dict(table[suite], same=identical[suite])
            print(f"{suite:<20}{row['passed']:>8}{row['runnable']:>10}{row['cases']:>8}{row['not-runnable']:>14}"
                  f"{row['same']:>12}")
            for key in total:
                total[key] += row[key]
    print(f"{'total':<20}{total['passed']:>8}{total['runnable']:>10}{total['cases']:>8}{total['not-runnable']:>14}"
          f"{total['same']:>12}")
    print(f"({elapsed:.1f} s; 'same proto': the exported ModelProto equals the original, see structure_difference)")
    failed = [r for r in results if r.status == "failed"]
    changed = [(r, diff) for r, diff in pairs if diff is not None]
    if failed:
        print(f"\n{len(failed)} failures:")
        for r in failed:
            print(f"  {r.case}: {r.reason}")
    if changed:
        print(f"\n{len(changed)} models whose proto changed:")
        for r, diff in changed:
            print(f"  {r.case}: {diff}")
    if args.not_runnable:
        reasons = collections.Counter(reason_kind(r.reason) for r in results if not r.runnable)
        print("\nnot runnable in onnxruntime, by reason:")
        for reason, count in reasons.most_common():
            print(f"  {count:4d}  {reason}")
        print()
        for r in results:
            if not r.runnable:
                print(f"  {r.case}: {r.reason}")
    return 1 if failed or changed else 0


KNOWN_REASON_KINDS = frozenset({
    "no CPU kernel at this old opset (1-6)",
    "no CPU kernel for this op, opset or type",
    "op of a domain onnxruntime does not register (ai.onnx.preview*)",
    "StringNormalizer needs the en_US.UTF-8 locale, not installed here",
    "batchwise (layout=1) RNN/GRU/LSTM unsupported",
    "kernel error at run time (unsupported attribute or input combination)",
})


def reason_kind(reason: str) -> str:
    """A not-runnable reason without its node and op specifics, for counting (one of
    KNOWN_REASON_KINDS, or the reason itself when it is of no known kind)."""
    kernel = re.search(r"(?:implementation for|kernel for) \w+\((\d+)\)", reason)
    if kernel:
        if int(kernel.group(1)) < 7:
            return "no CPU kernel at this old opset (1-6)"
        return "no CPU kernel for this op, opset or type"
    for marker, kind in (
        ("is not a registered function/op", "op of a domain onnxruntime does not register (ai.onnx.preview*)"),
        ("Failed to construct locale", "StringNormalizer needs the en_US.UTF-8 locale, not installed here"),
        ("layout == 1) are not supported", "batchwise (layout=1) RNN/GRU/LSTM unsupported"),
        ("Non-zero status code", "kernel error at run time (unsupported attribute or input combination)"),
    ):
        if marker in reason:
            return kind
    return reason


if __name__ == "__main__":
    sys.exit(main())
