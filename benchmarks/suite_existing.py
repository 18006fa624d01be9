"""gpu_suite parts that rerun existing benchmarks through their own functions: the expert-FFN kernel
(bench_expert_ffn) and the default model's cache policies on the wall clock (bench_policies).

expert_ffn: HBM and matmul peaks measured in this run, then per shape and token count the Pallas kernel, its
  atomic-combine decode variant, take+einsum and ragged_dot (bench_expert_ffn.bench_shape; one failing
  implementation is recorded, not fatal).
policies: bench_policies.main on the shipped model and benchmarks/results/policies_heldout.txt, wall clock (no
  --timing), once per budget, each after an identical burn-in invocation, so compiles stay out of the rows.
"""
from __future__ import annotations

import json
import os
import tempfile

from suite_common import fmt, md_header, table

HERE = os.path.dirname(os.path.abspath(__file__))


def part_expert_ffn(part, args) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import bench_expert_ffn as bef
    from kernels_pallas import BlockSizes, expert_ffn, expert_ffn_ragged_dot, expert_ffn_reference
    dry = part.dry_run
    interpret = dry or jax.default_backend() == "cpu"
    shapes = {"tiny": (32, 64, 2, 6)} if dry else {n: bef.SHAPES[n] for n in args.ffn_shapes.split(",")}
    tokens = (1,) if dry else tuple(int(t) for t in args.ffn_tokens.split(","))
    repeats = 2 if dry else args.repeats
    dtype = jnp.float32 if dry else jnp.bfloat16
    hbm = bef.hbm_peak(1 << 20 if dry else 1 << 31, repeats)
    flops = bef.flop_peak(128 if dry else 8192, dtype, repeats)
    atomic = BlockSizes(decode_combine="atomic")
    impls = {"pallas": jax.jit(lambda *a: expert_ffn(*a, interpret=interpret)),
             "pallas_atomic": jax.jit(lambda *a: expert_ffn(*a, block_sizes=atomic, interpret=interpret)),
             "take_einsum": jax.jit(expert_ffn_reference), "ragged_dot": jax.jit(expert_ffn_ragged_dot)}
    rec = part.record
    rec["meta_ffn"] = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
                       "dtype": jnp.dtype(dtype).name, "interpret": interpret, "hbm_peak_gb_per_s": hbm / 1e9,
                       "matmul_peak_tflop_per_s": flops / 1e12, "commit": rec["meta"]["commit"], "repeats": repeats,
                       "shapes": {n: dict(zip("DFKS", s)) for n, s in shapes.items()}}
    rec["rows"] = []
    rs = np.random.RandomState(0)
    for name, shape in shapes.items():
        if not part.has_time(5 if dry else 20, f"shape {name}"):
            continue
        try:
            rec["rows"] += bef.bench_shape(name, shape, tokens, impls, dtype, repeats, 16e9, hbm, flops, rs, False,
                                           interpret)[0]
        except Exception as e:  # noqa: BLE001
            part.error(f"shape {name}", e)
        part.save()


def ffn_markdown(rec: dict) -> str:
    head = "\n".join(md_header(rec, "Expert-slot FFN kernels")) + "\n"
    if "meta_ffn" not in rec:
        return head
    import bench_expert_ffn as bef
    return head + bef.markdown(rec["meta_ffn"], rec.get("rows", []))


def part_policies(part, args) -> None:
    """One bench_policies invocation per budget (each writes its own table), so a part stopped at its time limit
    keeps the budgets it finished; rows merged into this part's record."""
    import bench_policies
    dry = part.dry_run
    text = os.path.join(HERE, "results", "policies_heldout.txt")
    common = ["--text", text, "--tokens", "24" if dry else str(args.policy_tokens),
              "--seq-len", "12" if dry else "64", "--batches", "1", *([] if dry else ["8"])]
    policies = (["resident", "lru", "expertflow"] if dry else
                ["resident", "nocache", "lru", "pregate", "predictive", "expertflow", "expertflow+cache-aware"])
    budgets = ["0.25"] if dry else ["0.25", "0.5"]
    part.record["setup"] = {"text": os.path.relpath(text, os.path.dirname(HERE)), "args": common,
                            "budgets": budgets, "policies": policies, "clock": "wall",
                            "burn_in": not dry}  # a dry run times nothing worth a burn-in
    part.record["rows"] = []
    part.save()
    for b in budgets:
        if not part.has_time(10 if dry else 40, f"budget {b}"):
            continue
        if not dry:  # the same invocation first: compiles every program variant the timed one meets
            with tempfile.TemporaryDirectory() as tmp:
                bench_policies.main(common + ["--budgets", b, "--policies", *policies, "--out", tmp,
                                              "--stem", "burnin"])
        stem = f"policies_wall_{int(float(b) * 100)}"
        bench_policies.main(common + ["--budgets", b, "--policies", *policies, "--out", part.out_dir, "--stem", stem])
        with open(os.path.join(part.out_dir, f"{stem}.json")) as f:
            res = json.load(f)
        part.record["rows"] += res["rows"]
        part.record["policies_setup"] = {k: v for k, v in res.items() if k != "rows"}
        part.save()
    ratios = []
    rows = part.record["rows"]
    for key in sorted({(r["budget"], r["batch"]) for r in rows}):
        tps = {r["policy"]: r["wall_tokens_per_s"] for r in rows if (r["budget"], r["batch"]) == key}
        ratios.append({"budget": key[0], "batch": key[1],
                       **{f"{p}/lru": tps[p] / tps["lru"] for p in tps if p not in ("lru", "belady (sim)")
                          and "lru" in tps}})
    part.record["ratios"] = ratios


def policies_markdown(rec: dict) -> str:
    lines = md_header(rec, "Default model's cache policies, wall clock (bench_policies)")
    lines += [f"Full tables: policies_wall_<budget %>.md beside this file. Text: {rec.get('setup', {}).get('text')}; "
              f"bench_policies arguments {' '.join(rec.get('setup', {}).get('args', [])[2:])}.", ""]
    lines += table(["budget", "batch", "policy", "wall tokens/s", "hit rate", "stall ms/token", "MB/token"],
                   [[f"{int(100 * r['budget'])}%", r["batch"], r["policy"], r["wall_tokens_per_s"], r["hit_rate"],
                     r["stall_ms_per_token"], r["mb_per_token"]] for r in rec.get("rows", [])])
    if rec.get("ratios"):
        lines += ["", "Wall tokens/s over lru:", ""]
        lines += [f"- {int(100 * r['budget'])}% batch {r['batch']}: " +
                  ", ".join(f"{k} {fmt(v)}" for k, v in r.items() if "/" in k) for r in rec["ratios"]]
    return "\n".join(lines) + "\n"
