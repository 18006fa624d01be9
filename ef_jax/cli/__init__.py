"""The `ef-jax` command line, one module per command group; every module is a thin shell over the Python API.

main.py (the parser, dispatch, info, trace) · generate.py · serve.py · sim.py · eval_policy.py · hybrid.py
(record, train-hybrid) · predict.py (train-predictor, eval-predictor) · convert.py (convert, and the
--expert-dtype/--group-size load flags every loading command shares) · devices.py (--devices, --step) · model.py (the
checkpoint argument, budgets, preflight) · guards.py (input/output checks, UsageError) · stream.py (text stream,
spinner) · support.py (the support table's flag names). Commands import jax lazily, so `ef-jax --help`
answers without it.
"""
# Imported now, not lazily: the module ef_jax.cli.main shares the function's name, and importing the submodule
# later (`from ef_jax.cli.main import ...`) would rebind `ef_jax.cli.main` to the module. It imports no jax.
from ef_jax.cli.main import build_parser, main  # noqa: E402

__all__ = ["build_parser", "main"]
