from dataclasses import dataclass

CP_MODES = ("allgather", "ulysses")


@dataclass
class ParallelConfig:
    dp_shard: int = -1  # -1: fill with the ranks left after the other axes
    dp_replicate: int = 1
    cp: int = 1
    cp_mode: str = "allgather"  # allgather | ulysses
