"""Cache-aware routing inside the device step equals the layer mode's host rule on the same logits and residency."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from ef_jax.cache.routing import cache_aware as host_cache_aware
from ef_jax.engine.programs.device_routing import cache_aware
from ef_jax.models.moe import Routing, route


@dataclasses.dataclass(frozen=True)
class Cfg:
    top_k: int = 3
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    topk_method: str = "greedy"
    n_group: int = 4
    topk_group: int = 2
    router_fp32_weight: bool = True


@pytest.mark.parametrize("cfg", [Cfg(), Cfg(norm_topk_prob=False, routed_scaling_factor=2.5,
                                             topk_method="group_limited_greedy")])
@pytest.mark.parametrize("tol", [0.0, 0.02, 0.2])
def test_device_rule_equals_the_host_rule(cfg, tol):
    rng = np.random.default_rng(0)
    N, D, E = 16, 8, 16
    x = rng.standard_normal((N, D)).astype(np.float32)
    router = rng.standard_normal((D, E)).astype(np.float32)
    r = route({"router": jnp.asarray(router)}, cfg, jnp.asarray(x))
    resident = rng.random(E) < 0.5
    real = np.ones(N, bool)
    real[-2:] = False
    got, changed = cache_aware(cfg, r, jnp.asarray(resident), tol, jnp.asarray(real))
    exp_e, exp_w, exp_changed = host_cache_aware(cfg, np.asarray(r.logits), np.asarray(r.experts), resident, tol,
                                                 rows=real)
    np.testing.assert_array_equal(np.asarray(got.experts), exp_e)
    np.testing.assert_array_equal(np.asarray(changed), exp_changed)
    w = np.asarray(got.weights)
    np.testing.assert_array_equal(w[~exp_changed], np.asarray(r.weights)[~exp_changed])  # bit for bit
    if exp_w is not None:
        np.testing.assert_allclose(w[exp_changed], exp_w[exp_changed], rtol=1e-6)
    assert (tol == 0) or exp_changed.any()
