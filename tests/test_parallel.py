"""Context parallel + FSDP2 on 2 and 4 gloo processes equal one process (fp32): loss, gradients, grad norm."""

import socket

import torch.multiprocessing as mp

from dist_cp import spawn_main

TOL = 1e-5
HYBRID = ["moba", "full"]  # one MoBA and one full-attention layer in every case


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def case(dp, cp, mode, kinds=HYBRID, seq=48, **kw):
    return dict(dp=dp, cp=cp, mode=mode, kinds=kinds, seq=seq, backend="naive", block_size=4, top_k=3, dim=64,
                **kw)


def spawn(world, cases):
    mp.spawn(spawn_main, args=(world, free_port(), cases, TOL), nprocs=world, join=True)


def test_cp2_both_modes():
    spawn(2, [case(1, 2, "allgather"), case(1, 2, "ulysses"),
              case(1, 2, "allgather", kinds=["moba", "moba"], seq=64, ac="full"),
              case(1, 2, "ulysses", kinds=["full", "moba"], seq=64, ac="selective")])


def test_cp4_and_dp2_cp2():
    spawn(4, [case(1, 4, "allgather"), case(1, 4, "ulysses"), case(2, 2, "allgather"), case(2, 2, "ulysses"),
              case(2, 2, "allgather", replicate=2), case(4, 1, "allgather")])
