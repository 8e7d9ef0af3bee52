"""The command line (``python -m gmp_ext``): diagnostics (``info.py``), the recipe tools and the
demo (``demo.py``, a CIFAR-10 run that needs torchvision)."""
