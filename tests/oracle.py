"""Independent oracles: dense matrices built from the paper's definition, not from our operator."""
import math

import torch


def paper_butterfly(stage_weights, radices):
    """B(n) from the paper's recursion (eq. 3): block (i, j) is M_i D_ij, where D_ij is the diagonal
    of stage-0 weights [:, i, j] and M_i the butterfly of order n/k built from the later stages'
    groups that belong to part i."""
    if not radices:
        return torch.eye(1, dtype=torch.float64)
    k = radices[0]
    w0 = stage_weights[0]
    rows = []
    for i in range(k):
        sub = [w[i * (w.shape[0] // k):(i + 1) * (w.shape[0] // k)] for w in stage_weights[1:]]
        m_i = paper_butterfly(sub, radices[1:])
        rows.append(torch.cat([m_i @ torch.diag(w0[:, i, j]) for j in range(k)], dim=1))
    return torch.cat(rows, dim=0)


def split_stages(flat, radices):
    """Per-stage (n/k, k, k) views of one block's flat weights (the binding layout)."""
    n, out, offset = math.prod(radices), [], 0
    for k in radices:
        out.append(flat[offset:offset + n * k].reshape(n // k, k, k))
        offset += n * k
    return out


def paper_layer_matrix(layer):
    """The (out, in) matrix the paper's tiling rule gives for a BFT layer's weights."""
    plan = layer.plan
    m, T = plan.block, plan.num_blocks
    weights = layer.weight.detach().double().reshape(T, plan.weights_per_block)
    blocks = []
    for t in range(T):
        b = paper_butterfly(split_stages(weights[t], plan.radices), plan.radices)
        if layer.residual:
            b = b + torch.eye(plan.size, dtype=torch.float64)
        blocks.append(b[:m, :m])
    if plan.expand:
        return torch.cat(blocks, dim=0)[:plan.out_channels]
    return torch.cat(blocks, dim=1)[:, :plan.in_channels]


def hadamard(n):
    """Sylvester's Walsh-Hadamard matrix by Kronecker products."""
    h = torch.ones(1, 1, dtype=torch.float64)
    base = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(base, h)
    return h


# (in, out, base) of every shape class of the plan, for tests that sweep them all
SHAPE_CLASSES = {
    "square-power": (64, 64, 4),
    "square-base2": (32, 32, 2),
    "mixed-radix": (24, 24, 4),
    "base2-mixed": (96, 96, 2),
    "padded": (13, 13, 4),
    "expand": (16, 40, 4),
    "expand-padded": (13, 40, 4),
    "contract": (40, 16, 4),
    "contract-padded": (60, 31, 4),
}
