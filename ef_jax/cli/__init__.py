"""The `ef-jax` command line, one module per command group; every module is a thin shell over the Python API.

commands.py (the parser, dispatch, info, trace) · generate.py · serve.py · sim.py · eval_policy.py · hybrid.py
(record, train-hybrid) · predict.py (train-predictor, eval-predictor) · convert.py (convert, and the
--expert-dtype/--group-size load flags every loading command shares) · devices.py (--devices) · model.py (the
checkpoint argument, budgets, preflight) · guards.py (input/output checks, UsageError) · stream.py (text stream,
spinner). Names import lazily, so `ef-jax --help` answers without jax.
"""
from ef_jax.lazy import lazy_exports

_EXPORTS = {"main": "ef_jax.cli.commands", "build_parser": "ef_jax.cli.commands"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, globals(), _EXPORTS)
