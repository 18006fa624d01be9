"""generate_scheduled: route-aware batches of prompts give every prompt the tokens it gets in arrival order."""
import pytest

from ef_jax.sched.generate import generate_scheduled

PROMPTS = [[5, 17, 33, 2], [88, 3, 60, 12], [5, 17, 33, 9], [88, 3, 61, 12]]  # one length: one compilation


def test_route_schedule_keeps_every_prompts_tokens(tmp_path):
    pytest.importorskip("torch")
    import ef_jax
    from tests.hf_models import save_tiny
    save_tiny("mixtral-top2", str(tmp_path))
    model = ef_jax.load(str(tmp_path))
    arrival = generate_scheduled(model, PROMPTS, batch_size=2, schedule="arrival", max_new_tokens=3)
    route = generate_scheduled(model, PROMPTS, batch_size=2, schedule="route", max_new_tokens=3)
    assert arrival.stats["batches"] == [[0, 1], [2, 3]]
    assert sorted(i for b in route.stats["batches"] for i in b) == list(range(4))
    assert all(len(b) == 2 for b in route.stats["batches"])
    assert route.tokens == arrival.tokens and all(len(t) == 3 for t in route.tokens)
    via_generate = ef_jax.generate(model, PROMPTS, max_new_tokens=3, batch_size=2, schedule="route")
    assert via_generate.tokens == arrival.tokens and via_generate.stats["batches"] == route.stats["batches"]
    with pytest.raises(ValueError, match="schedule="):
        generate_scheduled(model, PROMPTS, batch_size=2, schedule="fastest")
