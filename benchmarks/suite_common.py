"""What every part of benchmarks/gpu_suite.py shares: its record (written after every row, so a part killed at its
time limit still leaves what it measured), its deadline, the run's metadata, and a fast random-weight model builder.

A part function takes a `Part` and fills `part.record` (rows, figures), calling `part.save()` as it goes and
`part.time_left()` before each configuration; a configuration it cannot start in time is listed in
`record["skipped"]` with the reason, never silently dropped.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
import traceback

import numpy as np

from results_io import git_commit


class Part:
    """One part's run: out_dir/<name>.json (+ .md once the part gives its markdown)."""

    def __init__(self, name: str, out_dir: str, dry_run: bool, deadline: float, suite_budget_s: float):
        self.name, self.out_dir, self.dry_run, self.deadline = name, out_dir, dry_run, deadline
        self.t0 = time.time()
        self.record: dict = {"part": name, "status": "running", "dry_run": dry_run, "meta": run_meta(),
                             "time_limit_s": round(deadline - self.t0, 1), "suite_budget_s": suite_budget_s,
                             "skipped": [], "errors": []}
        self.markdown_fn = None  # record → markdown table, set by the part
        os.makedirs(out_dir, exist_ok=True)

    # ---- time ------------------------------------------------------------------------------------------------
    def time_left(self) -> float:
        return self.deadline - time.time()

    def has_time(self, need_s: float, what: str) -> bool:
        """True when `need_s` seconds remain before the deadline; else records `what` as skipped."""
        left = self.time_left()
        if left >= need_s:
            return True
        self.skip(what, f"time budget: {left:.0f} s left of the part's {self.record['time_limit_s']:.0f} s, "
                        f"this needs ~{need_s:.0f} s")
        return False

    def skip(self, what: str, why: str) -> None:
        self.record["skipped"].append({"what": what, "why": why})
        print(f"[{self.name}] skipped {what}: {why}", flush=True)

    def error(self, what: str, exc: BaseException) -> dict:
        """Records a failed sub-measurement (the part goes on); returns the error entry."""
        e = {"what": what, "error": f"{type(exc).__name__}: {exc}"[:600],
             "traceback": traceback.format_exc(limit=6)[-2000:]}
        self.record["errors"].append(e)
        print(f"[{self.name}] {what} failed: {e['error']}", flush=True)
        return e

    # ---- output ----------------------------------------------------------------------------------------------
    def save(self) -> None:
        self.record["wall_s"] = round(time.time() - self.t0, 2)
        path = os.path.join(self.out_dir, f"{self.name}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(self.record, f, indent=1, default=_json_default)
        os.replace(path + ".tmp", path)  # a kill mid-write never leaves half a record
        if self.markdown_fn is not None:
            try:
                md = self.markdown_fn(self.record)
            except Exception as e:  # noqa: BLE001 — a table bug must not lose the JSON record
                md = f"# {self.name}\n\nmarkdown failed: {type(e).__name__}: {e}\n"
            with open(os.path.join(self.out_dir, f"{self.name}.md"), "w") as f:
                f.write(md)

    def finish(self, exc: BaseException | None = None) -> None:
        if exc is not None:
            self.error("part", exc)
            self.record["status"] = "error"
        elif self.record["status"] == "running":
            self.record["status"] = "partial" if self.record["skipped"] or self.record["errors"] else "ok"
        self.save()


def _json_default(x):
    try:
        import numpy as np
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return x.tolist()
    except ImportError:
        pass
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)
    return str(x)


def run_meta() -> dict:
    """Device, versions, commit, host: what every record names (jax only if this process imported it)."""
    meta = {"commit": git_commit(), "host": platform.node(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "load_average": os.getloadavg(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if "jax" in sys.modules:
        import jax
        meta.update(jax=jax.__version__, backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
                    device_count=jax.device_count())
        try:
            import jaxlib
            meta["jaxlib"] = jaxlib.__version__
        except (ImportError, AttributeError):
            pass
    return meta


def fmt(x, d: int = 2) -> str:
    """A table cell: '–' for missing or NaN."""
    if x is None or (isinstance(x, float) and x != x):
        return "–"
    if isinstance(x, float):
        return f"{x:.{d}f}"
    return str(x)


def md_header(rec: dict, title: str) -> list[str]:
    m = rec["meta"]
    lines = [f"# {title}", "",
             f"Device {m.get('device', '?')} ({m.get('backend', '?')}), jax {m.get('jax', '–')}, commit {m['commit']}, "
             f"host {m['host']}; part status **{rec['status']}** in {rec.get('wall_s', 0):.0f} s of its "
             f"{rec['time_limit_s']:.0f} s (suite budget {rec['suite_budget_s']:.0f} s)"
             + ("; DRY RUN (tiny shapes, CPU): not a speed figure" if rec["dry_run"] else "") + "."]
    for s in rec["skipped"]:
        lines.append(f"- skipped {s['what']}: {s['why']}")
    for e in rec["errors"]:
        lines.append(f"- failed {e['what']}: {e['error'][:300]}")
    return lines + [""]


def table(header: list[str], rows: list[list]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows])


# ---- random-weight models, fast -----------------------------------------------------------------------------------
def fast_model(cfg, dtype: str, seed: int = 0, expert_banks: int = 1):
    """A random-weight ef_jax Model of `cfg` built in seconds at full DeepSeek/Mixtral size.

    As ef_jax.random_model.random_model (same param layout, norm scales 1), but bfloat16 tensors are drawn as random
    bits — sign random, magnitude uniform in [2^-7, 2^-6) (std ≈ 0.012, like N(0, 0.02)) — about 7× faster than
    normal draws, and the routed experts are drawn `expert_banks` times and shared by the layers in turn (layer i uses
    bank i mod banks). The engine still pins a separate copy of every (layer, expert) in host memory, so every byte
    it moves is real; only the numpy source is shared (28 GB of DeepSeek-V2-Lite experts come from one 1.1 GB bank).
    Falls back to random_model when the checkpoint helpers it uses are not there."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    try:
        from ef_jax.checkpoint import DTYPES, expected_shapes, expert_shapes, set_dotted
        from ef_jax.model import Model
    except ImportError:
        from ef_jax.random_model import random_model
        return random_model(cfg, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed)
    np_dtype = DTYPES[dtype]

    def draw(shape, name=""):
        if name.endswith("norm"):
            return np.ones(shape, np_dtype)
        n = int(np.prod(shape))
        if np.dtype(np_dtype).itemsize == 2 and np.dtype(np_dtype).name == "bfloat16":
            bits = rng.integers(0, 2**63, size=(n + 3) // 4, dtype=np.int64).view(np.uint16)[:n]
            return ((bits & np.uint16(0x807F)) | np.uint16(0x3C00)).view(np_dtype).reshape(shape)
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np_dtype)

    params: dict = {"layers": [{} for _ in range(cfg.num_layers)]}
    for name, shape in expected_shapes(cfg).items():
        set_dotted(params, name, draw(shape, name))
    banks = [{k: draw(s) for k, s in expert_shapes(cfg).items()} for _ in range(max(1, expert_banks))]
    experts = tuple(banks[i % len(banks)] if cfg.moe_layers[i] else None for i in range(cfg.num_layers))
    from ef_jax.model import as_rows
    return Model(config=cfg, params=jax.tree.map(jnp.asarray, params), experts=as_rows(experts), dtype=dtype)


def release(model) -> None:
    """Drops a model's device-resident experts, if this build has the helper (offloaded rows must not also hold
    every expert on the device)."""
    try:
        from ef_jax.engine.sources.experts import drop_resident
    except ImportError:
        return
    drop_resident(model)


# ---- what the model parts share (suite_models, suite_quant) -----------------------------------------------------
def replay_override(experts: np.ndarray, batch: int):
    """route_override replaying experts u8[N, L, K]: row b decodes its own stretch of the trace (token
    b·⌊N/B⌋ + step), MoE layer j takes trace layer j mod L — B independent streams, as B prompts would be."""
    N, L, _ = experts.shape
    starts = np.arange(batch) * (N // batch)

    def override(step, j, routed):
        rows = (starts[:len(routed)] + step) % N
        return experts[rows, j % L].astype(np.int32)
    return override


def teacher_forced_row(model, ids, offload, batch: int, steps: int, override=None) -> dict:
    from ef_jax.evalpolicy import evaluate_policy
    r = evaluate_policy(model, ids, offload, batch_size=batch, seq_len=steps + 1, max_tokens=batch * (steps + 1),
                        route_override=override)
    s = r.stats
    row = {"tokens": r.tokens, "steps": r.tokens // batch, "wall_s": r.wall_s, "tokens_per_s": r.tokens / r.wall_s,
           "hit_rate": r.hit_rate, "stall_ms_per_token": 1e3 * r.stall_s_per_token,
           "mb_per_token": r.bytes_per_token / 1e6, "prefetch_precision": r.prefetch_precision,
           "prefetch_recall": r.prefetch_recall, "dispatches_per_step": s.get("dispatches_per_step"),
           "host_syncs_per_step": s.get("host_syncs_per_step"), "sync_points": s.get("sync_points")}
    if offload is not None:
        row.update(misses=s.get("misses"), hits=s.get("hits"), h2d_bytes_real=s.get("h2d_bytes_real"),
                   copier=s.get("copier"), slots_per_layer=s.get("slots_per_layer"),
                   device_peak_bytes_in_use=s.get("device_peak_bytes_in_use"),
                   compile_stats={k: v for k, v in s.items() if "compile" in k or "variant" in k})  # as counted
        if s.get("host_compute", "never") != "never":
            row.update(host_compute=s["host_compute"], host_computed=s.get("host_computed"),
                       bytes_not_moved=s.get("bytes_not_moved"), host_calibration=s.get("host_calibration"))
    return row


def add_roofline(row: dict, compute_step_s: float | None, bytes_per_expert: int, peak: float) -> None:
    """roofline = max(compute, misses × copy time) per step, from this run's misses and the measured peak; also
    the same bound on the bytes really moved (prefetches included)."""
    if compute_step_s is None or row.get("misses") is None:
        return
    steps, copy_s = row["steps"], bytes_per_expert / peak
    B = row["tokens"] / steps
    miss_step = row["misses"] / steps
    roof = max(compute_step_s, miss_step * copy_s)
    moved = max(compute_step_s, (row.get("h2d_bytes_real") or 0) / steps / peak)
    row.update(misses_per_step=miss_step, roofline_step_s=roof, roofline_tokens_per_s=B / roof,
               frac_of_roofline=row["tokens_per_s"] / (B / roof), roofline_moved_tokens_per_s=B / moved,
               frac_of_roofline_moved=row["tokens_per_s"] / (B / moved))


def pin_store(model):
    """Seconds to pin every expert in host memory (once per model; the first offloaded run would pay it), or why
    it was not timed apart (then the first burn-in includes it)."""
    try:
        from ef_jax.engine.transfer.store import store_for
    except ImportError as e:
        return f"not timed apart ({e})"
    t = time.perf_counter()
    store_for(model)
    return time.perf_counter() - t
