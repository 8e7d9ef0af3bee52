"""Pruning while training: the GMP controller (``controller.py``) and its options
(``config.py``), schedules (``schedule.py``: GMPSchedule and recipes; ``lr_schedule.py``),
checkpoints (``checkpoint.py``), checks of the run (``run_checks.py``), telemetry and plots."""
