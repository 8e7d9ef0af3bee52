"""The model layer's base: which parameters of a model are pruned (``layers.py``: matmul
weights by layer type; ``parameters.py``: names, patterns, wrappers) and where their masks live
(``mask_store.py``)."""
