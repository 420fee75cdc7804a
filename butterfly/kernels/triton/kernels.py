"""Triton kernels of the BFT operator (the launch code is in :mod:`butterfly.kernels.triton.bft`).

A program owns a tile of ``BP`` pixels x all ``NP`` channels of a square block and keeps it on chip
across every stage: the input is read once and the output written once.

Triton tensor dimensions must be powers of two, so a stage of radix ``k`` runs as a stage of radix
``K = next_pow2(k)``: the tile holds the channel index in *padded digits* (digit ``s`` in
``[0, K_s)``, the last stage's digit least significant, ``NP = prod K_s``). Positions whose digit is
``>= k_s`` hold zeros and get zero weights, so they never reach a real channel. For power-of-two
radices the padded layout is the real one and ``PADDED`` is off.

The plan's radices arrive packed into two integers (so the launch only passes scalars):
``RAD`` holds ``k_s`` in bits ``5s..5s+4`` and ``KLOG`` holds ``log2 K_s`` in bits ``3s..3s+2``.
``N`` is the real size ``prod k_s``.
"""
import triton
import triton.language as tl

# triton >= 3.5 exports it at the top, 3.4 in triton.language
_constexpr_function = getattr(triton, "constexpr_function", None) or tl.constexpr_function


@triton.jit
def _real_index(idx, RAD: tl.constexpr, KLOG: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr):
    """Mixed-radix value of the padded digits ``LO..HI-1`` of ``idx`` (digit ``HI-1`` least
    significant) and whether every digit is below its real radix."""
    real = idx * 0
    valid = idx >= 0
    mult = idx * 0 + 1
    for i in tl.static_range(HI - LO):
        d = idx & ((1 << _klog(KLOG, HI - 1 - i)) - 1)
        idx = idx >> _klog(KLOG, HI - 1 - i)
        real += d * mult
        valid = valid & (d < _radix(RAD, HI - 1 - i))
        mult = mult * _radix(RAD, HI - 1 - i)
    return real, valid


@triton.jit
def _channels(NP: tl.constexpr, M, RAD: tl.constexpr, KLOG: tl.constexpr, L: tl.constexpr,
              PADDED: tl.constexpr):
    """Real channel of each tile row and whether it is one of the block's ``M`` channels."""
    q = tl.arange(0, NP)
    if PADDED:
        c, valid = _real_index(q, RAD, KLOG, 0, L)
        return c, valid & (c < M)
    return q, q < M


@_constexpr_function
def _radix(RAD, S):
    return (RAD >> (5 * S)) & 31


@_constexpr_function
def _klog(KLOG, S):
    return (KLOG >> (3 * S)) & 7


@_constexpr_function
def _prefix_log(KLOG, S):
    """log2 of the padded segment count ``A`` of stage ``S``: ``sum log2 K_u, u < S``."""
    return sum((KLOG >> (3 * u)) & 7 for u in range(S))


@_constexpr_function
def _stage_offset(RAD, S, N):
    """Offset of stage ``S`` in a block's weight row: ``N * (k_0 + .. + k_{S-1})``."""
    return N * sum((RAD >> (5 * u)) & 31 for u in range(S))


@_constexpr_function
def _real_stride(RAD, S, L):
    """Real stride ``t_S = k_{S+1} * .. * k_{L-1}``."""
    t = 1
    for u in range(S + 1, L):
        t *= (RAD >> (5 * u)) & 31
    return t


@_constexpr_function
def _bitrev(p, bits):
    return int(format(p, f"0{bits}b")[::-1], 2) if bits else 0


@triton.jit
def _weight_offsets(RAD: tl.constexpr, KLOG: tl.constexpr, L: tl.constexpr, S: tl.constexpr,
                    NP: tl.constexpr, N: tl.constexpr, PADDED: tl.constexpr):
    """Offsets ``[A, TT]`` (within a block's weight row) of ``w_S[g, 0, 0]`` for every padded
    segment ``a`` and remainder ``r``, and which of them are real groups."""
    A: tl.constexpr = 1 << _prefix_log(KLOG, S)
    TT: tl.constexpr = NP // (A << _klog(KLOG, S))
    a = tl.arange(0, A)[:, None]
    r = tl.arange(0, TT)[None, :]
    k: tl.constexpr = _radix(RAD, S)
    if PADDED:
        seg, va = _real_index(a, RAD, KLOG, 0, S)
        rr, vr = _real_index(r, RAD, KLOG, S + 1, L)
        return _stage_offset(RAD, S, N) + (seg * _real_stride(RAD, S, L) + rr) * (k * k), va & vr
    return _stage_offset(RAD, S, N) + (a * TT + r) * (k * k), (a < A) & (r < TT)


@triton.jit
def _split(z, KLOG: tl.constexpr, S: tl.constexpr, NP: tl.constexpr, BP: tl.constexpr):
    """``[BP, NP]`` tile -> tuple of ``K`` tensors ``[BP, A, TT]``: entry ``p`` holds the
    stage's input ``j = bitrev(p)`` of every group."""
    E: tl.constexpr = _klog(KLOG, S)
    A: tl.constexpr = 1 << _prefix_log(KLOG, S)
    TT: tl.constexpr = NP // (A << E)
    parts = (tl.reshape(tl.permute(tl.reshape(z, [BP, A, 1 << E, TT]), [0, 1, 3, 2]),
                        [BP, A, TT, 1 << E]),)
    for level in tl.static_range(E):
        new = ()
        for p in tl.static_range(1 << level):
            lo, hi = tl.split(tl.reshape(parts[p], [BP, A, TT, 1 << (E - level - 1), 2]))
            new = new + (lo, hi)
        parts = new
    out = ()
    for p in tl.static_range(1 << E):
        out = out + (tl.reshape(parts[p], [BP, A, TT]),)
    return out


@triton.jit
def _join(parts, KLOG: tl.constexpr, S: tl.constexpr, NP: tl.constexpr, BP: tl.constexpr):
    """Inverse of :func:`_split`."""
    E: tl.constexpr = _klog(KLOG, S)
    A: tl.constexpr = 1 << _prefix_log(KLOG, S)
    TT: tl.constexpr = NP // (A << E)
    for i in tl.static_range(E):
        new = ()
        for p in tl.static_range(1 << (E - 1 - i)):
            new = new + (tl.reshape(tl.join(parts[2 * p], parts[2 * p + 1]),
                                    [BP, A, TT, 2 << i]),)
        parts = new
    return tl.reshape(tl.permute(parts[0], [0, 1, 3, 2]), [BP, NP])


@_constexpr_function
def _weight_piece(p, q, E, TRANSPOSE):
    """Entry of :func:`_pieces` (a stage's ``K x K`` weights, ``K = 2**E``, loaded row-major)
    that split output ``p`` takes from split input ``q``: weight ``(bitrev p, bitrev q)``, or
    ``(bitrev q, bitrev p)`` for the transposed stage."""
    def rev(v, bits):
        return int(format(v, f"0{bits}b")[::-1], 2) if bits else 0
    i, j = (rev(q, E), rev(p, E)) if TRANSPOSE else (rev(p, E), rev(q, E))
    return rev((i << E) + j, 2 * E)


@triton.jit
def _pieces(v, E2: tl.constexpr):
    """``[A, TT, 2**E2]`` -> tuple of ``2**E2`` tensors ``[A, TT]``; entry ``p`` is element
    ``bitrev(p, E2)`` of the last dimension."""
    A: tl.constexpr = v.shape[0]
    TT: tl.constexpr = v.shape[1]
    parts = (v,)
    for level in tl.static_range(E2):
        new = ()
        for p in tl.static_range(1 << level):
            lo, hi = tl.split(tl.reshape(parts[p], [A, TT, 1 << (E2 - level - 1), 2]))
            new = new + (lo, hi)
        parts = new
    out = ()
    for p in tl.static_range(1 << E2):
        out = out + (tl.reshape(parts[p], [A, TT]),)
    return out


@triton.jit
def _weight(w_ptr, offs, wmask, p: tl.constexpr, q: tl.constexpr, E: tl.constexpr,
            k: tl.constexpr, TRANSPOSE: tl.constexpr):
    """The ``[A, TT]`` weights that split output ``p`` takes from split input ``q``."""
    if TRANSPOSE:
        w = tl.load(w_ptr + offs + _bitrev(q, E) * k + _bitrev(p, E), mask=wmask, other=0.0,
                    eviction_policy="evict_last")
    else:
        w = tl.load(w_ptr + offs + _bitrev(p, E) * k + _bitrev(q, E), mask=wmask, other=0.0,
                    eviction_policy="evict_last")
    return w


@triton.jit
def _mix(xs, w_ptr, offs, wmask, RAD: tl.constexpr, KLOG: tl.constexpr, S: tl.constexpr,
         TRANSPOSE: tl.constexpr, THREADS: tl.constexpr):
    """``y_i = sum_j w[g, i, j] x_j`` (or ``y_j = sum_i w[g, i, j] x_i``) on split tensors.
    Padding rows and columns (``i`` or ``j >= k``) are skipped at compile time. A sum starts
    from its first term, not from ``x * 0`` (NaN for an infinite ``x``)."""
    E: tl.constexpr = _klog(KLOG, S)
    K: tl.constexpr = 1 << E
    k: tl.constexpr = _radix(RAD, S)
    ys = ()
    if k == K and xs[0].shape[1] * xs[0].shape[2] * K * K >= THREADS:
        # One load of the stage's weights, [A, TT, K*K] (a group's K x K block is contiguous in
        # memory), spread over the program's threads: coalesced and vectorised. The compiler
        # hands each thread the pieces it multiplies through shared memory; the transposed
        # stage picks the transposed pieces. (A stage with fewer weights than the program has
        # threads takes the branch below: each thread loads the few weights it needs.)
        e = tl.arange(0, K * K)
        w = tl.load(w_ptr + offs[:, :, None] + e[None, None, :], mask=wmask[:, :, None],
                    other=0.0, eviction_policy="evict_last")
        ws = _pieces(w.to(xs[0].dtype), 2 * E)
        for p in tl.static_range(K):
            y = ws[_weight_piece(p, 0, E, TRANSPOSE)][None] * xs[0]
            for q in tl.static_range(1, K):
                y += ws[_weight_piece(p, q, E, TRANSPOSE)][None] * xs[q]
            ys = ys + (y,)
    else:
        # A padded radix (a group's k x k block does not fill the K x K piece grid) or a small
        # stage: each real weight is loaded as its own [A, TT] piece (k * k loads, none for
        # padding).
        for p in tl.static_range(K):
            if _bitrev(p, E) < k:
                y = _weight(w_ptr, offs, wmask, p, 0, E, k, TRANSPOSE).to(xs[0].dtype)[None] \
                    * xs[0]
                for q in tl.static_range(1, K):
                    if _bitrev(q, E) < k:
                        y += _weight(w_ptr, offs, wmask, p, q, E, k,
                                     TRANSPOSE).to(xs[0].dtype)[None] * xs[q]
            else:
                y = tl.zeros_like(xs[p])
            ys = ys + (y,)
    return ys


@triton.jit
def _stage(z, w_ptr, RAD: tl.constexpr, KLOG: tl.constexpr, L: tl.constexpr, S: tl.constexpr,
           NP: tl.constexpr, N: tl.constexpr, BP: tl.constexpr, PADDED: tl.constexpr,
           TRANSPOSE: tl.constexpr, THREADS: tl.constexpr):
    """Stage ``S`` on a ``[BP, NP]`` tile: ``out[c_i] = sum_j w[g, i, j] in[c_j]``, or the
    transposed stage ``out[c_j] = sum_i w[g, i, j] in[c_i]``."""
    offs, wmask = _weight_offsets(RAD, KLOG, L, S, NP, N, PADDED)
    xs = _split(z, KLOG, S, NP, BP)
    return _join(_mix(xs, w_ptr, offs, wmask, RAD, KLOG, S, TRANSPOSE, THREADS), KLOG, S, NP,
                 BP)


@triton.jit
def _butterfly(z, w_ptr, RAD: tl.constexpr, KLOG: tl.constexpr, L: tl.constexpr,
               NP: tl.constexpr, N: tl.constexpr, BP: tl.constexpr, PADDED: tl.constexpr,
               TRANSPOSE: tl.constexpr, THREADS: tl.constexpr):
    """All stages of one block (in reverse order, transposed, for ``TRANSPOSE``)."""
    for i in tl.static_range(L):
        if TRANSPOSE:
            z = _stage(z, w_ptr, RAD, KLOG, L, L - 1 - i, NP, N, BP, PADDED, TRANSPOSE, THREADS)
        else:
            z = _stage(z, w_ptr, RAD, KLOG, L, i, NP, N, BP, PADDED, TRANSPOSE, THREADS)
    return z


@triton.jit
def _acc(v, F64: tl.constexpr):
    """Accumulation dtype: float64 for float64 operands, float32 for every other dtype."""
    # One return per function: the compiler types every return statement it reaches, an early
    # return inside a constexpr branch included.
    if F64:
        r = v.to(tl.float64)
    else:
        r = v.to(tl.float32)
    return r


@triton.jit
def _tile_offsets(pid_p, pid_b, c, NPIX, C, BP: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """Element offsets ``[BP, NP]`` of channels ``c`` for this program's pixels, and the pixel
    mask. NCHW (``CHANNELS_LAST`` off): pixels of image ``pid_b`` are contiguous, ``NPIX = P``.
    Channels-last: rows of ``C`` contiguous channels, ``NPIX`` rows."""
    pix = pid_p * BP + tl.arange(0, BP)
    if CHANNELS_LAST:
        offs = pix.to(tl.int64)[:, None] * C + c[None, :]
    else:
        pix = tl.max_contiguous(tl.multiple_of(pix, BP), BP)
        offs = pid_b.to(tl.int64) * C * NPIX + pix[:, None] + c[None, :].to(tl.int64) * NPIX
    return offs, (pix < NPIX)[:, None]


@triton.jit
def _clamp(v, LO: tl.constexpr, HI: tl.constexpr):
    """``min(max(v, LO), HI)`` that keeps NaN (as ``torch.clamp`` does)."""
    return tl.where(v < LO, LO, tl.where(v > HI, HI, v))


@triton.jit
def _epilogue(z, ch, cmask, add_ptr, offs, off, mask, scale_ptr, shift_ptr,
              HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, ACT: tl.constexpr,
              HAS_ADD: tl.constexpr):
    """``act(z * scale[ch] + shift[ch]) + add[offs]`` in ``z``'s (compute) dtype, each step only
    when its flag is on. ``ch`` (``[NP]``, valid where ``cmask``): the output channel of each tile
    column; ``offs + off``/``mask``: the output's element offsets. ``ACT``: 0 none, 1 relu, 2 relu6,
    3 hardswish, 4 hardsigmoid (``hardswish(v) = v * min(max(v + 3, 0), 6) / 6``)."""
    if HAS_SCALE:
        z = z * tl.load(scale_ptr + ch, mask=cmask, other=0.0,
                        eviction_policy="evict_last").to(z.dtype)[None, :]
    if HAS_SHIFT:
        z = z + tl.load(shift_ptr + ch, mask=cmask, other=0.0,
                        eviction_policy="evict_last").to(z.dtype)[None, :]
    if ACT == 1:
        z = tl.where(z < 0, 0.0, z)
    elif ACT == 2:
        z = _clamp(z, 0.0, 6.0)
    elif ACT == 3:
        z = z * _clamp(z + 3.0, 0.0, 6.0) / 6.0
    elif ACT == 4:
        z = _clamp(z + 3.0, 0.0, 6.0) / 6.0
    if HAS_ADD:
        z = z + tl.load(add_ptr + offs + off, mask=mask, other=0.0).to(z.dtype)
    return z


@triton.jit
def bft_kernel(src_ptr, w_ptr, dst_ptr, scale_ptr, shift_ptr, add_ptr, NPIX, TILES_PER_IMG,
               C_SRC, C_DST, M, T, W,
               RAD: tl.constexpr, KLOG: tl.constexpr, L: tl.constexpr, NP: tl.constexpr,
               N: tl.constexpr, BP: tl.constexpr, PADDED: tl.constexpr,
               CHANNELS_LAST: tl.constexpr, EXPAND: tl.constexpr, TRANSPOSE: tl.constexpr,
               RESIDUAL: tl.constexpr, F64: tl.constexpr, HAS_SCALE: tl.constexpr,
               HAS_SHIFT: tl.constexpr, ACT: tl.constexpr, HAS_ADD: tl.constexpr,
               ALIGN: tl.constexpr, THREADS: tl.constexpr):
    """``dst = BFT(src)`` for ``T`` blocks of ``M`` channels; with ``TRANSPOSE``, the input
    gradient. ``EXPAND``: every block reads channels ``0..M`` of ``src`` and writes channels
    ``t*M..t*M+M`` of ``dst``; otherwise block ``t`` reads ``t*M..t*M+M`` and the blocks' outputs
    are summed into channels ``0..M``. The input is read once, the output written once.

    The epilogue (:func:`_epilogue`: per-channel ``scale``/``shift`` of ``C_DST`` values, the
    activation ``ACT``, ``add`` of ``dst``'s shape and layout) runs on the finished output in
    registers just before its store: per block for ``EXPAND``, once after the sum over blocks
    otherwise. With every flag off (the pointers are then unused) it compiles to nothing.

    ``ALIGN`` (a power of two) divides the stride between a tile's rows: ``NPIX`` for NCHW,
    ``C_SRC`` and ``C_DST`` for channels-last. It lets the compiler vectorise the tile's loads and
    stores when the stride is a multiple of 4 or 8 but not of 16 (14x14 images, 232 channels),
    which the launch's own specialisation (multiples of 16) does not tell it."""
    pid_p = tl.program_id(0) % TILES_PER_IMG
    pid_b = tl.program_id(0) // TILES_PER_IMG
    if CHANNELS_LAST:  # the strides, with the alignment the compiler cannot see (ALIGN)
        C_SRC = C_SRC // ALIGN * ALIGN
        C_DST = C_DST // ALIGN * ALIGN
    else:
        NPIX = NPIX // ALIGN * ALIGN
    c, cvalid = _channels(NP, M, RAD, KLOG, L, PADDED)
    offs_src, pmask = _tile_offsets(pid_p, pid_b, c, NPIX, C_SRC, BP, CHANNELS_LAST)
    offs_dst, _ = _tile_offsets(pid_p, pid_b, c, NPIX, C_DST, BP, CHANNELS_LAST)
    if EXPAND:
        u = _acc(tl.load(src_ptr + offs_src, mask=pmask & cvalid[None, :], other=0.0), F64)
        for t in range(T):
            z = _butterfly(u, w_ptr + t * W, RAD, KLOG, L, NP, N, BP, PADDED, TRANSPOSE,
                           THREADS)
            if RESIDUAL:
                z += u
            cmask = cvalid & (t * M + c < C_DST)
            z = _epilogue(z, t * M + c, cmask, add_ptr, offs_dst,
                          t * M * (1 if CHANNELS_LAST else NPIX), pmask & cmask[None, :],
                          scale_ptr, shift_ptr, HAS_SCALE, HAS_SHIFT, ACT, HAS_ADD)
            tl.store(dst_ptr + offs_dst + t * M * (1 if CHANNELS_LAST else NPIX),
                     z.to(dst_ptr.dtype.element_ty), mask=pmask & cmask[None, :])
    else:
        acc = _acc(tl.zeros([BP, NP], tl.float32), F64)
        for t in range(T):
            cmask = cvalid & (t * M + c < C_SRC)
            u = _acc(tl.load(src_ptr + offs_src + t * M * (1 if CHANNELS_LAST else NPIX),
                             mask=pmask & cmask[None, :], other=0.0), F64)
            acc += _butterfly(u, w_ptr + t * W, RAD, KLOG, L, NP, N, BP, PADDED, TRANSPOSE,
                           THREADS)
            if RESIDUAL:
                acc += u
        acc = _epilogue(acc, c, cvalid, add_ptr, offs_dst, 0, pmask & cvalid[None, :],
                        scale_ptr, shift_ptr, HAS_SCALE, HAS_SHIFT, ACT, HAS_ADD)
        tl.store(dst_ptr + offs_dst, acc.to(dst_ptr.dtype.element_ty),
                 mask=pmask & cvalid[None, :])


@triton.jit
def _add_grads(acc, gs, xs, RAD: tl.constexpr, KLOG: tl.constexpr, S: tl.constexpr):
    """Stage ``S``'s weight-gradient accumulators plus this tile's terms: entry ``p * K + q``
    (``[BP, A, TT]``, one partial sum per pixel row of the tile) adds ``g_{bitrev p} *
    x_{bitrev q}``; padding entries stay zero. Elementwise: the sum over the tile's pixels is
    taken once, after the last tile (:func:`_store_grads`), so the loop has no reductions."""
    E: tl.constexpr = _klog(KLOG, S)
    k: tl.constexpr = _radix(RAD, S)
    out = ()
    for p in tl.static_range(1 << E):
        for q in tl.static_range(1 << E):
            if _bitrev(p, E) < k and _bitrev(q, E) < k:
                out = out + (acc[p * (1 << E) + q] + gs[p] * xs[q],)
            else:
                out = out + (acc[p * (1 << E) + q],)
    return out


@triton.jit
def _zero_grads(KLOG: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr, NP: tl.constexpr,
                BP: tl.constexpr, F64: tl.constexpr):
    """Weight-gradient accumulators of stages ``LO..HI-1``: per stage, ``K * K`` zero tensors
    ``[BP, A, TT]``."""
    accs = ()
    for s in tl.static_range(LO, HI):
        stage = ()
        for p in tl.static_range(1 << (2 * _klog(KLOG, s))):
            stage = stage + (_acc(tl.zeros([BP, 1 << _prefix_log(KLOG, s),
                                            NP >> (_prefix_log(KLOG, s) + _klog(KLOG, s))],
                                           tl.float32), F64),)
        accs = accs + (stage,)
    return accs


@triton.jit
def _store_grads(part_ptr, accs, RAD: tl.constexpr, KLOG: tl.constexpr, L: tl.constexpr,
                 LO: tl.constexpr, HI: tl.constexpr, NP: tl.constexpr, N: tl.constexpr,
                 PADDED: tl.constexpr):
    """Sums each accumulator over its pixel rows and stores the stages' partial gradients."""
    for s in tl.static_range(LO, HI):
        offs, wmask = _weight_offsets(RAD, KLOG, L, s, NP, N, PADDED)
        for p in tl.static_range(1 << _klog(KLOG, s)):
            for q in tl.static_range(1 << _klog(KLOG, s)):
                if _bitrev(p, _klog(KLOG, s)) < _radix(RAD, s):
                    if _bitrev(q, _klog(KLOG, s)) < _radix(RAD, s):
                        tl.store(part_ptr + offs + _bitrev(p, _klog(KLOG, s)) * _radix(RAD, s)
                                 + _bitrev(q, _klog(KLOG, s)),
                                 tl.sum(accs[s - LO][p * (1 << _klog(KLOG, s)) + q], axis=0),
                                 mask=wmask)


@triton.jit
def bft_wgrad_kernel(x_ptr, g_ptr, w_ptr, part_ptr, dx_ptr, NPIX, TILES_PER_IMG, NUM_TILES,
                     C_IN, C_OUT, M, W,
                     RAD: tl.constexpr, KLOG: tl.constexpr, L: tl.constexpr, NP: tl.constexpr,
                     N: tl.constexpr, BP: tl.constexpr, PADDED: tl.constexpr,
                     CHANNELS_LAST: tl.constexpr, EXPAND: tl.constexpr, RESIDUAL: tl.constexpr,
                     LO: tl.constexpr, HI: tl.constexpr, FUSE_DX: tl.constexpr,
                     F64: tl.constexpr, ALIGN: tl.constexpr, THREADS: tl.constexpr):
    """Weight gradient of stages ``LO..HI-1`` of block ``program_id(1)``.

    Program ``program_id(0)`` walks the pixel tiles ``pid, pid + G, ...``: it recomputes the
    stages' inputs on chip, back-propagates the output gradient through the stages and
    accumulates ``sum_p g_s[c_i] * a_s[c_j]`` in registers, then writes its partial sums to
    ``part[pid, t]`` (a second reduction sums them: deterministic, no atomics). Wide butterflies
    split their stages over several launches so that the accumulators fit in registers.
    ``FUSE_DX`` (single block, ``LO == 0``): also writes the input gradient ``dx``. ``ALIGN``: as
    in :func:`bft_kernel` (``C_IN``, ``C_OUT`` for channels-last)."""
    pid = tl.program_id(0)
    t = tl.program_id(1)
    if CHANNELS_LAST:  # ALIGN: as in bft_kernel
        C_IN = C_IN // ALIGN * ALIGN
        C_OUT = C_OUT // ALIGN * ALIGN
    else:
        NPIX = NPIX // ALIGN * ALIGN
    G = tl.num_programs(0)
    wt_ptr = w_ptr + t * W
    c, cvalid = _channels(NP, M, RAD, KLOG, L, PADDED)
    # Expand: every block reads x's first M channels and produces output channels t*M..;
    # contract: block t reads x's channels t*M.. and produces (a summand of) the whole output.
    if EXPAND:
        cx = c
        cg = t * M + c
    else:
        cx = t * M + c
        cg = c
    xmask = cvalid & (cx < C_IN)
    gmask = cvalid & (cg < C_OUT)
    accs = _zero_grads(KLOG, LO, HI, NP, BP, F64)
    for tile in range(pid, NUM_TILES, G):
        offs_x, pmask = _tile_offsets(tile % TILES_PER_IMG, tile // TILES_PER_IMG, cx, NPIX,
                                      C_IN, BP, CHANNELS_LAST)
        offs_g, _ = _tile_offsets(tile % TILES_PER_IMG, tile // TILES_PER_IMG, cg, NPIX,
                                  C_OUT, BP, CHANNELS_LAST)
        z = _acc(tl.load(x_ptr + offs_x, mask=pmask & xmask[None, :], other=0.0), F64)
        acts = ()  # the inputs of stages LO..HI-1
        for s in tl.static_range(HI):
            if s >= LO:
                acts = acts + (z,)
            if s < HI - 1:
                z = _stage(z, wt_ptr, RAD, KLOG, L, s, NP, N, BP, PADDED, False, THREADS)
        g0 = _acc(tl.load(g_ptr + offs_g, mask=pmask & gmask[None, :], other=0.0), F64)
        g = g0
        new_accs = ()
        for i in tl.static_range(L - LO):
            if L - 1 - i >= HI:
                g = _stage(g, wt_ptr, RAD, KLOG, L, L - 1 - i, NP, N, BP, PADDED, True, THREADS)
            else:
                gs = _split(g, KLOG, L - 1 - i, NP, BP)
                stage = _add_grads(accs[L - 1 - i - LO], gs,
                                   _split(acts[L - 1 - i - LO], KLOG, L - 1 - i, NP, BP),
                                   RAD, KLOG, L - 1 - i)
                new_accs = (stage,) + new_accs
                if FUSE_DX or L - 1 - i > LO:
                    offs, wmask = _weight_offsets(RAD, KLOG, L, L - 1 - i, NP, N, PADDED)
                    g = _join(_mix(gs, wt_ptr, offs, wmask, RAD, KLOG, L - 1 - i, True,
                                   THREADS), KLOG, L - 1 - i, NP, BP)
        accs = new_accs
        if FUSE_DX:
            if RESIDUAL:
                g += g0
            tl.store(dx_ptr + offs_x, g.to(dx_ptr.dtype.element_ty), mask=pmask & xmask[None, :])
    _store_grads(part_ptr + (pid * tl.num_programs(1) + t) * W, accs, RAD, KLOG, L, LO, HI, NP,
                 N, PADDED)
