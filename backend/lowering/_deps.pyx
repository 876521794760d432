# cython: boundscheck=False, wraparound=False, cdivision=True, language_level=3
"""Dependency tokens from the memory each instruction touches.

For every instruction, in program order, the latest earlier instruction of each other
unit that wrote memory it reads or writes (RAW, WAW), or read memory it writes (WAR),
is a dependency; memory is tracked in lines (64 bytes, 16 accumulator words). Units run
their own instructions in order, so only the latest dependency per unit matters, and
only when it is later than the one the unit already waited for: that instruction pops
one token from the producer's unit, and the producer pushes one. The pushes and pops of
each pair of units are then matched first-in first-out, as the hardware queues are.
"""
import numpy as np
from libc.stdint cimport int8_t, int64_t

DEF NUNITS = 4


def insert_tokens(int8_t[::1] units, int64_t[::1] fp_instr, int8_t[::1] fp_mem,
                  int64_t[::1] fp_lo, int64_t[::1] fp_hi, int8_t[::1] fp_write,
                  int64_t[::1] mem_lines, int64_t[::1] mem_line_size):
    """(wait, signal) int8 masks per instruction. Footprints are sorted by instruction;
    [lo, hi) in units of each memory, mem_lines[m] lines of mem_line_size[m] units."""
    cdef Py_ssize_t n = units.shape[0], nf = fp_instr.shape[0], nmem = mem_lines.shape[0]
    cdef Py_ssize_t j, f, f0, f1, m, line, l0, l1, v
    cdef int u
    cdef long long w, r
    writers = [np.full(mem_lines[m], -1, dtype=np.int64) for m in range(nmem)]
    readers = [np.full((NUNITS, mem_lines[m]), -1, dtype=np.int64) for m in range(nmem)]
    cdef int64_t[::1] lw
    cdef int64_t[:, ::1] lr
    dep_arr = np.full((n, NUNITS), -1, dtype=np.int64)
    cdef int64_t[:, ::1] dep = dep_arr
    wait_arr = np.zeros(n, dtype=np.int8)
    signal_arr = np.zeros(n, dtype=np.int8)
    cdef int8_t[::1] wait = wait_arr, signal = signal_arr
    cdef long long[NUNITS][NUNITS] waited
    for v in range(NUNITS):
        for m in range(NUNITS):
            waited[v][m] = -1
    f = 0
    for j in range(n):
        u = units[j]
        f0 = f
        while f < nf and fp_instr[f] == j:
            f += 1
        f1 = f
        # hazards against earlier instructions of other units
        for f in range(f0, f1):
            m = fp_mem[f]
            lw = writers[m]
            lr = readers[m]
            l0 = fp_lo[f] // mem_line_size[m]
            l1 = (fp_hi[f] - 1) // mem_line_size[m]
            if l1 >= mem_lines[m]:
                l1 = mem_lines[m] - 1
            for line in range(l0, l1 + 1):
                w = lw[line]
                if w >= 0 and units[w] != u and w > dep[j, units[w]]:
                    dep[j, units[w]] = w
                if fp_write[f]:
                    for v in range(NUNITS):
                        if v != u:
                            r = lr[v, line]
                            if r > dep[j, v]:
                                dep[j, v] = r
        # record this instruction's accesses
        for f in range(f0, f1):
            m = fp_mem[f]
            lw = writers[m]
            lr = readers[m]
            l0 = fp_lo[f] // mem_line_size[m]
            l1 = (fp_hi[f] - 1) // mem_line_size[m]
            if l1 >= mem_lines[m]:
                l1 = mem_lines[m] - 1
            for line in range(l0, l1 + 1):
                if fp_write[f]:
                    lw[line] = j
                    for v in range(NUNITS):
                        lr[v, line] = -1
                else:
                    lr[u, line] = j
        f = f1
        for v in range(NUNITS):
            if v != u and dep[j, v] > waited[u][v]:
                waited[u][v] = dep[j, v]
                wait[j] |= <int8_t>(1 << v)
                signal[dep[j, v]] |= <int8_t>(1 << u)
    return wait_arr, signal_arr
