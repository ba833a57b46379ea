from moba_train.eval.needle import Answer, evaluate_needles, summarize

__all__ = ["Answer", "evaluate_needles", "summarize"]
