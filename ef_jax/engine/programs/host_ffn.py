"""The host's share of an offloaded MoE layer: experts computed where they live, on the CPU backend.

[routing sync point: host experts H, their tokens] → x [N, D] to the host → per host expert h:
  y += w_h · SwiGLU_h(x[idx_h])   (jitted on jax.devices("cpu"), reading the expert's pinned-host buffer; a
  quantized expert is dequantized inside) → y f32[N, D] → the device, once per layer → joins the layer's sum

Axes: N tokens of the layer, D model, F expert FFN width, n tokens routed to one host expert (padded to a
power of two: pad rows have weight 0 and index 0), B bytes of one quantized expert.

Every call is dispatched asynchronously: the jitted CPU programs run on the CPU client's own threads while the
host goes on to dispatch the device's share of the layer, so the two overlap; the device waits for y only in
the program that adds it (the next layer's attention).

The weights are read through a `HostWeights` accessor (one expert of one MoE layer as a flat buffer on the CPU
backend), so the pinned store's layout (ef_jax.engine.transfer.store) can change under it.
"""
from __future__ import annotations

import functools
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from ef_jax.quant import pool as qpool


def host_device():
    """The CPU backend's device: where host-computed experts run."""
    return jax.devices("cpu")[0]


class HostWeights(Protocol):
    """What the host FFN reads: one routed expert of MoE layer j on the CPU backend, as (rows, row): a host
    array [n, W] of flat experts and the row that is this one (float [3·D·F]: gate | up | down row-major; or,
    quantized, u8[B] in QuantExpertPool.leaves() order), or as ((gate [D, F], up [D, F], down [F, D]), 0)."""
    hidden: int
    ffn: int
    layout: tuple | None  # quant_layout() of quantized experts (None: float experts)

    def host_buffer(self, layer: int, expert: int) -> tuple[jax.Array | tuple, int]: ...


class StoreWeights:
    """HostWeights over an ExpertStore (one pinned [E, W] array per MoE layer, or mapped rows). On a CPU-only
    machine the store's device is the CPU device and its pinned_host layer arrays are passed as they are with
    the expert's row (the program slices the row and XLA reads the pinned memory in place: the in-program move
    to device memory compiles to nothing on CPU). On a GPU machine the arrays belong to the GPU's pinned host
    memory, which the CPU client cannot address: each host-computed expert's row is copied to the CPU backend
    once, on first use (a host memcpy of that expert only; a zero-copy view is owed, see docs/host_compute.md).
    Mapped stores: the row is read from the page cache at each use (nothing is held)."""

    def __init__(self, store):
        self.store = store
        self.hidden, self.ffn = store.hidden, store.ffn
        self.layout = quant_layout(store._like) if store.quantized else None
        self._cpu = host_device()
        self._same = store.device == self._cpu
        self._moved: dict[tuple[int, int], jax.Array] = {}

    def host_buffer(self, layer: int, expert: int) -> tuple[jax.Array, int]:
        st = self.store
        if not st.arrays:  # mapped: this expert's row from its file, [1, W]
            return jax.device_put(st.host_row(layer, expert)[None], self._cpu), 0
        if self._same:
            return st.arrays[layer], expert
        key = (layer, expert)
        if key not in self._moved:
            self._moved[key] = jax.device_put(st.host_row(layer, expert)[None], self._cpu)
        return self._moved[key], 0


def quant_layout(like) -> tuple:
    """A hashable description of one quantized expert's flat buffer: (bits, ((leaf, shape, dtype), ...)), from a
    QuantExpertPool of any number of experts."""
    return like.bits, tuple((name, tuple(a.shape[1:]), np.dtype(a.dtype).name) for name, a in like.leaves())


def unpack_matrices(flat: jax.Array, D: int, F: int, layout, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One expert's flat buffer → (gate [D, F], up [D, F], down [F, D]) in `dtype` (quantized: dequantized).
    layout: quant_layout() for a quantized expert's u8[B] buffer, None for a float [3·D·F] one."""
    if isinstance(flat, tuple):  # a store that keeps the three matrices apart (no slicing: no copies)
        return tuple(m.astype(dtype) for m in flat)
    if layout is None:  # XLA on CPU materialises each slice of the flat buffer before its matmul (a copy)
        g, u, d = flat[:D * F].reshape(D, F), flat[D * F:2 * D * F].reshape(D, F), flat[2 * D * F:].reshape(F, D)
        return g.astype(dtype), u.astype(dtype), d.astype(dtype)
    bits, specs = layout
    leaves, off = {}, 0
    for name, shape, dtype_name in specs:
        dt = jnp.dtype(dtype_name)
        n = int(np.prod(shape)) * dt.itemsize
        raw = flat[off:off + n]
        off += n
        leaves[name] = (raw if dt == jnp.uint8 else
                        jax.lax.bitcast_convert_type(raw.reshape(-1, dt.itemsize), dt)).reshape(shape)
    m = lambda k: qpool.dequantize(leaves[k], leaves[f"{k}_scale"], leaves.get(f"{k}_offset"), bits, dtype)
    return m("gate"), m("up"), m("down")


def _expert_add(y, x, rows, row, idx, w, *, D, F, layout):
    # the expert's row of a pinned_host [n, W] array is brought to device memory inside the program: on the CPU
    # backend the same memory, so XLA compiles the move to nothing and the matmuls read the pinned rows in place.
    # row is traced: one program serves every expert of every layer.
    if isinstance(rows, tuple):
        flat = tuple(jax.device_put(m, jax.memory.Space.Device) for m in rows)
    else:
        flat = jax.device_put(jax.lax.dynamic_slice_in_dim(rows, row, 1, axis=0)[0], jax.memory.Space.Device)
    g, u, d = unpack_matrices(flat, D, F, layout, x.dtype)
    xs = x[idx]                                                                   # [n, D]
    h = jax.nn.silu(xs @ g) * (xs @ u)                                            # [n, F]
    out = jnp.dot(h, d, preferred_element_type=jnp.float32) * w[:, None]         # f32[n, D]
    return y.at[idx].add(out)


# one program per (n bucket, D, F, dtype, quant layout); y is donated: the layer's sum is accumulated in place
expert_add = jax.jit(_expert_add, static_argnames=("D", "F", "layout"), donate_argnums=(0,))


def bucket_tokens(n: int) -> int:
    """Token rows per host expert call, padded to a power of two (few compiles), at least 2: XLA:CPU's
    one-row (matrix-vector) bf16 path measured 3–10× slower than its two-row one on the DeepSeek-V2-Lite expert
    (benchmarks/results/host_experts_cpu.md)."""
    return max(2, 1 << max(n - 1, 0).bit_length())


class HostFFN:
    """Dispatches a layer's host-computed experts on the CPU backend; `start` returns at once, `result` gives
    the f32[N, D] weighted sum (a CPU-backend array, still being computed until read)."""

    def __init__(self, weights: HostWeights):
        self.weights = weights
        self.cpu = host_device()
        self.calls = 0

    def start(self, layer: int, x: np.ndarray, pairs: dict[int, tuple[np.ndarray, np.ndarray]]) -> jax.Array:
        """x [N, D] (host numpy, the layer's normed MoE input); pairs: expert → (token indices i32[n], combine
        weights f32[n]). Returns y f32[N, D] on the CPU backend (async)."""
        W = self.weights
        put = lambda a: jax.device_put(a, self.cpu)
        xc = put(np.asarray(x))
        y = put(np.zeros((x.shape[0], W.hidden), np.float32))
        for e, (idx, w) in pairs.items():
            n = bucket_tokens(len(idx))
            pi = np.zeros(n, np.int32)
            pw = np.zeros(n, np.float32)
            pi[:len(idx)], pw[:len(idx)] = idx, w
            rows, row = W.host_buffer(layer, e)
            y = expert_add(y, xc, rows, np.int32(row), put(pi), put(pw), D=W.hidden, F=W.ffn,
                           layout=W.layout)
            self.calls += 1
        return y


def host_ffn_reference(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
    """Plain numpy SwiGLU of one expert (float64): x [n, D] → [n, D]."""
    x, g, u, d = (np.asarray(a, np.float64) for a in (x, gate, up, down))
    a = x @ g
    return ((a / (1 + np.exp(-a))) * (x @ u)) @ d


@jax.jit
def _join(h, y):
    """h [B, T, D] + the host's share f32[N, D], rounded to h's dtype as the device's own sum is."""
    return h + y.reshape(h.shape).astype(h.dtype)


class HostShare:
    """The offloaded source's host half: plans a layer's misses (ef_jax.cache.host_compute.plan_layer), starts
    the host experts on the CPU backend, and joins their sum on the device.

    Costs for `auto`: the virtual clock's state, or (wall clock) one host FFN and one expert copy timed at the
    first decision on this machine (host FFN time per token assumed flat: decode's few tokens)."""

    def __init__(self, store, timing, counters, mode: str = "auto"):
        self.store, self.timing, self.counters, self.mode = store, timing, counters, mode
        self.ffn = HostFFN(StoreWeights(store))
        self.expert_bytes = timing.expert_bytes if timing is not None else store.bytes_per_expert
        self._calibrated = None  # (copy_s, HostTiming) measured on this machine (wall clock)
        self.estimated_s = 0.0   # host time by the cost model (the wall clock does not wait on it)
        self.log: list[tuple] = []  # (MoE layer, loads, host, behind, fill, spare) (plan_layer)

    def plan(self, cache, clock, j: int, needed: np.ndarray, experts: np.ndarray, real: np.ndarray):
        """(device experts, host experts, host experts also copied behind, held prefetches to load now, spare idle
        copies) for layer j's needed experts (ef_jax.cache.host_compute.LayerPlan)."""
        from ef_jax.cache.host_compute import plan_layer, tokens_per_expert
        self._tokens = tokens_per_expert(experts[real])
        costs_for = lambda res: clock.costs(j, res) or self._wall_costs()
        plan = plan_layer(cache, j, [int(e) for e in needed], self._tokens, self.mode, costs_for, self.log)
        return (np.asarray(plan.device, np.int64), *plan[1:])

    def layer_s(self, host: list[int], experts: np.ndarray, real: np.ndarray) -> float:
        """The cost model's host time for these experts (the virtual clock charges it)."""
        from ef_jax.cache.host_compute import host_layer_s
        timing = self.timing.host if self.timing is not None else self._host_timing()
        s = host_layer_s(timing, self.expert_bytes, host, self._tokens)
        self.estimated_s += s
        return s

    def start(self, j: int, normed, routing, experts: np.ndarray, real: np.ndarray, host: list[int]):
        """Dispatches layer j's host experts (async). normed [N, D], routing's weights f32[N, K] on the device."""
        x, weights = self.counters.to_host("host_share", normed, routing.weights)
        pairs = {}
        for e in host:
            mask = (experts == e) & real[:, None]           # [N, K]
            idx = np.nonzero(mask.any(axis=1))[0].astype(np.int32)
            pairs[e] = (idx, (weights * mask).sum(axis=1)[idx].astype(np.float32))
        return self.ffn.start(j, x, pairs)

    def join(self, h, y):
        return _join(h, jax.device_put(y, self.store.device_sharding))

    def _host_timing(self):
        return self._calibrate()[1]

    def _wall_costs(self):
        from ef_jax.cache.host_compute import LayerCosts
        copy_s, host = self._calibrate()
        return LayerCosts(device_ready=0.0, copy_free=0.0, host_free=0.0, copy_s=copy_s, compute_s=0.0,
                          expert_bytes=self.expert_bytes, host=host)

    def _calibrate(self):
        """One expert copy and one 1-token host FFN, each timed (after a first call that compiles)."""
        if self._calibrated is None:
            import time
            from ef_jax.cache.host_compute import HostTiming
            D = self.store.hidden
            x = np.zeros((1, D), self.store.dtype if not self.store.quantized else np.float32)
            pairs = {0: (np.zeros(1, np.int32), np.ones(1, np.float32))}
            times = []
            for _ in range(2):
                t = time.perf_counter()
                jax.block_until_ready(self.ffn.start(0, x, pairs))
                times.append(time.perf_counter() - t)
            jax.block_until_ready(self.store.fetch(0, 0))
            t = time.perf_counter()
            jax.block_until_ready(self.store.fetch(0, 0))
            copy_s = time.perf_counter() - t
            self._calibrated = (copy_s, HostTiming(self.store.bytes_per_expert / times[-1], 0.0,
                                                   "measured at start on this machine"))
        return self._calibrated

    def stats(self) -> dict:
        out = {"host_calls": self.ffn.calls, "host_s_estimated": self.estimated_s}
        if self._calibrated is not None:
            out["host_calibration"] = {"copy_s": self._calibrated[0],
                                       "host_bytes_per_s": self._calibrated[1].bytes_per_s}
        return out
