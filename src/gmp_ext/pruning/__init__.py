"""Pruning a model: strategies (``strategies.py``: layer, global, N:M, each with its step
pattern), the eager prune step and the hooks that keep masks applied (``pruner.py``), and the
prepared, graph-capturable step (``plan.py``)."""
