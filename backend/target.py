"""Accelerator targets: the parameters of a rain-sim-like chip, read from a TOML file.

A target says what the lowering may use (array shape, dataflow, operand precisions,
buffer sizes) and what the simulator charges (clock, DRAM bandwidth and latency, the
energy of each action with the source of each figure). `docs/targets.md` documents
every key, its unit and the figures of the built-in presets.

    t = load_target("rain-sim")              # a preset shipped in backend/targets/
    t = load_target("path/to/my.toml")       # or any file with the same schema
    t.matrix.rows, t.sram["weight"].size_bytes, t.energy.mac_int8   # 32, 262144, 0.09 (pJ)

Validation is strict, because a typo in a hardware description silently changes every
number the simulator reports:

1. TOML syntax errors name the file, line and column.
2. Unknown keys are errors, with a did-you-mean when one is close.
3. Missing keys are errors that say what the key holds (only `description` is optional).
4. Values are type-checked (an integer is not a float is not a boolean) and
   range-checked (sizes positive, dataflow and precisions from a fixed list).
5. Cross-checks: every SRAM buffer holds at least one rows x cols tile of its elements.

Every error is one line, `FILE: KEY: problem; allowed ...`, raised as `TargetError`.

`Target.fingerprint()` identifies the parameters, not the file: programs record it and
refuse to run on a target whose parameters differ (see backend/program.py).
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
import types
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from qcompile.errors import QCompileError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ModuleNotFoundError:  # pragma: no cover
        tomllib = None  # type: ignore[assignment]

__all__ = [
    "Target", "MatrixUnit", "VectorUnit", "SramBuffer", "Dram", "Energy", "TargetError",
    "load_target", "list_targets", "format_target", "format_target_list", "preset_dir",
    "estimate_sram_pj_per_byte",
    "DATAFLOWS", "PRECISIONS", "SRAM_BUFFERS", "ENERGY_FIGURES",
]

DATAFLOWS = ("output-stationary", "weight-stationary")
PRECISIONS = ("int8", "int4", "int2", "binary")  # operand precisions; accumulators are int32
PRECISION_BITS = {"int8": 8, "int4": 4, "int2": 2, "binary": 1}
SRAM_BUFFERS = ("activation", "weight", "accumulator")
_SRAM_ELEMENT_BYTES = {"activation": 1, "weight": 1, "accumulator": 4}  # accumulators hold int32
# Energy figures in pJ (per MAC, per lane operation, or per byte), each with a source.
ENERGY_FIGURES = (
    "mac_int8", "mac_int4", "mac_int2", "mac_binary", "vector_op",
    "sram_activation_pj_per_byte", "sram_weight_pj_per_byte", "sram_accumulator_pj_per_byte",
    "dram_pj_per_byte",
)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PRESET_SUFFIX = ".toml"


class TargetError(QCompileError):
    """A target that cannot be used: unknown preset, unreadable or invalid file."""


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class MatrixUnit:
    """The systolic MAC array: `rows` x `cols` processing elements."""
    rows: int
    cols: int
    dataflow: str                   # "output-stationary" or "weight-stationary"
    precisions: Tuple[str, ...]     # subset of PRECISIONS, in PRECISIONS order
    sparsity: Tuple[str, ...] = ()  # N:M weight patterns the array executes compressed, e.g. ("2:4",)
    skip_zero_cycles: bool = False  # zero operands also save cycles (not only MAC energy)

    def nm_patterns(self) -> Tuple[Tuple[int, int], ...]:
        """The supported N:M patterns as (N, M), sparsest first."""
        pairs = [tuple(int(x) for x in p.split(":")) for p in self.sparsity]
        return tuple(sorted(pairs, key=lambda nm: nm[0] / nm[1]))

    @property
    def macs_per_cycle(self) -> int:
        return self.rows * self.cols

    def supports(self, precision: str) -> bool:
        return precision in self.precisions


@dataclass(frozen=True)
class VectorUnit:
    """The SIMD unit: `width` int32 lanes (elements per cycle), a `lut_entries` table."""
    width: int
    lut_entries: int


@dataclass(frozen=True)
class SramBuffer:
    """One on-chip scratchpad. `element_bytes` is 1 for activation and weight buffers and
    4 for the accumulator buffer (int32 entries); `pj_per_byte` is the access energy."""
    name: str
    size_bytes: int
    pj_per_byte: float
    element_bytes: int = 1

    @property
    def size_kib(self) -> float:
        return self.size_bytes / 1024

    @property
    def elements(self) -> int:
        """Capacity in elements (int32 words for the accumulator buffer)."""
        return self.size_bytes // self.element_bytes


@dataclass(frozen=True)
class Dram:
    bandwidth_gb_s: float   # 1e9 bytes per second
    latency_ns: float       # per transfer, before the first byte


@dataclass(frozen=True)
class Energy:
    """Per-action energies in pJ and static power in mW; `sources[key]` cites each figure
    (keys are the attribute names)."""
    mac_int8: float                       # pJ per int8 x int8 MAC with int32 accumulate
    mac_int4: float                       # pJ per int4 MAC
    mac_int2: float                       # pJ per int2 MAC
    mac_binary: float                     # pJ per binary (1-bit) MAC
    vector_op: float                      # pJ per int32 lane operation of the vector unit
    sram_activation_pj_per_byte: float
    sram_weight_pj_per_byte: float
    sram_accumulator_pj_per_byte: float
    dram_pj_per_byte: float
    static_power_mw: float                # mW, charged for the whole run time
    sources: Mapping[str, str] = field(default_factory=dict)

    def mac(self, precision: str) -> float:
        """pJ per MAC at an operand precision ("int8", "int4", "int2", "binary")."""
        if precision not in PRECISION_BITS:
            raise TargetError(f"no MAC energy for precision '{precision}'; known: {', '.join(PRECISIONS)}")
        return getattr(self, "mac_" + precision)

    def source(self, key: str) -> str:
        return self.sources[key]


@dataclass(frozen=True)
class Target:
    """An accelerator target. `path` is the file it was read from (not a parameter: it
    takes no part in equality or the fingerprint)."""
    name: str
    description: str
    clock_mhz: float
    matrix: MatrixUnit
    vector: VectorUnit
    sram: Mapping[str, SramBuffer]        # keys "activation", "weight", "accumulator"
    dram: Dram
    energy: Energy
    path: Optional[str] = field(default=None, compare=False)

    def __hash__(self) -> int:
        return hash(self.fingerprint())

    # derived figures ------------------------------------------------------------
    @property
    def dram_bytes_per_cycle(self) -> float:
        """DRAM bytes transferred per accelerator clock cycle."""
        return self.dram.bandwidth_gb_s * 1e9 / (self.clock_mhz * 1e6)

    @property
    def dram_latency_cycles(self) -> int:
        """DRAM latency in whole clock cycles (rounded up)."""
        return _ceil(self.dram.latency_ns * self.clock_mhz / 1000.0)

    def seconds(self, cycles: float) -> float:
        """Wall time of `cycles` clock cycles."""
        return cycles / (self.clock_mhz * 1e6)

    # identity ---------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """The parameters in the file's layout (loads back with `Target.from_dict`)."""
        e = self.energy
        energy: Dict[str, Any] = {k: {"pj": getattr(e, k), "source": e.sources.get(k, "")} for k in ENERGY_FIGURES}
        energy["static_power_mw"] = {"mw": e.static_power_mw, "source": e.sources.get("static_power_mw", "")}
        return {
            "name": self.name,
            "description": self.description,
            "clock_mhz": self.clock_mhz,
            "matrix": {"rows": self.matrix.rows, "cols": self.matrix.cols, "dataflow": self.matrix.dataflow,
                       "precisions": list(self.matrix.precisions), "sparsity": list(self.matrix.sparsity),
                       "skip_zero_cycles": self.matrix.skip_zero_cycles},
            "vector": {"width": self.vector.width, "lut_entries": self.vector.lut_entries},
            "sram": {n: {"size_kib": _whole(self.sram[n].size_kib)} for n in SRAM_BUFFERS},
            "dram": {"bandwidth_gb_s": self.dram.bandwidth_gb_s, "latency_ns": self.dram.latency_ns},
            "energy": energy,
        }

    def fingerprint(self) -> bytes:
        """16 bytes identifying the parameters: the first half of the SHA-256 of a
        canonical JSON form (sorted keys, numbers normalised). Covers the name and every
        number and choice; leaves out the description, the energy sources and the path,
        which document a target without changing what it computes or charges. Computed
        once per (frozen) target: every simulation checks it."""
        cached = self.__dict__.get("_fingerprint")
        if cached is not None:
            return cached
        d = self.to_dict()
        del d["description"]
        d["energy"] = {k: {u: v for u, v in fig.items() if u != "source"} for k, fig in d["energy"].items()}
        text = json.dumps(_canonical(d), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        self.__dict__["_fingerprint"] = fp = hashlib.sha256(text.encode()).digest()[:16]
        return fp

    def summary(self) -> str:
        """One line: array, dataflow, precisions, SRAM, clock, DRAM."""
        m = self.matrix
        sram = "+".join(f"{_whole(self.sram[n].size_kib)}" for n in SRAM_BUFFERS)
        return (f"{m.rows}x{m.cols} {m.dataflow}, {'/'.join(m.precisions)}, SRAM {sram} KiB (act+wgt+acc), "
                f"{_num(self.clock_mhz)} MHz, DRAM {_num(self.dram.bandwidth_gb_s)} GB/s")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<target>", path: Optional[str] = None) -> "Target":
        """Validate a parsed TOML document; errors name `source` and the dotted key."""
        return _Parser(source).target(data, path)


# --------------------------------------------------------------------------- loading


def load_target(spec: Union[str, os.PathLike, Target]) -> Target:
    """A target from a preset name ("rain-sim"), a path to a .toml file, or a Target
    (returned as it is)."""
    if isinstance(spec, Target):
        return spec
    text = os.fspath(spec)
    presets = _preset_files()
    if text in presets:  # a preset name wins over a same-named file; say ./NAME for the file
        return _load_file(presets[text], shown=f"preset {text} ({presets[text]})")
    if os.path.exists(text) or text.endswith(_PRESET_SUFFIX) or os.sep in text or "/" in text:
        if not os.path.exists(text):
            raise TargetError(f"target file {text}: no such file")
        if os.path.isdir(text):
            raise TargetError(f"target file {text}: is a directory; give a .toml file")
        return _load_file(text, shown=text)
    close = difflib.get_close_matches(text, list(presets), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise TargetError(f"unknown target '{text}'{hint}: give a preset ({', '.join(sorted(presets)) or 'none'}) "
                      "or a path to a target .toml file")


def estimate_sram_pj_per_byte(size_kib: float) -> float:
    """Read energy per byte of an SRAM array of `size_kib`, from DESIGN.md's 22 nm
    defaults (Horowitz ISSCC 2014 x 0.30): 0.375 / 0.75 / 3.75 pJ per byte at 8 / 32 /
    1024 KiB, interpolated linearly in log(size) and log(energy) between those points and
    extrapolated along the nearest segment outside them. The presets' SRAM figures come
    from here; use it to fill in a new target's buffers."""
    if not size_kib > 0:
        raise TargetError(f"SRAM size must be > 0 KiB, got {size_kib}")
    points = _HOROWITZ_SRAM_22NM
    for (a, ea), (b, eb) in zip(points, points[1:]):
        if size_kib <= b or b == points[-1][0]:
            slope = math.log(eb / ea) / math.log(b / a)
            return ea * (size_kib / a) ** slope
    raise AssertionError("unreachable")  # pragma: no cover


_HOROWITZ_SRAM_22NM = ((8.0, 0.375), (32.0, 0.75), (1024.0, 3.75))  # (KiB, pJ/byte)


def list_targets() -> List[Tuple[str, str]]:
    """The built-in presets as (name, one-line summary), sorted by name."""
    return [(name, load_target(name).summary()) for name in sorted(_preset_files())]


def preset_dir() -> str:
    """The folder that holds the preset .toml files."""
    return str(resources.files("qcompile.backend").joinpath("targets"))


def _preset_files() -> Dict[str, str]:
    folder = preset_dir()
    if not os.path.isdir(folder):
        return {}
    return {f[: -len(_PRESET_SUFFIX)]: os.path.join(folder, f)
            for f in sorted(os.listdir(folder)) if f.endswith(_PRESET_SUFFIX)}


def _load_file(path: str, shown: str) -> Target:
    if tomllib is None:  # pragma: no cover
        raise TargetError(f"{shown}: reading TOML needs Python 3.11 or the 'tomli' package (pip install tomli)")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise TargetError(f"{shown}: cannot read: {e.strerror or e}") from e
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise TargetError(f"{shown}: not a text file (invalid UTF-8 at byte {e.start})") from e
    except tomllib.TOMLDecodeError as e:
        raise TargetError(f"{shown}: {_toml_error(str(e))}") from e
    return Target.from_dict(data, source=shown, path=os.path.abspath(path))


def _toml_error(message: str) -> str:
    """tomllib says 'Expected ... (at line 3, column 7)'; put the place first."""
    m = re.search(r"\s*\(at line (\d+), column (\d+)\)\s*$", message)
    if m:
        return f"line {m.group(1)}, column {m.group(2)}: TOML syntax error: {message[: m.start()]}"
    m = re.search(r"\s*\(at end of document\)\s*$", message)
    if m:
        return f"end of file: TOML syntax error: {message[: m.start()]}"
    return f"TOML syntax error: {message}"


# --------------------------------------------------------------------------- validation

_SECTIONS = {  # key: (kind, what it holds) for the messages about missing keys
    "name": "a string: the target's name",
    "description": "a string (optional)",
    "clock_mhz": "a positive number: clock in MHz",
    "matrix": "a table: rows, cols, dataflow, precisions",
    "vector": "a table: width, lut_entries",
    "sram": "a table with [sram.activation], [sram.weight], [sram.accumulator]",
    "dram": "a table: bandwidth_gb_s, latency_ns",
    "energy": "a table of energy figures, each {pj = <number>, source = \"<citation>\"}",
}
_MATRIX = {"rows": "a positive integer: rows of the MAC array", "cols": "a positive integer: columns of the MAC array",
           "dataflow": f"one of {', '.join(DATAFLOWS)}",
           "precisions": f"a list of operand precisions from {', '.join(PRECISIONS)}",
           "sparsity": "a list of N:M weight patterns executed compressed, e.g. [\"2:4\", \"1:4\"] (optional)",
           "skip_zero_cycles": "true or false: zero operands also save cycles, not only energy (optional)"}
_VECTOR = {"width": "a positive integer: int32 lanes (elements per cycle)",
           "lut_entries": "a power of two: entries of the lookup table"}
_SRAM_BUFFER = {"size_kib": "a positive number: size in KiB (1024 bytes)"}
_DRAM = {"bandwidth_gb_s": "a positive number: bandwidth in GB/s (1e9 bytes/s)",
         "latency_ns": "a number >= 0: latency per transfer in ns"}
_ENERGY = {**{k: "a table {pj = <number>, source = \"<citation>\"}" for k in ENERGY_FIGURES},
           "static_power_mw": "a table {mw = <number>, source = \"<citation>\"}"}


class _Parser:
    """Walks a parsed document, checking each key; `self.source` prefixes every error."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, problem: str) -> TargetError:
        where = f"{key}: " if key else ""
        return TargetError(f"{self.source}: {where}{problem}")

    def table(self, data: Any, key: str, allowed: Mapping[str, str], optional=()) -> Mapping[str, Any]:
        """Check that `data` is a table whose keys are exactly `allowed` (less `optional`)."""
        if not isinstance(data, dict):
            raise self.fail(key, f"expected a table, got {_describe(data)}")
        prefix = key + "." if key else ""
        for k in data:
            if k not in allowed:
                close = difflib.get_close_matches(k, list(allowed), n=1, cutoff=0.6)
                hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
                section = f"[{key}]" if key else "the top level"
                raise self.fail("", f"unknown key '{prefix}{k}'{hint}; allowed in {section}: {', '.join(allowed)}")
        for k, what in allowed.items():
            if k not in data and k not in optional:
                raise self.fail("", f"missing key '{prefix}{k}' ({what})")
        return data

    def integer(self, value: Any, key: str, minimum: int = 1) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected an integer >= {minimum}, got {_describe(value)}")
        if value < minimum:
            raise self.fail(key, f"must be an integer >= {minimum}, got {value}")
        return value

    def number(self, value: Any, key: str, positive: bool = True) -> float:
        bound = "> 0" if positive else ">= 0"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, f"expected a number {bound}, got {_describe(value)}")
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise self.fail(key, f"must be a finite number {bound}, got {value}")
        return float(value)

    def string(self, value: Any, key: str) -> str:
        if not isinstance(value, str):
            raise self.fail(key, f"expected a string, got {_describe(value)}")
        return value

    def choice(self, value: Any, key: str, allowed: Tuple[str, ...]) -> str:
        listed = ", ".join(f"'{a}'" for a in allowed)
        if not isinstance(value, str) or value not in allowed:
            got = f"'{value}'" if isinstance(value, str) else _describe(value)
            close = difflib.get_close_matches(value, allowed, n=1, cutoff=0.85) if isinstance(value, str) else []
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise self.fail(key, f"{got} is not allowed{hint}; allowed: {listed}")
        return value

    # sections ---------------------------------------------------------------------
    def target(self, data: Any, path: Optional[str]) -> Target:
        doc = self.table(data, "", _SECTIONS, optional=("description",))
        name = self.string(doc["name"], "name")
        if not _NAME_RE.match(name):
            raise self.fail("name", f"'{name}' is not a usable name; use letters, digits, '-', '_' and '.' "
                                    "(starting with a letter or digit)")
        description = self.string(doc.get("description", ""), "description")
        clock = self.number(doc["clock_mhz"], "clock_mhz")
        matrix = self.matrix(doc["matrix"])
        vector = self.vector(doc["vector"])
        energy = self.energy(doc["energy"])
        sram = self.sram(doc["sram"], energy, matrix)
        d = self.table(doc["dram"], "dram", _DRAM)
        dram = Dram(self.number(d["bandwidth_gb_s"], "dram.bandwidth_gb_s"),
                    self.number(d["latency_ns"], "dram.latency_ns", positive=False))
        return Target(name, description, clock, matrix, vector, sram, dram, energy, path)

    def matrix(self, data: Any) -> MatrixUnit:
        m = self.table(data, "matrix", _MATRIX, optional=("sparsity", "skip_zero_cycles"))
        rows = self.integer(m["rows"], "matrix.rows")
        cols = self.integer(m["cols"], "matrix.cols")
        dataflow = self.choice(m["dataflow"], "matrix.dataflow", DATAFLOWS)
        precisions = m["precisions"]
        if not isinstance(precisions, list) or not precisions:
            raise self.fail("matrix.precisions", f"expected a non-empty list from {', '.join(PRECISIONS)}, "
                                                 f"got {_describe(precisions)}")
        seen = set()
        for i, p in enumerate(precisions):
            self.choice(p, f"matrix.precisions[{i}]", PRECISIONS)
            if p in seen:
                raise self.fail(f"matrix.precisions[{i}]", f"'{p}' is listed twice")
            seen.add(p)
        patterns = m.get("sparsity", [])
        if not isinstance(patterns, list):
            raise self.fail("matrix.sparsity", f"expected a list of \"N:M\" strings, got {_describe(patterns)}")
        for i, p in enumerate(patterns):
            mm = re.fullmatch(r"(\d+):(\d+)", p) if isinstance(p, str) else None
            if not mm or not 0 < int(mm.group(1)) < int(mm.group(2)) <= 16:
                raise self.fail(f"matrix.sparsity[{i}]", f"expected \"N:M\" with 0 < N < M <= 16, got {_describe(p)}")
        skip = m.get("skip_zero_cycles", False)
        if not isinstance(skip, bool):
            raise self.fail("matrix.skip_zero_cycles", f"expected true or false, got {_describe(skip)}")
        return MatrixUnit(rows, cols, dataflow, tuple(p for p in PRECISIONS if p in seen), tuple(dict.fromkeys(patterns)),
                          skip)

    def vector(self, data: Any) -> VectorUnit:
        v = self.table(data, "vector", _VECTOR)
        width = self.integer(v["width"], "vector.width")
        lut = self.integer(v["lut_entries"], "vector.lut_entries", minimum=2)
        if lut & (lut - 1):
            raise self.fail("vector.lut_entries", f"must be a power of two (e.g. 256 for an 8-bit index), got {lut}")
        return VectorUnit(width, lut)

    def sram(self, data: Any, energy: Energy, matrix: MatrixUnit) -> Mapping[str, SramBuffer]:
        s = self.table(data, "sram", {n: f"[sram.{n}] with {', '.join(_SRAM_BUFFER)}" for n in SRAM_BUFFERS})
        buffers = {}
        for n in SRAM_BUFFERS:
            key = f"sram.{n}"
            b = self.table(s[n], key, _SRAM_BUFFER)
            kib = self.number(b["size_kib"], f"{key}.size_kib")
            size = kib * 1024
            elem = _SRAM_ELEMENT_BYTES[n]
            if size != int(size) or int(size) % elem:
                raise self.fail(f"{key}.size_kib", f"{_num(kib)} KiB is not a whole number of "
                                                   f"{elem}-byte elements")
            tile = matrix.rows * matrix.cols * elem
            if size < tile:
                raise self.fail(f"{key}.size_kib", f"{_num(kib)} KiB cannot hold one {matrix.rows}x{matrix.cols} "
                                                   f"tile ({tile} bytes); must be >= {_num(tile / 1024)} KiB")
            buffers[n] = SramBuffer(n, int(size), getattr(energy, f"sram_{n}_pj_per_byte"), elem)
        return types.MappingProxyType(buffers)

    def energy(self, data: Any) -> Energy:
        e = self.table(data, "energy", _ENERGY)
        values: Dict[str, float] = {}
        sources: Dict[str, str] = {}
        for k in list(ENERGY_FIGURES) + ["static_power_mw"]:
            unit = "mw" if k == "static_power_mw" else "pj"
            key = f"energy.{k}"
            fig = e[k]
            if not isinstance(fig, dict):
                raise self.fail(key, f"expected {_ENERGY[k]}, got {_describe(fig)}")
            fig = self.table(fig, key, {unit: f"a number >= 0, in {'mW' if unit == 'mw' else 'pJ'}",
                                        "source": "a string citing where the figure comes from"})
            values[k] = self.number(fig[unit], f"{key}.{unit}", positive=False)
            source = self.string(fig["source"], f"{key}.source").strip()
            if not source:
                raise self.fail(f"{key}.source", "is empty; say where the figure comes from")
            sources[k] = source
        return Energy(**values, sources=types.MappingProxyType(sources))


# --------------------------------------------------------------------------- printing


def format_target_list() -> str:
    """The presets as a table: name, array, dataflow, SRAM, clock, file."""
    rows = [("name", "array", "dataflow", "SRAM act/wgt/acc KiB", "clock", "file")]
    for name in sorted(_preset_files()):
        t = load_target(name)
        rows.append((t.name, f"{t.matrix.rows}x{t.matrix.cols}", t.matrix.dataflow,
                     "/".join(str(_whole(t.sram[n].size_kib)) for n in SRAM_BUFFERS),
                     f"{_num(t.clock_mhz)} MHz", t.path or ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    if len(rows) == 1:
        lines.append("(no presets installed)")
    lines.append("")
    lines.append("Use one with --target NAME, or --target FILE.toml for your own (docs/targets.md); "
                 "`qcompile targets NAME` shows all of its parameters.")
    return "\n".join(lines)


def format_target(t: Target) -> str:
    """Every parameter with its unit, derived figures, and the source of each energy figure."""
    e = t.energy
    lines = [f"target {t.name}" + (f": {t.description}" if t.description else ""),
             f"  file              {t.path or '(not from a file)'}",
             f"  fingerprint       {t.fingerprint().hex()}",
             f"  clock             {_num(t.clock_mhz)} MHz",
             f"  matrix            {t.matrix.rows}x{t.matrix.cols} {t.matrix.dataflow}, "
             f"operands {', '.join(t.matrix.precisions)}, int32 accumulators",
             f"  vector            {t.vector.width} int32 lanes, {t.vector.lut_entries}-entry lookup table"]
    for n in SRAM_BUFFERS:
        b = t.sram[n]
        unit = "int32 entries" if b.element_bytes == 4 else "bytes"
        lines.append(f"  sram.{n:<12} {_num(b.size_kib)} KiB ({b.elements} {unit}), {_num(b.pj_per_byte)} pJ/byte")
    lines.append(f"  dram              {_num(t.dram.bandwidth_gb_s)} GB/s ({_num(t.dram_bytes_per_cycle)} bytes/cycle), "
                 f"{_num(t.dram.latency_ns)} ns ({t.dram_latency_cycles} cycles)")
    lines.append("  energy:")
    for k in ENERGY_FIGURES:
        unit = "pJ/byte" if k.endswith("_per_byte") else ("pJ/lane-op" if k == "vector_op" else "pJ/MAC")
        lines.append(f"    {k:<29} {_num(getattr(e, k)):>9} {unit:<10} {e.sources[k]}")
    lines.append(f"    {'static_power_mw':<29} {_num(e.static_power_mw):>9} {'mW':<10} {e.sources['static_power_mw']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- helpers


def _ceil(x: float) -> int:
    """ceil, forgiving float noise such as 80.00000000000001."""
    return math.ceil(round(x, 9))


def _whole(x: float) -> Union[int, float]:
    return int(x) if float(x).is_integer() else x


def _num(x: float) -> str:
    return f"{x:.6g}"


def _canonical(obj: Any) -> Any:
    """Numbers as floats (so 800 and 800.0 agree), containers recursively."""
    if isinstance(obj, dict):
        return {k: _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, bool) or isinstance(obj, str):
        return obj
    if isinstance(obj, (int, float)):
        return float(obj)
    return obj


def _describe(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "float", str: "string", list: "list",
            dict: "table"}.get(type(value), type(value).__name__)
    if isinstance(value, (dict, list)):
        return f"a {kind}" if value else f"an empty {kind}"
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    return f"{shown} ({kind})"
