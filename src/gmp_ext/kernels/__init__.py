"""The kernel layer: tensors in, masks out, nothing about models.

``backends/`` (one module per device over the compiled ``gmp_ext._C`` and ``reference.py``, the
pure-PyTorch oracle), ``library.py`` (the ``torch.ops.gmp_ext`` operators), ``primitives.py``
(unchecked tensor-list calls), ``ops.py`` (the validated tensor API), ``engine.py`` (prepared
select -> build -> apply steps over backend jobs), ``layout.py`` (the C++ constants) and
``dtensors.py`` (DTensor helpers).
"""
