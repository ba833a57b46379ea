"""MoBA gate reference: block means and the parameter-free top-k block selection.

Everything here works per document of a packed (varlen) batch; block indices are local to the document.
"""

import torch
from torch import Tensor

from moba_train.ops.offsets import host_offsets


def doc_spans(cu_seqlens: Tensor) -> list[tuple[int, int]]:
    """[(start, end)] token ranges of the non-empty documents of a packed batch."""
    cu = host_offsets(cu_seqlens)
    return [(start, end) for start, end in zip(cu[:-1], cu[1:]) if end > start]


def block_means(k: Tensor, block_size: int) -> Tensor:
    """Mean key of each block of one document: [L, H, D] -> [ceil(L/block_size), H, D] in fp32.

    The last block may be short; its mean is over the keys it has.
    """
    length, heads, dim = k.shape
    whole = length // block_size * block_size
    kf = k.float()
    # whole blocks and the short tail summed apart: padding to whole blocks would allocate block_size rows for a
    # document far shorter than a block (a valid input: it means full attention)
    sums = kf[:whole].view(-1, block_size, heads, dim).sum(1)
    if whole < length:
        sums = torch.cat([sums, kf[whole:].sum(0, keepdim=True)])
    counts = (length - block_size * torch.arange(sums.shape[0], device=k.device)).clamp(max=block_size).float()
    return sums / counts[:, None, None]


def pick_blocks(scores: Tensor, own: Tensor, top_k: int) -> Tensor:
    """The routing rule: scores [..., N] over blocks, own [...] the query's own block -> [..., min(top_k, N + 1)]
    long (more columns would only hold -1).

    Own block always (last column); the best `top_k - 1` blocks j < own by score; -1 where fewer exist.
    """
    n_blocks = scores.shape[-1]
    top_k = min(top_k, n_blocks + 1)
    own = own.expand(scores.shape[:-1])
    past = torch.arange(n_blocks, device=scores.device) < own[..., None]  # future blocks never compete
    scores = scores.masked_fill(~past, float("-inf"))
    idx = torch.full((*scores.shape[:-1], top_k), -1, dtype=torch.long, device=scores.device)
    n_pick = min(top_k - 1, n_blocks)
    if n_pick > 0:
        val, top = top_lower_on_ties(scores, n_pick)
        idx[..., :n_pick] = torch.where(val > float("-inf"), top, -1)
    idx[..., -1] = own
    return idx


def top_lower_on_ties(scores: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """`scores.topk(n)` over the last dim (fp32), with equal scores at the cut going to the lower block: the fused
    gates' rule (torch.topk leaves the order of ties open). Only rows with a tie across the cut are re-ranked, by an
    int64 key (order-preserving integer of the score, then the reversed position)."""
    n_blocks = scores.shape[-1]
    if n >= n_blocks:  # every block is in: no cut
        return scores.topk(n, dim=-1)
    val, top = scores.topk(n + 1, dim=-1)
    cut = (val[..., n - 1] == val[..., n]) & (val[..., n] > float("-inf"))
    val, top = val[..., :n].contiguous(), top[..., :n].contiguous()
    if bool(cut.any()):
        rows = cut.nonzero(as_tuple=True)
        tied = scores[rows]
        # + 0.0 turns -0.0 into +0.0, which the integer order would split
        bits = (tied.float() + 0.0).view(torch.int32).long()
        ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats count down as integers
        key = ordered * 2**32 + (n_blocks - 1 - torch.arange(n_blocks, device=scores.device))
        picked = key.topk(n, dim=-1).indices
        top[rows], val[rows] = picked, tied.gather(-1, picked)
    return val, top


def picked_table(idx: Tensor, n_blocks: int) -> Tensor:
    """[..., top_k] selected ids (each < n_blocks, or -1) -> [..., n_blocks + 1] bool; column n_blocks absorbs -1."""
    table = torch.zeros(*idx.shape[:-1], n_blocks + 1, dtype=torch.bool, device=idx.device)
    return table.scatter_(-1, torch.where(idx < 0, n_blocks, idx.long()), True)


@torch.no_grad()
def select_doc(q: Tensor, k: Tensor, block_size: int, top_k: int) -> Tensor:
    """Block selection for one document: q [L, Hq, D], k [L, Hkv, D] -> [L, Hq, min(top_k, blocks + 1)] int32.

    Indices are ascending, own block included, padded with -1 where fewer than top_k blocks exist.
    """
    length, hq, dim = q.shape
    hkv = k.shape[1]
    means = block_means(k, block_size)  # [nb, Hkv, D]
    n_blocks = means.shape[0]
    # each query head scores the means of its own KV head (GQA without copying K); fp32 even under autocast
    with torch.autocast(q.device.type, enabled=False):
        scores = torch.einsum("lkgd,nkd->lkgn", q.float().view(length, hkv, hq // hkv, dim), means)
    own = torch.arange(length, device=q.device) // block_size
    idx = pick_blocks(scores.reshape(length, hq, n_blocks), own[:, None], top_k)
    # canonical order: ascending block index, -1 (none) last
    key = torch.where(idx < 0, n_blocks, idx).sort(dim=-1).values
    return torch.where(key == n_blocks, -1, key).to(torch.int32)


def attended_share(length: int, block_size: int, top_k: int) -> float:
    """The fraction of a document's causal (query, key) pairs that MoBA attends: a query sees its own block up to
    itself and top_k - 1 earlier blocks (all of them while fewer exist), whatever the scores."""
    if length <= 0:
        return 1.0
    seen = 0
    for j, start in enumerate(range(0, length, block_size)):
        n = min(block_size, length - start)
        seen += n * (n + 1) // 2 + n * min(j, top_k - 1) * block_size
    return seen / (length * (length + 1) // 2)


def moba_select(q: Tensor, k: Tensor, cu_seqlens: Tensor, max_seqlen: int, block_size: int,
                top_k: int) -> Tensor:
    """Reference gate over a packed batch: [T, Hq, top_k] int32 block indices within each document."""
    out = torch.full((q.shape[0], q.shape[1], top_k), -1, device=q.device, dtype=torch.int32)
    for start, end in doc_spans(cu_seqlens):
        picked = select_doc(q[start:end], k[start:end], block_size, top_k)
        out[start:end, :, :picked.shape[-1]] = picked
    return out
