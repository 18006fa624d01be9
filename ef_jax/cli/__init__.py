"""The `ef-jax` command line, one module per command group; every module is a thin shell over the Python API.

commands.py (the parser, dispatch, info, trace) · generate.py · serve.py · sim.py · eval_policy.py · bench.py ·
plot.py (plot-timeline) · hybrid.py
(record, train-hybrid) · predict.py (train-predictor, eval-predictor) · convert.py (convert, and the
--expert-dtype/--group-size load flags every loading command shares) · devices.py (--devices, --step) · model.py (the
checkpoint argument, budgets, preflight) · guards.py (input/output checks, UsageError) · stream.py (text stream,
spinner) · support.py (the support table's flag names). Commands import jax lazily, so `ef-jax --help`
answers without it.
"""
# Imported now, not lazily: a submodule sharing a name with a function would rebind the attribute when imported; importing
# the commands module now keeps `ef_jax.cli.main` the function. It imports no jax.
from ef_jax.cli.commands import build_parser, main  # noqa: E402

__all__ = ["build_parser", "main"]
