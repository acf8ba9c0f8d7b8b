"""The Triton kernel behind `fold_kernel.fused_fold` (imported only where Triton is installed)."""

import triton
import triton.language as tl


# Only builtins and this module's own jit functions inside: they follow TRITON_INTERPRET as set when this module is
# imported (triton.language's jit helpers, e.g. tl.zeros and tl.sum, follow it as set when triton was imported).
@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def fold_kernel(
    w0_ptr, b_ptr, a_ptr, m_ptr, prev_ptr, w_ptr, OUT, IN,
    K: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_i = tl.program_id(0)
    pid_o = tl.program_id(1)
    layer = tl.program_id(2).to(tl.int64)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    in_o = offs_o < OUT
    in_i = offs_i < IN

    difference = tl.full([BLOCK_K], 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        m = tl.load(m_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        p = tl.load(prev_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        difference += tl.where(m == p, 0.0, 1.0)  # NaN in prev (never folded) always differs
    changed = tl.reduce(difference, 0, _maximum)  # 1.0 where any rank differs, as a float: masks broadcast it

    tile = (offs_o[:, None] * IN + offs_i[None, :]) + layer * OUT * IN
    in_tile = in_o[:, None] & in_i[None, :] & ((offs_o[:, None] * 0.0 + changed) > 0)
    w0 = tl.load(w0_ptr + tile, mask=in_tile, other=0.0)  # issued first: the one large read overlaps the product

    acc = tl.full([BLOCK_O, BLOCK_I], 0.0, tl.float32)
    b_base = b_ptr + layer * OUT * K
    a_base = a_ptr + layer * K * IN
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = (offs_k < K) & ((offs_k * 0.0 + changed) > 0)
        m = tl.load(m_ptr + offs_k, mask=offs_k < K, other=0.0)
        b = tl.load(b_base + offs_o[:, None] * K + offs_k[None, :], mask=in_o[:, None] & in_k[None, :], other=0.0)
        a = tl.load(a_base + offs_k[:, None] * IN + offs_i[None, :], mask=in_k[:, None] & in_i[None, :], other=0.0)
        acc += tl.dot(b * m[None, :].to(b.dtype), a)
    tl.store(w_ptr + tile, (acc + w0.to(tl.float32)).to(w_ptr.dtype.element_ty), mask=in_tile)
