"""Stats never report a decode speed from steps that compiled: a run whose every decode step compiled says "n/a"
(tokens/s NaN) instead of a speed that timed the compiles; a run with compile-free steps reports theirs."""
import math

import jax

import ef_jax
from ef_jax.cli.generate import decode_speed, stats_line


def test_a_run_whose_decode_steps_all_compiled_reports_no_speed():
    model = ef_jax.load()
    jax.clear_caches()  # the one decode step below must compile (trace) again
    s = ef_jax.generate(model, [[5, 6, 7]], max_new_tokens=2).stats
    assert s["compile_s"] > 0 and s["decoded_tokens"] == 0 and math.isnan(s["tokens_per_s"])
    assert "decode n/a" in stats_line(s) and "tokens/s" not in stats_line(s)
    warm = ef_jax.generate(model, [[5, 6, 7]], max_new_tokens=4).stats  # same shapes: compiled already
    assert warm["decoded_tokens"] == 3 and warm["tokens_per_s"] > 0
    assert decode_speed(warm) == f"{warm['tokens_per_s']:.1f} tokens/s"
