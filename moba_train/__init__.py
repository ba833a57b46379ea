"""moba-train: distributed long-context pretraining with MoBA (Mixture of Block Attention)."""

__version__ = "0.1.0"
