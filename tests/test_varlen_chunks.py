"""The varlen baseline's chunking of the past pass (pure host logic, checked without a GPU)."""

import bisect
import random

from moba_train.ops.varlen import SEG_ROWS, _chunks


def test_chunks_cover_every_row_once_with_its_segment_keys_under_the_index_limit():
    rng = random.Random(0)
    for limit in (600, 2000):
        counts = [rng.choice([0, 0, 3, 40, 700, 2500]) for _ in range(60)]
        cu_q = [0]
        for c in counts:
            cu_q.append(cu_q[-1] + c)
        cu_k = [16 * i for i in range(len(counts) + 1)]
        covered = []
        for (r0, r1), (k0, k1), cq, ck, max_q in _chunks(cu_q, cu_k, limit):
            assert r1 - r0 + SEG_ROWS * (len(cq) - 1) <= limit  # FA2's 32-bit dq index term
            assert cq[0] == 0 and cq[-1] == r1 - r0 and ck[0] == 0 and ck[-1] == k1 - k0
            assert max_q == max(b - a for a, b in zip(cq, cq[1:]))
            for j in range(len(cq) - 1):
                for row in range(r0 + cq[j], r0 + cq[j + 1]):
                    seg = bisect.bisect_right(cu_q, row) - 1
                    assert (k0 + ck[j], k0 + ck[j + 1]) == (cu_k[seg], cu_k[seg + 1])
            covered.extend(range(r0, r1))
        assert covered == list(range(cu_q[-1]))
        assert max(counts) + SEG_ROWS > limit  # the case of a segment cut into pieces is exercised
