"""gpu_suite part "transfer": pinned H2D and HBM peaks, and whether expert copies overlap compute — by how they
are issued, including copies inside the one jitted program that computes.

[pinned_host buffers] → device_put (outside jit: before / after a compute dispatch, from a thread, one call)
                      → inside jit: device_put(x, device) of pinned_host arguments, written into a donated pool,
                        in the same program as the compute (and the variant reading a pinned [E, n] stack with
                        lax.dynamic_slice at device-computed offsets; and a copy-only program dispatched after)
overlap = (t_compute + t_copy − t_both) / min(t_compute, t_copy): 1 = copies hidden, 0 = serialised; t_copy is the
variant's own copies alone. The compiled HLO of the in-program variants is searched for copy-start / copy-done
(XLA's async host→device copies). Medians of --repeats after a burn-in call.
"""
from __future__ import annotations

import concurrent.futures
import functools

from bench_transfer import median_time  # burn-in call (compiles), then the median of `repeats` timed calls
from suite_common import fmt, md_header, table


def hlo_async_copies(jitted, *args) -> dict:
    """How many async copies XLA scheduled in the compiled program (copy-start on GPU; none expected on CPU)."""
    txt = jitted.lower(*args).compile().as_text()
    return {"copy_start": txt.count("copy-start"), "copy_done": txt.count("copy-done"),
            "dynamic_slice": txt.count("dynamic-slice"), "hlo_chars": len(txt)}


def part_transfer(part, args) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax
    dry, rec = part.dry_run, part.record
    reps = 2 if dry else args.repeats
    dev = jax.devices()[0]
    pinned = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
    on_dev = jax.sharding.SingleDeviceSharding(dev, memory_kind="device")
    rec["bandwidth"] = []
    for mib in ([1, 4] if dry else [1, 4, 16, 64, 256]):
        n = int(mib * 2**20) // 2
        host_np = np.ones(n, np.uint16)
        host_pin = jax.device_put(host_np, pinned)
        t_pin = median_time(lambda: jax.device_put(host_pin, on_dev).block_until_ready(), reps)
        t_np = median_time(lambda: jax.device_put(host_np, on_dev).block_until_ready(), reps)
        rec["bandwidth"].append({"mib": mib, "pinned_gb_per_s": 2 * n / t_pin / 1e9,
                                 "pageable_gb_per_s": 2 * n / t_np / 1e9})
        print(f"[transfer] H2D {mib:4d} MiB pinned {rec['bandwidth'][-1]['pinned_gb_per_s']:.1f} GB/s", flush=True)
        del host_pin
    rec["h2d_peak_gb_per_s"] = max(r["pinned_gb_per_s"] for r in rec["bandwidth"])
    part.save()
    try:
        from bench_expert_ffn import hbm_peak
        rec["hbm_gb_per_s"] = hbm_peak(1 << 20 if dry else 1 << 31, reps) / 1e9
    except Exception as e:  # noqa: BLE001
        part.error("HBM bandwidth", e)
    tiny = jax.jit(lambda x: x + 1)
    x8 = jnp.ones((8,), jnp.float32)
    rec["dispatch_round_trip_us"] = 1e6 * median_time(lambda: tiny(x8).block_until_ready(), max(reps, 30))
    part.save()
    overlap(part, jax, jnp, np, lax, pinned, on_dev, reps, dry, args)
    small_copies(part, jax, jnp, np, lax, pinned, on_dev, reps)


def overlap(part, jax, jnp, np, lax, pinned, on_dev, reps, dry, args) -> None:
    rec = part.record
    n_mat, iters = (128, 4) if dry else (4096, 60)
    n_exp = 4 if dry else 16
    expert_mib = 0.25 if dry else args.expert_mib
    elems = int(expert_mib * 2**20) // 2

    def loop(a):
        return lax.fori_loop(0, iters, lambda i, x: jnp.tanh(x @ a), a)

    compute = jax.jit(loop)
    a = jnp.ones((n_mat, n_mat), jnp.bfloat16) * 0.01
    experts = [jax.device_put(np.full(elems, i, np.uint16), pinned) for i in range(n_exp)]
    stack = jax.device_put(np.stack([np.full(elems, i, np.uint16) for i in range(n_exp)]), pinned)  # [E, n]
    idx = jnp.asarray(np.arange(n_exp)[::-1].copy(), jnp.int32)  # offsets computed on (living on) the device
    state = {"pool": jax.device_put(np.zeros((n_exp, elems), np.uint16), on_dev)}

    def into_pool(pool, xs):
        for i, x in enumerate(xs):
            pool = lax.dynamic_update_slice(pool, jax.device_put(x, on_dev)[None], (i, 0))
        return pool

    def into_pool_ds(pool, stk, offs):
        for i in range(n_exp):
            row = jax.device_put(lax.dynamic_slice_in_dim(stk, offs[i], 1, 0), on_dev)
            pool = lax.dynamic_update_slice(pool, row, (i, 0))
        return pool

    progs = {
        "in_program": jax.jit(lambda a, pool, xs: (loop(a), into_pool(pool, xs)), donate_argnums=(1,)),
        "in_program_dynamic_slice": jax.jit(lambda a, pool, s, o: (loop(a), into_pool_ds(pool, s, o)),
                                            donate_argnums=(1,)),
    }
    copy_only = {
        "in_program": jax.jit(into_pool, donate_argnums=(0,)),
        "in_program_dynamic_slice": jax.jit(into_pool_ds, donate_argnums=(0,)),
    }
    prog_args = {"in_program": (experts,), "in_program_dynamic_slice": (stack, idx)}

    def run_prog(name):
        out, state["pool"] = progs[name](a, state["pool"], *prog_args[name])
        jax.block_until_ready((out, state["pool"]))

    def run_copy_prog(name):
        state["pool"] = copy_only[name](state["pool"], *prog_args[name])
        state["pool"].block_until_ready()

    copies = lambda: [jax.device_put(e, on_dev) for e in experts]
    t_compute = median_time(lambda: compute(a).block_until_ready(), reps)
    t_copy = median_time(lambda: jax.block_until_ready(copies()), reps)
    rec["overlap_setup"] = {"matmul": n_mat, "iters": iters, "copies": n_exp, "expert_mib": expert_mib,
                            "compute_ms": 1e3 * t_compute, "device_put_copy_ms": 1e3 * t_copy,
                            "device_put_gb_per_s": n_exp * elems * 2 / t_copy / 1e9}
    pool_ex = concurrent.futures.ThreadPoolExecutor(1)

    def after():
        out = compute(a)
        jax.block_until_ready((out, copies()))

    def before():
        cs = copies()
        jax.block_until_ready((compute(a), cs))

    def one_call():
        out = compute(a)
        jax.block_until_ready((out, jax.device_put(experts, on_dev)))

    def thread():
        fut = pool_ex.submit(lambda: jax.block_until_ready(copies()))
        compute(a).block_until_ready()
        fut.result()

    def copy_program_after():  # the engine's cross-program prefetch: a copy-only program behind the compute
        out = compute(a)
        state["pool"] = copy_only["in_program"](state["pool"], experts)
        jax.block_until_ready((out, state["pool"]))

    variants = {"device_put_after_compute": (after, None), "device_put_before_compute": (before, None),
                "device_put_one_call": (one_call, None), "device_put_from_thread": (thread, None),
                "copy_program_after_compute": (copy_program_after, "in_program"),
                "in_program": (functools.partial(run_prog, "in_program"), "in_program"),
                "in_program_dynamic_slice": (functools.partial(run_prog, "in_program_dynamic_slice"),
                                             "in_program_dynamic_slice")}
    rec["overlap"] = {}
    copy_alone: dict = {}
    for name, (fn, copy_kind) in variants.items():
        try:
            if copy_kind is not None and copy_kind not in copy_alone:
                copy_alone[copy_kind] = median_time(functools.partial(run_copy_prog, copy_kind), reps)
            tc = copy_alone[copy_kind] if copy_kind else t_copy
            t = median_time(fn, reps)
            row = {"both_ms": 1e3 * t, "copy_alone_ms": 1e3 * tc, "compute_alone_ms": 1e3 * t_compute,
                   "overlap_fraction": (t_compute + tc - t) / min(t_compute, tc),
                   "copy_gb_per_s": n_exp * elems * 2 / tc / 1e9, "copy_ms_each": 1e3 * tc / n_exp}
            if name in progs:
                row["hlo"] = hlo_async_copies(progs[name], a, state["pool"], *prog_args[name])
            rec["overlap"][name] = row
            print(f"[transfer] {name:28s} both {row['both_ms']:.2f} ms, copies alone {row['copy_alone_ms']:.2f} ms, "
                  f"overlap {row['overlap_fraction']:.2f}" + (f", HLO copy-start ×{row['hlo']['copy_start']}"
                                                              if "hlo" in row else ""), flush=True)
        except Exception as e:  # noqa: BLE001 — record what this backend cannot do, measure the rest
            rec["overlap"][name] = part.error(f"overlap variant {name}", e)
        part.save()
    pool_ex.shutdown()
    ok = {k: v["overlap_fraction"] for k, v in rec["overlap"].items() if "overlap_fraction" in v}
    rec["best_overlap"] = max(ok.items(), key=lambda kv: kv[1]) if ok else None
    rec["copy_start_in_program"] = rec["overlap"].get("in_program", {}).get("hlo", {}).get("copy_start")
    part.save()


def small_copies(part, jax, jnp, np, lax, pinned, on_dev, reps) -> None:
    """The default model's 72 KiB experts: 32 separate device_put calls vs one call vs 32 copies inside one program
    vs one coalesced 32 × 72 KiB buffer (what coalescing a layer's loads buys)."""
    rec = part.record
    n, elems = 32, 36864  # 72 KiB of uint16 each
    try:
        small = [jax.device_put(np.full(elems, i, np.uint16), pinned) for i in range(n)]
        coalesced = jax.device_put(np.zeros(n * elems, np.uint16), pinned)
        pool = {"p": jax.device_put(np.zeros((n, elems), np.uint16), on_dev)}

        def prog(p, xs):
            for i, x in enumerate(xs):
                p = lax.dynamic_update_slice(p, jax.device_put(x, on_dev)[None], (i, 0))
            return p
        jprog = jax.jit(prog, donate_argnums=(0,))

        def in_prog():
            pool["p"] = jprog(pool["p"], small)
            pool["p"].block_until_ready()
        res = {"n": n, "kib_each": 72,
               "separate_calls_ms": 1e3 * median_time(lambda: jax.block_until_ready(
                   [jax.device_put(x, on_dev) for x in small]), reps),
               "one_call_ms": 1e3 * median_time(lambda: jax.block_until_ready(jax.device_put(small, on_dev)), reps),
               "in_program_ms": 1e3 * median_time(in_prog, reps),
               "coalesced_one_copy_ms": 1e3 * median_time(
                   lambda: jax.device_put(coalesced, on_dev).block_until_ready(), reps)}
        res["in_program_us_per_copy"] = 1e3 * res["in_program_ms"] / n
        rec["small_copies"] = res
        print(f"[transfer] 32 × 72 KiB: separate {res['separate_calls_ms']:.2f} ms, in one program "
              f"{res['in_program_ms']:.2f} ms, coalesced {res['coalesced_one_copy_ms']:.2f} ms", flush=True)
    except Exception as e:  # noqa: BLE001
        part.error("small copies", e)
    part.save()


def transfer_markdown(rec: dict) -> str:
    lines = md_header(rec, "Host→device transfers and copy/compute overlap")
    lines += table(["size", "pinned_host → device GB/s", "pageable numpy → device GB/s"],
                   [[f"{r['mib']} MiB", r["pinned_gb_per_s"], r["pageable_gb_per_s"]] for r in rec.get("bandwidth", [])])
    lines += ["", f"Pinned H2D peak **{fmt(rec.get('h2d_peak_gb_per_s'))} GB/s**; HBM copy "
                  f"{fmt(rec.get('hbm_gb_per_s'), 1)} GB/s; tiny jitted call round trip "
                  f"{fmt(rec.get('dispatch_round_trip_us'), 1)} µs.", ""]
    s = rec.get("overlap_setup")
    if s:
        lines += [f"Overlap: a {s['matmul']}² bf16 matmul loop ×{s['iters']} ({s['compute_ms']:.2f} ms) and "
                  f"{s['copies']} × {s['expert_mib']} MiB expert copies ({s['device_put_copy_ms']:.2f} ms as "
                  f"device_put, {s['device_put_gb_per_s']:.1f} GB/s). overlap = (compute + copies alone − both) / "
                  "min(compute, copies alone).", ""]
        rows = []
        for k, v in rec.get("overlap", {}).items():
            h = v.get("hlo", {})
            rows.append([k, v.get("both_ms"), v.get("copy_alone_ms"), v.get("copy_gb_per_s"),
                         v.get("overlap_fraction", v.get("error", "–")[:80] if "error" in v else None),
                         f"{h['copy_start']} / {h['copy_done']}" if h else "–"])
        lines += table(["copies issued as", "both ms", "copies alone ms", "copy GB/s", "overlap",
                        "HLO copy-start / copy-done"], rows)
    sc = rec.get("small_copies")
    if sc:
        lines += ["", f"{sc['n']} × {sc['kib_each']} KiB copies: {sc['separate_calls_ms']:.2f} ms as separate "
                      f"device_put calls, {sc['one_call_ms']:.2f} ms as one call, {sc['in_program_ms']:.2f} ms inside "
                      f"one program ({sc['in_program_us_per_copy']:.1f} µs each), {sc['coalesced_one_copy_ms']:.2f} ms "
                      "as one coalesced buffer."]
    return "\n".join(lines) + "\n"
