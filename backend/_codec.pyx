# cython: boundscheck=False, wraparound=False, cdivision=True, language_level=3
"""The binary encoding of rain-sim instruction streams, compiled: `isa.encode` and
`isa.decode` run here (a large model's program has hundreds of thousands of words).

This module knows no opcode, field or header bit: `isa.py` builds one `Codec` from its
own tables (`SPECS`, the header shifts and masks) and every layout decision stays
there.
"""
import numpy as np
from cpython.dict cimport PyDict_GetItem, PyDict_SetItem
from cpython.object cimport PyObject
from libc.stdint cimport int32_t, int64_t, uint32_t

DEF NCODES = 256


cdef class Codec:
    """Encoder and decoder for one instruction table: `fields[code]` the field names of
    opcode `code` in binary order, `ops[code]` its `Op`, `instr` the class of decoded
    instructions (called as instr(op, args, wait, signal, layer)), `error` the
    exception for malformed input; the header packs opcode (`op_mask`), wait and
    signal masks (`token_mask` at `wait_shift`, `signal_shift`) and the layer
    (`layer_shift`, below `max_layers`)."""
    cdef list _fields          # code -> tuple of field names, or None
    cdef list _ops             # code -> Op, or None
    cdef int _nfields[NCODES]
    cdef int _max_fields
    cdef object _instr, _error
    cdef uint32_t _op_mask, _token_mask
    cdef int _wait_shift, _signal_shift, _layer_shift
    cdef int64_t _max_layers

    def __init__(self, dict fields, dict ops, instr, error, int op_mask, int token_mask, int wait_shift,
                 int signal_shift, int layer_shift, long long max_layers):
        cdef int code
        self._fields = [None] * NCODES
        self._ops = [None] * NCODES
        self._max_fields = 0
        for code in range(NCODES):
            self._nfields[code] = -1
        for key, names in fields.items():
            code = int(key)
            if not 0 <= code <= op_mask < NCODES:
                raise ValueError(f"opcode {code} does not fit the header's opcode bits")
            self._fields[code] = tuple(str(n) for n in names)
            self._ops[code] = ops[key]
            self._nfields[code] = len(names)
            self._max_fields = max(self._max_fields, len(names))
        self._instr, self._error = instr, error
        self._op_mask, self._token_mask = op_mask, token_mask
        self._wait_shift, self._signal_shift, self._layer_shift = wait_shift, signal_shift, layer_shift
        self._max_layers = max_layers

    def encode(self, instrs):
        """int32 ('<i4') words of a sequence of instructions; `IsaError` for a layer out
        of range, a missing field, or (after the whole stream) a value that does not fit
        in 32 bits. Extra entries in an instruction's args are ignored."""
        cdef Py_ssize_t n = len(instrs), pos = 0, f, nf
        out_arr = np.empty(n * (1 + self._max_fields), dtype="<i4")
        cdef int32_t[::1] out = out_arr
        cdef int code
        cdef int64_t value, layer, wait, signal
        cdef uint32_t header
        cdef bint overflow = False
        cdef tuple names
        cdef dict args
        cdef PyObject *item
        for ins in instrs:
            op = ins.op
            code = op
            if not 0 <= code < NCODES or self._nfields[code] < 0:
                raise KeyError(op)
            names = <tuple>self._fields[code]
            nf = self._nfields[code]
            py_layer = ins.layer
            if not 0 <= py_layer < self._max_layers:
                raise self._error(f"layer index {py_layer} out of range")
            layer = py_layer
            wait = ins.wait & self._token_mask
            signal = ins.signal & self._token_mask
            header = <uint32_t>code | <uint32_t>wait << self._wait_shift | <uint32_t>signal << self._signal_shift | \
                <uint32_t>layer << self._layer_shift
            out[pos] = <int32_t>header
            args = ins.args
            for f in range(nf):
                item = PyDict_GetItem(args, names[f])
                if item is NULL:
                    raise self._error(f"{self._ops[code].name}: missing field {names[f]}")
                v = <object>item
                if type(v) is not int:
                    v = int(v)
                try:
                    value = v
                except OverflowError:
                    overflow = True
                    value = 0
                if value < -2147483648 or value > 2147483647:
                    overflow = True
                out[pos + 1 + f] = <int32_t>value
            pos += 1 + nf
        if overflow:
            raise self._error("an instruction field does not fit in 32 bits")
        return out_arr[:pos].copy()

    def decode(self, code):
        """Instructions from int32 words (`encode`'s inverse); `IsaError` for an unknown
        opcode or a stream that ends inside an instruction."""
        words_arr = np.ascontiguousarray(code, dtype="<i4").reshape(-1)
        cdef const int32_t[::1] words = words_arr
        cdef Py_ssize_t i = 0, n = words.shape[0], f, nf
        cdef uint32_t header
        cdef int opcode
        cdef tuple names
        cdef dict args
        cdef list out = []
        instr = self._instr
        while i < n:
            header = <uint32_t>words[i]
            opcode = header & self._op_mask
            nf = self._nfields[opcode]
            if nf < 0:
                raise self._error(f"unknown opcode 0x{header & self._op_mask:02x} at word {i}")
            op = self._ops[opcode]
            if i + 1 + nf > n:
                raise self._error(f"instruction {op.name} at word {i} is cut short")
            names = <tuple>self._fields[opcode]
            args = {}
            for f in range(nf):
                PyDict_SetItem(args, names[f], <int>words[i + 1 + f])
            out.append(instr(op, args, (header >> self._wait_shift) & self._token_mask,
                             (header >> self._signal_shift) & self._token_mask, header >> self._layer_shift))
            i += 1 + nf
        return out
