# cython: boundscheck=False, wraparound=False, cdivision=True, language_level=3
"""Address allocation by liveness (SRAM tiles within a layer, DRAM tensors across layers).

Each request lives over [start, end] (inclusive instruction or layer indices) and needs
`size` units; two requests that are live at the same time never overlap. First fit in
order of start (larger first on ties), the way a linear-scan register allocator
assigns registers; reuse falls out of the live ranges: a tile loaded for the next
iteration while the current one is still read gets the other half of the buffer,
which is double buffering.
"""
import numpy as np
from libc.stdint cimport int8_t, int64_t


def allocate(int64_t[::1] starts, int64_t[::1] ends, int64_t[::1] sizes, long long capacity,
             long long align):
    """Offsets (int64 array) for each request, or -1 for those that do not fit in
    `capacity`; the second result is the peak address used."""
    cdef Py_ssize_t n = starts.shape[0], i, j, k, idx, nact = 0
    order = np.lexsort((-np.asarray(sizes), np.asarray(starts)))
    cdef int64_t[::1] o = order.astype(np.int64)
    offsets_arr = np.full(n, -1, dtype=np.int64)
    cdef int64_t[::1] offsets = offsets_arr
    # active allocations sorted by offset: parallel arrays
    act_off_arr = np.empty(n + 1, dtype=np.int64)
    act_end_arr = np.empty(n + 1, dtype=np.int64)
    act_size_arr = np.empty(n + 1, dtype=np.int64)
    cdef int64_t[::1] act_off = act_off_arr, act_end = act_end_arr, act_size = act_size_arr
    cdef long long size, pos, peak = 0, s
    for k in range(n):
        idx = o[k]
        s = starts[idx]
        # expire allocations whose live range ended before this one starts
        j = 0
        for i in range(nact):
            if act_end[i] >= s:
                act_off[j] = act_off[i]
                act_end[j] = act_end[i]
                act_size[j] = act_size[i]
                j += 1
        nact = j
        size = ((sizes[idx] + align - 1) // align) * align
        if size == 0:
            offsets[idx] = 0
            continue
        pos = 0
        i = 0
        while i < nact:
            if pos + size <= act_off[i]:
                break
            if act_off[i] + act_size[i] > pos:
                pos = act_off[i] + act_size[i]
                pos = ((pos + align - 1) // align) * align
            i += 1
        if pos + size > capacity:
            continue
        offsets[idx] = pos
        if pos + size > peak:
            peak = pos + size
        # insert at i keeping the order by offset
        j = nact
        while j > i:
            act_off[j] = act_off[j - 1]
            act_end[j] = act_end[j - 1]
            act_size[j] = act_size[j - 1]
            j -= 1
        act_off[i] = pos
        act_end[i] = ends[idx]
        act_size[i] = size
        nact += 1
    return offsets_arr, peak
