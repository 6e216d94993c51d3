"""PIL's own arithmetic for six of RandAugment's ops, compiled by numba, for the fast
training path (:mod:`cait.data.randaugment` calls them).

- :func:`shift_rows`: PIL's bicubic ``AFFINE`` transform (``Geometry.c``) for a map that
  keeps every row where it is and reads row ``y`` at ``x_in = a0 (x + 0.5) + a1 (y + 0.5)
  + a2``: ``ShearX`` and ``TranslateX``; ``ShearY`` and ``TranslateY`` are the same map on
  the turned image. With the rows kept, PIL's 4 x 4 filter (a = -1) reduces to its 4-tap
  pass along the row (the pass down the column has ``dy = 0`` and returns its second tap
  unchanged).
- :func:`affine`: the same transform for any map, 4 x 4 taps: ``Rotate``.
- :func:`smooth_blend`: ``ImageEnhance.Sharpness``: PIL's ``SMOOTH`` 3 x 3 filter
  (``Filter.c``: float32, the kernel divided by 13, 0.5 added for rounding, the border
  copied), then ``Image.blend`` of the smoothed and the original image (``Blend.c``).

Each computes what PIL computes in the same precision and order (double for the
transforms, float32 for the filter and the blend), so the pixels are PIL's exactly; tests
hold them equal. The gain is the loops' form: PIL resamples pixel by pixel and band by band
through function pointers (2.3 ms for a 224 x 224 shear or turn on one core), where here
the runs of a row are loops over contiguous values that the compiler vectorises (about
0.2 ms for a shear, 1.1 ms for a turn, whose taps must be gathered first).

Without numba (the ``fast`` extra) :data:`AVAILABLE` is False, nothing here is compiled,
and the training transform keeps timm's PIL functions: the same pixels, slower. (The
kernels then run as plain Python, which gives the same pixels too, far too slowly for
training: a test runs them so.)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

try:
    import numba

    AVAILABLE = True
except ImportError:  # the ops keep timm's functions (cait.data.randaugment)
    AVAILABLE = False

__all__ = ["AVAILABLE", "BANDS", "affine", "shift_rows", "smooth_blend", "warm"]

# The kernels take RGB pixels, (H, W, 3).
BANDS = 3
# PIL's SMOOTH kernel (ImageFilter.SMOOTH): 1 around a 5 in the middle, divided by 13.
SMOOTH_SIDE, SMOOTH_MIDDLE, SMOOTH_SCALE = 1, 5, 13


def _cubic(v1: float, v2: float, v3: float, v4: float, d: float) -> float:
    """Geometry.c's ``BICUBIC`` (a = -1) at ``d`` past ``v2``, term for term."""
    p2 = -v1 + v3
    p3 = 2 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return v2 + d * (p2 + d * (p3 + d * p4))


def _to_uint8(v: float) -> np.uint8:
    """Clipped to 0..255 and truncated, as Geometry.c's uint8 bicubic filter stores it."""
    return np.uint8(int(min(max(v, 0.0), 255.0)))


def _row_sources(
    a0: float,
    a1_y: float,
    a2: float,
    frac: np.ndarray,
    first_tap: np.ndarray,
    inside: np.ndarray,
) -> None:
    """For each pixel ``x`` of a row, where Geometry.c's ``affine_transform`` reads it
    (``a0 (x + 0.5) + a1_y + a2``, ``a1_y`` the row's ``a1 (y + 0.5)``): whether inside the
    row, the first of its four taps (before clipping), and the distance past the second
    (``dx``), written into the three arrays."""
    w = inside.size
    for x in range(w):
        x_in = a0 * (x + 0.5) + a1_y + a2
        inside[x] = (x_in >= 0.0) & (x_in < w)
        xs = x_in - 0.5
        whole = np.floor(xs)
        frac[x] = xs - whole
        first_tap[x] = int(whole) - 1


def _longest_run(inside: np.ndarray, first_tap: np.ndarray) -> tuple[int, int, int]:
    """``(start, stop, shift)``: the first run of pixels whose four taps all lie inside
    the row at one shift (pixel ``x`` reads from ``x + shift``)."""
    w = inside.size
    start = 0
    while start < w and not (inside[start] and first_tap[start] >= 0):
        start += 1
    stop = start
    shift = first_tap[start] - start if start < w else 0
    while stop < w:
        k = first_tap[stop]
        if not inside[stop] or k - stop != shift or k + 3 > w - 1:
            break
        stop += 1
    return start, stop, shift


def _shift_rows(
    src: np.ndarray, a0: float, a1: float, a2: float, fill: np.ndarray, out: np.ndarray
) -> np.ndarray:
    """Each row of uint8 ``(H, W, 3)`` ``src`` resampled by PIL's bicubic at ``a0 (x + 0.5)
    + a1 (y + 0.5) + a2`` into ``out``; pixels whose source lies outside the row take
    ``fill``, as PIL's ``fillcolor``."""
    h, w, _ = src.shape
    n = w * BANDS  # a row's values
    frac_px = np.empty(w)  # by pixel: the distance past the second tap (Geometry.c's dx)
    first_tap = np.empty(w, np.int64)
    inside = np.empty(w, np.bool_)
    frac = np.empty(n)  # frac_px by value (each pixel's three alike)
    for y in range(h):
        _row_sources(a0, a1 * (y + 0.5), a2, frac_px, first_tap, inside)
        for x in range(w):
            for b in range(BANDS):
                frac[x * BANDS + b] = frac_px[x]
        start, stop, shift = _longest_run(inside, first_tap)
        # the run: contiguous reads, slices indexed from 0 (so that the compiler sees no
        # negative index and vectorises the loop)
        row, row_out = src[y].reshape(n), out[y].reshape(n)
        count, at = (stop - start) * BANDS, (start + shift) * BANDS
        t1, t2 = row[at : at + count], row[at + BANDS : at + BANDS + count]
        t3 = row[at + 2 * BANDS : at + 2 * BANDS + count]
        t4 = row[at + 3 * BANDS : at + 3 * BANDS + count]
        d_run = frac[start * BANDS : stop * BANDS]
        run_out = row_out[start * BANDS : stop * BANDS]
        for j in range(count):
            run_out[j] = _to_uint8(
                _cubic(float(t1[j]), float(t2[j]), float(t3[j]), float(t4[j]), d_run[j])
            )
        # either side of it: the fill, and pixels with a tap past an end (clipped, XCLIP)
        for i in range(w - (stop - start)):
            x = i if i < start else i + stop - start
            if not inside[x]:
                for b in range(BANDS):
                    row_out[x * BANDS + b] = fill[b]
                continue
            k = first_tap[x]
            x0, x1 = min(max(k, 0), w - 1) * BANDS, min(max(k + 1, 0), w - 1) * BANDS
            x2, x3 = min(max(k + 2, 0), w - 1) * BANDS, min(max(k + 3, 0), w - 1) * BANDS
            for b in range(BANDS):
                v1, v2 = float(row[x0 + b]), float(row[x1 + b])
                v3, v4 = float(row[x2 + b]), float(row[x3 + b])
                row_out[x * BANDS + b] = _to_uint8(_cubic(v1, v2, v3, v4, frac_px[x]))
    return out


def _tap(word: np.uint32, shift: np.uint32) -> float:
    """One band (``shift``: 0, 8 or 16) of a tap stored as an RGB word."""
    return float(word >> shift & np.uint32(255))


def _rgb_words(src: np.ndarray) -> np.ndarray:
    """Each pixel of uint8 ``(H, W, 3)`` ``src`` as one word, ``R | G << 8 | B << 16``, so
    that one load reads a tap's three bands."""
    h, w, _ = src.shape
    words = np.empty(h * w, np.uint32)
    flat = src.reshape(h * w * BANDS)
    for i in range(h * w):
        r, g, b = flat[BANDS * i], flat[BANDS * i + 1], flat[BANDS * i + 2]
        words[i] = np.uint32(r) | np.uint32(g) << np.uint32(8) | np.uint32(b) << np.uint32(16)
    return words


def _gather_taps(
    words: np.ndarray,
    h: int,
    w: int,
    y: int,
    matrix: tuple[float, float, float, float, float, float],
    taps: np.ndarray,
    dx: np.ndarray,
    dy: np.ndarray,
    inside: np.ndarray,
) -> None:
    """For each pixel of output row ``y``, where Geometry.c's ``affine_transform`` reads
    it: whether inside the image, its ``dx`` and ``dy``, and its 16 taps (``(16, W)``
    ``taps``, row k and column j at ``4 k + j``; past an edge, clipped to it as XCLIP and
    YCLIP), written into the arrays."""
    a0, a1, a2, a3, a4, a5 = matrix
    for x in range(w):
        x_in = a0 * (x + 0.5) + a1 * (y + 0.5) + a2
        y_in = a3 * (x + 0.5) + a4 * (y + 0.5) + a5
        inside[x] = (x_in >= 0.0) & (x_in < w) & (y_in >= 0.0) & (y_in < h)
        xs, ys = x_in - 0.5, y_in - 0.5
        fx, fy = np.floor(xs), np.floor(ys)
        dx[x], dy[x] = xs - fx, ys - fy
        left, top = int(fx) - 1, int(fy) - 1
        if left >= 0 and left + 3 < w and top >= 0 and top + 3 < h:
            at = np.uint64(top * w + left)  # unsigned: no negative-index branch
            for k in range(4):
                for j in range(4):
                    taps[4 * k + j, x] = words[at + np.uint64(j)]
                at += np.uint64(w)
        else:
            for k in range(4):
                row = min(max(top + k, 0), h - 1) * w
                for j in range(4):
                    taps[4 * k + j, x] = words[row + min(max(left + j, 0), w - 1)]


def _affine(
    src: np.ndarray,
    a0: float,
    a1: float,
    a2: float,
    a3: float,
    a4: float,
    a5: float,
    fill: np.ndarray,
    out: np.ndarray,
) -> np.ndarray:
    """PIL's bicubic ``AFFINE`` transform of uint8 ``(H, W, 3)`` ``src`` (``x_in = a0 (x +
    0.5) + a1 (y + 0.5) + a2``, ``y_in = a3 (x + 0.5) + a4 (y + 0.5) + a5``) into ``out``,
    ``fill`` where the source lies outside the image: ``Rotate``. Row by row, each pixel's
    16 taps are gathered first (a 32-bit word holds a tap's three bands), then the filter
    runs along the row band by band, vectorised."""
    h, w, _ = src.shape
    words = _rgb_words(src)
    taps = np.empty((16, w), np.uint32)  # a row's pixels' taps: row k, column j at 4 k + j
    dx, dy = np.empty(w), np.empty(w)  # Geometry.c's dx and dy
    inside = np.empty(w, np.bool_)
    plane = np.empty(w, np.uint8)  # one band of an output row
    for y in range(h):
        _gather_taps(words, h, w, y, (a0, a1, a2, a3, a4, a5), taps, dx, dy, inside)
        # each row of taps as its own 1-D view, indexed from 0 (vectorised, as above)
        q0, q1, q2, q3 = taps[0], taps[1], taps[2], taps[3]
        q4, q5, q6, q7 = taps[4], taps[5], taps[6], taps[7]
        q8, q9, q10, q11 = taps[8], taps[9], taps[10], taps[11]
        q12, q13, q14, q15 = taps[12], taps[13], taps[14], taps[15]
        out_row = out[y].reshape(w * BANDS)
        for band in range(BANDS):
            s, fill_band = np.uint32(8 * band), fill[band]
            for x in range(w):
                d = dx[x]
                v1 = _cubic(_tap(q0[x], s), _tap(q1[x], s), _tap(q2[x], s), _tap(q3[x], s), d)
                v2 = _cubic(_tap(q4[x], s), _tap(q5[x], s), _tap(q6[x], s), _tap(q7[x], s), d)
                v3 = _cubic(_tap(q8[x], s), _tap(q9[x], s), _tap(q10[x], s), _tap(q11[x], s), d)
                v4 = _cubic(_tap(q12[x], s), _tap(q13[x], s), _tap(q14[x], s), _tap(q15[x], s), d)
                value = _to_uint8(_cubic(v1, v2, v3, v4, dy[x]))
                plane[x] = value if inside[x] else fill_band
            for x in range(w):  # interleaved: kept out of the loop above, which it would stall
                out_row[BANDS * x + band] = plane[x]
    return out


def _smooth_blend(src: np.ndarray, alpha: np.float32, out: np.ndarray) -> np.ndarray:
    """``Image.blend(src.filter(SMOOTH), src, alpha)`` of uint8 ``(H, W, C)`` ``src`` into
    ``out``, ``alpha`` a float32 (PIL's C ``float``)."""
    h, w, c = src.shape
    side = np.float32(SMOOTH_SIDE) / np.float32(SMOOTH_SCALE)
    middle = np.float32(SMOOTH_MIDDLE) / np.float32(SMOOTH_SCALE)
    rounding = np.float32(0.5)
    smooth = src.copy()  # the border stays the image's (Filter.c copies it)
    if h >= 3 and w >= 3:  # smaller images are copied whole
        n, m = w * c, (w - 2) * c  # a row's values; those with a neighbour on each side
        for y in range(1, h - 1):
            # each row's three views, a pixel's neighbours c values apart (slices indexed
            # from 0, so that the compiler sees no negative index and vectorises the loop)
            below, here, above = src[y + 1].reshape(n), src[y].reshape(n), src[y - 1].reshape(n)
            b0, b1, b2 = below[:m], below[c : c + m], below[2 * c :]
            h0, h1, h2 = here[:m], here[c : c + m], here[2 * c :]
            a0, a1, a2 = above[:m], above[c : c + m], above[2 * c :]
            row_out = smooth[y].reshape(n)[c : c + m]
            for j in range(m):
                # Filter.c's KERNEL1x3 sums in float32, the row below first
                s = rounding
                s += (np.float32(b0[j]) * side + np.float32(b1[j]) * side) + np.float32(
                    b2[j]
                ) * side
                s += (np.float32(h0[j]) * side + np.float32(h1[j]) * middle) + np.float32(
                    h2[j]
                ) * side
                s += (np.float32(a0[j]) * side + np.float32(a1[j]) * side) + np.float32(
                    a2[j]
                ) * side
                row_out[j] = np.uint8(np.int32(min(max(s, np.float32(0.0)), np.float32(255.0))))
    if alpha == 0.0:  # Blend.c's shortcuts
        out[:] = smooth
        return out
    if alpha == 1.0:
        out[:] = src
        return out
    flat_s, flat_i, flat_o = smooth.reshape(-1), src.reshape(-1), out.reshape(-1)
    for j in range(flat_o.size):
        a, b = np.int32(flat_s[j]), np.int32(flat_i[j])
        v = np.float32(a) + alpha * np.float32(b - a)
        flat_o[j] = np.uint8(int(min(max(v, np.float32(0.0)), np.float32(255.0))))
    return out


def _compile(kernel: Callable) -> Callable:
    """``kernel`` compiled by numba on its first call, the machine code kept in numba's
    cache (beside this file, or the user's cache folder) for the next process; where no
    folder is writable, compiled in each process (a few seconds)."""
    try:
        return numba.njit(kernel, nogil=True, boundscheck=False, cache=True)
    except RuntimeError:  # numba found nowhere to keep its cache
        return numba.njit(kernel, nogil=True, boundscheck=False)


if AVAILABLE:
    # the helpers compiled in place (inlined into each kernel that calls them)
    _cubic = numba.njit(_cubic, inline="always")
    _to_uint8 = numba.njit(_to_uint8, inline="always")
    _tap = numba.njit(_tap, inline="always")
    _row_sources = numba.njit(_row_sources, inline="always")
    _longest_run = numba.njit(_longest_run, inline="always")
    _rgb_words = numba.njit(_rgb_words, inline="always")
    _gather_taps = numba.njit(_gather_taps, inline="always")
    shift_rows, affine = _compile(_shift_rows), _compile(_affine)
    smooth_blend = _compile(_smooth_blend)
else:
    shift_rows, affine, smooth_blend = _shift_rows, _affine, _smooth_blend


def warm() -> None:
    """Compile the kernels for the arrays the ops pass (a training transform calls this
    when it is built, so that loader workers forked after it start with them compiled)."""
    if not AVAILABLE:
        return
    img = np.zeros((4, 5, BANDS), dtype=np.uint8)
    img.flags.writeable = False  # as the ops pass them (np.asarray of a PIL image)
    fill = np.zeros(BANDS, dtype=np.uint8)
    shift_rows(img, 1.0, 0.1, 0.0, fill, np.empty_like(img))
    affine(img, 0.9, 0.1, 0.0, -0.1, 0.9, 0.0, fill, np.empty_like(img))
    smooth_blend(img, np.float32(1.5), np.empty_like(img))
