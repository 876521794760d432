"""A rain-sim program and its `.rsim` file: what the lowering writes and the simulator runs.

A program is self-contained: instructions, the constant segment, the tensor table of the
activation arena, the interface (how float inputs are quantized and outputs
dequantized), the host operations and the layer table for reports. The simulator needs
nothing else (no graph, no IR).

File layout (little-endian):

    offset 0   magic  b"RSIM"
           4   format version (uint16), then 2 reserved bytes
           8   target fingerprint (16 bytes)
          24   SHA-256 of every byte from offset 56 on (32 bytes)
          56   sections: tag (4 ASCII bytes), length (uint64), payload; in order
               META (UTF-8 JSON), CODE (int32 instruction words), CNST (constant
               segment; sub-byte weights packed), HOST (concatenated ONNX models of the
               host operations, located by META)

A file that is cut short, fails its checksum, has another format version or was
compiled for another target is refused with one line that says which.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from qcompile._fileio import atomic_path
from qcompile.errors import QCompileError

from .isa import DType, DTYPE_BITS, DTYPE_NUMPY, Instr, IsaError, decode

__all__ = ["Program", "TensorSlot", "HostOp", "ProgramError", "FORMAT_VERSION", "MAGIC", "save_program",
           "load_program"]

MAGIC = b"RSIM"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sHH16s32s")
_SECTION = struct.Struct("<4sQ")
_TAGS = (b"META", b"CODE", b"CNST", b"HOST")


class ProgramError(QCompileError):
    """A `.rsim` file that cannot be run: truncated, corrupted, another version or target."""


@dataclass
class TensorSlot:
    """A tensor in DRAM: `addr` in the activation arena (bytes), element type and shape
    (dense, row-major)."""
    name: str
    addr: int
    dtype: DType
    shape: List[int]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return (self.size * DTYPE_BITS[self.dtype] + 7) // 8

    def to_json(self) -> Dict[str, Any]:
        return {"name": self.name, "addr": self.addr, "dtype": self.dtype.name, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "TensorSlot":
        return cls(d["name"], int(d["addr"]), DType[d["dtype"]], [int(s) for s in d["shape"]])


@dataclass
class HostOp:
    """An operation the accelerator lacks, run on the host between DRAM tensors: a
    one-node ONNX model in `model`; kind "onnx" runs in onnxruntime, kind "integer" (an
    op of the qcompile.int domain) in the integer reference."""
    kind: str
    op_type: str
    name: str
    inputs: List[int]
    outputs: List[int]
    model: bytes = b""

    def to_json(self, offset: int) -> Dict[str, Any]:
        return {"kind": self.kind, "op_type": self.op_type, "name": self.name, "inputs": self.inputs,
                "outputs": self.outputs, "model_offset": offset, "model_size": len(self.model)}


@dataclass
class Program:
    """Everything the simulator needs to run one inference."""
    target_name: str
    target_fingerprint: bytes
    code: np.ndarray                     # int32 instruction words (isa.encode)
    const: bytes                         # the constant segment
    arena_size: int                      # bytes of the per-inference activation arena
    tensors: List[TensorSlot]
    inputs: List[Dict[str, Any]]         # {name, tensor, shape, float: bool, scale, zero_point, axis}
    outputs: List[Dict[str, Any]]        # {name, tensor, shape, float: bool, scale, zero_point, axis}
    host_ops: List[HostOp] = field(default_factory=list)
    layers: List[Dict[str, Any]] = field(default_factory=list)
    info: Dict[str, Any] = field(default_factory=dict)

    _decoded: Optional[List[Instr]] = None

    @property
    def instructions(self) -> List[Instr]:
        if self._decoded is None:
            self._decoded = decode(self.code)
        return self._decoded

    # -- serialisation --------------------------------------------------------------
    def to_bytes(self) -> bytes:
        return b"".join(self._file_pieces())

    def _file_pieces(self) -> List[bytes]:
        """The file as pieces (header, then each section's header and payload) that
        join to `to_bytes()`: the constant segment is a piece as it is, not copied into
        a body and again into the file (VGG-19's is 137 MB)."""
        host_blob, host_meta = bytearray(), []
        for h in self.host_ops:
            host_meta.append(h.to_json(len(host_blob)))
            host_blob += h.model
        meta = {
            "target": self.target_name, "arena_size": self.arena_size,
            "tensors": [t.to_json() for t in self.tensors], "inputs": self.inputs, "outputs": self.outputs,
            "host_ops": host_meta, "layers": self.layers, "info": self.info,
        }
        payloads = [json.dumps(meta, sort_keys=True).encode(), np.asarray(self.code, "<i4").tobytes(),
                    bytes(self.const), bytes(host_blob)]
        body: List[bytes] = []
        digest = hashlib.sha256()
        for tag, p in zip(_TAGS, payloads):
            for piece in (_SECTION.pack(tag, len(p)), p):
                body.append(piece)
                digest.update(piece)
        header = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, self.target_fingerprint, digest.digest())
        return [header] + body

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> "Program":
        if len(data) < _HEADER.size:
            if data[:4] != MAGIC[:len(data[:4])]:
                raise ProgramError(f"{source}: not a rain-sim program (no RSIM header)")
            raise ProgramError(f"{source}: truncated rain-sim program ({len(data)} bytes, the header alone is "
                               f"{_HEADER.size})")
        magic, version, _, fingerprint, digest = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise ProgramError(f"{source}: not a rain-sim program (no RSIM header)")
        if version != FORMAT_VERSION:
            raise ProgramError(f"{source}: rain-sim program format version {version}; this qcompile reads version "
                               f"{FORMAT_VERSION}: recompile the model")
        body = memoryview(data)[_HEADER.size:]
        sections: Dict[bytes, bytes] = {}
        pos = 0
        for tag in _TAGS:
            if pos + _SECTION.size > len(body):
                raise ProgramError(f"{source}: truncated rain-sim program (section {tag.decode()} missing)")
            got, length = _SECTION.unpack_from(body, pos)
            pos += _SECTION.size
            if pos + length > len(body):
                raise ProgramError(f"{source}: truncated rain-sim program (section {tag.decode()} is cut short)")
            if got != tag:
                raise ProgramError(f"{source}: corrupted rain-sim program (expected section {tag.decode()})")
            sections[tag] = bytes(body[pos:pos + length])
            pos += length
        if hashlib.sha256(body).digest() != digest:
            raise ProgramError(f"{source}: corrupted rain-sim program (checksum mismatch)")
        try:
            meta = json.loads(sections[b"META"].decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ProgramError(f"{source}: corrupted rain-sim program (metadata: {e})") from None
        code = np.frombuffer(sections[b"CODE"], dtype="<i4").copy()
        host_blob = sections[b"HOST"]
        host_ops = [HostOp(h["kind"], h["op_type"], h["name"], h["inputs"], h["outputs"],
                           host_blob[h["model_offset"]:h["model_offset"] + h["model_size"]]) for h in meta["host_ops"]]
        prog = cls(meta["target"], fingerprint, code, sections[b"CNST"], int(meta["arena_size"]),
                   [TensorSlot.from_json(t) for t in meta["tensors"]], meta["inputs"], meta["outputs"], host_ops,
                   meta["layers"], meta["info"])
        try:
            prog.instructions
        except IsaError as e:
            raise ProgramError(f"{source}: corrupted rain-sim program ({e})") from None
        return prog

    def check_target(self, target, source: str = "<program>") -> None:
        """Refuse to run on a target other than the one compiled for."""
        fp = target.fingerprint()
        if fp != self.target_fingerprint:
            raise ProgramError(f"{source}: compiled for target '{self.target_name}' "
                               f"(fingerprint {self.target_fingerprint.hex()[:12]}), not for '{target.name}' "
                               f"(fingerprint {fp.hex()[:12]}): recompile with --target {target.name}")

    def tensor_array(self, arena: np.ndarray, index: int) -> np.ndarray:
        """View of tensor `index` in an (N, arena_size) byte arena as (N, *shape)."""
        t = self.tensors[index]
        n = arena.shape[0]
        raw = arena[:, t.addr:t.addr + t.nbytes]
        return raw.view(DTYPE_NUMPY[t.dtype]).reshape(n, *t.shape)


def save_program(program: Program, path: str) -> None:
    """Write `program` to `path` atomically (piece by piece: no copy of the file in memory)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            for piece in program._file_pieces():
                f.write(piece)


def load_program(path: str) -> Program:
    """Read a `.rsim` file; errors name the file and what is wrong with it."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ProgramError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ProgramError(f"{path}: is a directory, not a rain-sim program") from None
    return Program.from_bytes(data, path)
