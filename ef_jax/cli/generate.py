"""`ef-jax generate`: every flag checked against the checkpoint before its weights load, then streamed output.

flags → preflight (config, generation_config.json, tokenizer) → prompt ids → sampling defaults → context check
      → offload budget (auto: read the device's free memory, one line on stderr) + policy (+ --predictor /
        --hybrid) → --timeline path  [all refusals before this line]
      → ef_jax.load → ef_jax.generate(on_token=TextStream) → text on stdout as it settles, stats on stderr
Ctrl-C: the text generated so far stays printed, the process exits 130 without a traceback.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading

from ef_jax.cli.guards import (HOST_COMPUTE_HELP, UsageError, input_dir, output_file, plural,
                              positive)
from ef_jax.cli.model import Preflight, fmt_bytes, offload_budget, preflight, prompt_ids
from ef_jax.cli.stream import Spinner, TextStream
from ef_jax.generation_config import SamplingRequest
from ef_jax.cli.devices import add_devices_arg, add_step_arg, load_mesh
from ef_jax.cli.support import check_run
from ef_jax.cli.convert import add_load_args, load_kwargs


def add_parser(sub) -> None:
    from ef_jax.generation_config import DEFAULT_MAX_NEW_TOKENS
    g = sub.add_parser("generate", help="generate text from a prompt (streamed)",
                       description="Generate a continuation of a prompt; sampling settings not given come from the "
                                   "checkpoint's generation_config.json, else the defaults below.")
    g.add_argument("prompt", nargs="?", default=None, help="prompt text; - reads it from stdin")
    g.add_argument("--prompt-file", default=None, metavar="FILE", help="read the prompt text from FILE")
    g.add_argument("--prompt-ids", default=None, metavar="IDS",
                   help="the prompt as token ids, e.g. \"1 2 3\" (for checkpoints without a tokenizer)")
    g.add_argument("--model", default=None, metavar="DIR", help="HF checkpoint directory or Hub id org/name[@rev] (default: the shipped model)")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="weights dtype (default: bfloat16 on GPU, float32 on CPU)")
    add_load_args(g)
    add_devices_arg(g)
    g.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help=f"tokens to generate (default: generation_config.json, else {DEFAULT_MAX_NEW_TOKENS})")
    g.add_argument("--temperature", type=float, default=None, metavar="T",
                   help="0 = greedy (default: generation_config.json's do_sample/temperature, else greedy)")
    g.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="sample among the K most likely tokens; 0 = off (default: generation_config.json, else off)")
    g.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="nucleus sampling mass in (0, 1] (default: generation_config.json, else 1.0)")
    g.add_argument("--repetition-penalty", type=float, default=None, metavar="R",
                   help="> 1 discourages tokens already in the text (default: generation_config.json, else 1.0)")
    g.add_argument("--stop", action="append", default=None, metavar="STRING",
                   help="stop before this string (repeatable; needs a tokenizer)")
    g.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling")
    budget = g.add_mutually_exclusive_group()
    budget.add_argument("--expert-memory", default=None, metavar="SIZE",
                        help="device budget for routed experts, e.g. 2GiB, or auto: the device's free memory after "
                             "the other weights, the KV cache and a margin (offloads experts)")
    budget.add_argument("--slots-per-layer", type=int, default=None, metavar="N",
                        help="device expert slots per MoE layer (offloads experts)")
    g.add_argument("--policy", default=None, metavar="NAME",
                   help=f"{', '.join(generate_policies())} (default: lru with a budget, else resident)")
    g.add_argument("--predictor", default=None, metavar="DIR",
                   help="a train-predictor --out directory: the predictor of --policy predictive")
    g.add_argument("--hybrid", default=None, metavar="DIR",
                   help="a train-hybrid --out directory: the predictor of --policy expertflow")
    add_step_arg(g)
    g.add_argument("--host-memory", choices=["pinned", "mapped"], default="pinned",
                   help="experts pinned in host memory once (default), or read from the checkpoint files on demand "
                        "(mapped: for hosts that cannot hold every expert; slower, layer mode)")
    g.add_argument("--host-compute", choices=["never", "auto", "always"], default="never", help=HOST_COMPUTE_HELP)
    g.add_argument("--timeline", default=None, metavar="FILE",
                   help="write a Chrome/Perfetto trace JSON of the offload engine here")
    g.add_argument("--json", action="store_true", help="print one JSON object (text, tokens, stats) at the end")
    g.set_defaults(fn=run)


def generate_policies() -> list[str]:
    """'resident' and every registered policy that decides online (Belady needs the future routing)."""
    from ef_jax.policies.registry import POLICIES, policy_names
    return ["resident"] + [n for n in policy_names() if not POLICIES[n].needs_future]


def _check_sampling_flags(args) -> None:
    positive("--max-new-tokens", args.max_new_tokens)
    positive("--top-k", args.top_k, minimum=0)
    if args.temperature is not None and not args.temperature >= 0:
        raise UsageError(f"--temperature {args.temperature} must be ≥ 0 (0 = greedy)")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p {args.top_p} must be in (0, 1] (1 = off)")
    if args.repetition_penalty is not None and not (args.repetition_penalty > 0
                                                    and math.isfinite(args.repetition_penalty)):
        raise UsageError(f"--repetition-penalty {args.repetition_penalty} must be > 0 (1 = off)")


def _policy_name(args) -> str:
    """The --policy name ("resident" when nothing is offloaded); the support table judges the combination."""
    from ef_jax.policies.registry import POLICIES
    offloaded = args.expert_memory is not None or args.slots_per_layer is not None
    name = args.policy or ("lru" if offloaded else "resident")
    if name != "resident" and name not in POLICIES:
        raise UsageError(f"--policy {name} is unknown: choose one of {', '.join(generate_policies())}")
    if name == "resident" and offloaded:
        raise UsageError("--policy resident keeps every expert on the device: drop --expert-memory / "
                         "--slots-per-layer, or choose an offloading --policy")
    if name != "resident" and not offloaded:
        raise UsageError(f"--policy {name} offloads experts: give --expert-memory (e.g. 2GiB) or --slots-per-layer N")
    return name


def _predictor_ahead(args, cfg):
    """Loads --predictor (no model needed) / checks --hybrid's shape, before the model loads."""
    if args.predictor:
        input_dir("--predictor", args.predictor, "config.json", "`ef-jax train-predictor --out`")
        from ef_jax.predict.runtime import TrainedPredictor, check_cache_shape
        pred = TrainedPredictor.load(args.predictor)
        try:
            check_cache_shape(pred.cfg, cfg.num_moe_layers, cfg.num_experts)
        except ValueError as e:
            raise UsageError(f"--predictor {args.predictor}: {e}; train one on this model's traces") from None
        return pred
    if args.hybrid:
        input_dir("--hybrid", args.hybrid, "config.json", "`ef-jax train-hybrid --out`")
        with open(os.path.join(args.hybrid, "config.json"), encoding="utf-8") as f:
            h = json.load(f)
        got, want = (h.get("num_layers"), h.get("num_experts"), h.get("hidden")), \
            (cfg.num_moe_layers, cfg.num_experts, cfg.hidden_size)
        if got != want:
            raise UsageError(f"--hybrid {args.hybrid} was trained for {got[0]} MoE layers × {got[1]} experts, "
                             f"D={got[2]}; this model has {want[0]} × {want[1]}, D={want[2]}: train one on its record")
    return None


def _policy_object(name: str, args, model, predictor):
    if name == "predictive" and predictor is not None:
        from ef_jax.policies.registry import PolicySpec
        tok = model.tokenizer
        return PolicySpec("predictive", predictor=predictor.stepper(tok.convert_ids_to_tokens if tok else str))
    if name == "expertflow" and args.hybrid:
        from ef_jax.hybrid.predictor import HybridPredictor
        from ef_jax.policies.registry import PolicySpec
        return PolicySpec("expertflow", predictor=HybridPredictor.load(args.hybrid, model))
    return name


@dataclasses.dataclass(frozen=True)
class Plan:
    """A generate request that passed every check; nothing of the model is loaded yet."""
    pf: Preflight
    ids: list[int]                 # prompt token ids
    sampling: SamplingRequest
    dtype: str
    policy: str                    # "resident" or an online policy name
    budget: dict | None            # OffloadConfig budget kwargs; None = resident
    budget_auto: dict | None       # --expert-memory auto: what it chose and why (ef_jax.cache.auto_budget)
    predictor: object              # a loaded TrainedPredictor for --predictor, else None
    timeline: str | None


def plan(args) -> Plan:
    """Every refusal of `ef-jax generate`, in CLI terms, before any weight is read."""
    from ef_jax.engine.loop.batch import cache_slots
    from ef_jax.engine.loop.request import ContextLengthError, check_context
    from ef_jax.generation_config import resolve_sampling
    from ef_jax.model import default_dtype
    _check_sampling_flags(args)
    pf = preflight("--model", args.model)
    ids = prompt_ids(args, pf)
    if args.stop and pf.tokenizer is None:
        raise UsageError("--stop STRING matches decoded text, and this checkpoint has no tokenizer: drop --stop")
    req = resolve_sampling(pf.generation, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty)
    try:
        check_context(pf.config, [len(ids)], req.max_new_tokens)
    except ContextLengthError as e:
        raise UsageError(e.describe("--max-new-tokens")) from None
    dtype = args.dtype or default_dtype()
    name = _policy_name(args)
    check_run(offloaded=name != "resident", policy=name, num_experts=pf.config.num_experts,
              num_moe_layers=pf.config.num_moe_layers, step=args.step, devices=args.devices,
              timeline=args.timeline is not None, predictor=args.predictor is not None,
              hybrid=args.hybrid is not None, auto_budget=args.expert_memory == "auto",
              host_memory=args.host_memory, host_compute=args.host_compute, expert_kernel=args.expert_kernel,
              expert_dims=(pf.config.hidden_size, pf.config.moe_intermediate))
    budget, auto = None, None
    if name != "resident":
        budget, auto = offload_budget(args, pf, dtype, (1, cache_slots(len(ids), req.max_new_tokens)))
    return Plan(pf=pf, ids=ids, sampling=req, dtype=dtype, policy=name, budget=budget, budget_auto=auto,
                predictor=_predictor_ahead(args, pf.config),
                timeline=output_file("--timeline", args.timeline) if args.timeline else None)


def run(args) -> int:
    p = plan(args)  # Ctrl-C from here to the first token exits 130 at once (ef_jax.cli.commands' handler)
    spinner = Spinner()
    try:
        return _generate(args, p, spinner)
    finally:
        spinner.stop()  # also on Ctrl-C while loading: the spinner thread must not write after the exit message


def _generate(args, p: Plan, spinner: Spinner) -> int:
    import ef_jax
    from ef_jax.interrupt import exit_now
    spinner.start(f"loading {p.pf.path}")
    model = ef_jax.load(p.pf.path, dtype=p.dtype, **load_kwargs(args), **load_mesh(args))
    offload = None
    if p.budget is not None:
        offload = ef_jax.OffloadConfig(**p.budget, policy=_policy_object(p.policy, args, model, p.predictor),
                                       record_timeline=p.timeline, step=args.step,
                                       host_memory=args.host_memory,
                                       host_compute=args.host_compute)
    stream = TextStream(model.tokenizer, p.ids, stops=tuple(args.stop or ()), enabled=not args.json)
    spinner.start(f"compiling and prefilling {plural(len(p.ids), 'prompt token')}")

    # Once tokens stream, Ctrl-C only sets a flag that the next token reads: a KeyboardInterrupt raised wherever
    # Python happens to be can land in a callback that swallows it (jax's gc callback does), and decoding would
    # then run on to the end. Before the first token (loading, compiling) the process exits 130 at once
    # (ef_jax.interrupt: a KeyboardInterrupt inside a compile could crash the interpreter).
    interrupted = threading.Event()

    def on_sigint(signum, frame):
        if not stream.tokens:
            spinner.stop()
            exit_now("ef-jax generate: interrupted after 0 tokens")
        interrupted.set()

    def on_token(row: int, token: int) -> bool:
        spinner.stop()
        return stream.on_token(row, token) or interrupted.is_set()

    res = None
    main = threading.current_thread() is threading.main_thread()  # only the main thread may set handlers
    previous = signal.signal(signal.SIGINT, on_sigint) if main else None
    try:
        res = ef_jax.generate(model, [p.ids], seed=args.seed, offload=offload, on_token=on_token,
                              **p.sampling.kwargs())
    except KeyboardInterrupt:
        pass  # the text so far is printed (below); exit 130
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
    if interrupted.is_set():
        res = None
    spinner.stop()
    text = stream.finish()
    if args.json:
        print(json.dumps(_record(p, stream, text, res), default=_jsonable))
    if res is None:
        print(f"ef-jax generate: interrupted after {plural(len(stream.tokens), 'token')}", file=sys.stderr)
        return 130
    if not args.json:
        print(stats_line(res.stats), file=sys.stderr)
    return 0


def _record(p: Plan, stream: TextStream, text: str, res) -> dict:
    tok = p.pf.tokenizer
    return {"model": p.pf.path, "prompt": stream.prompt_text if tok is not None else None, "prompt_ids": p.ids,
            "text": text if tok is not None else None, "tokens": list(stream.tokens),
            "stopped_by_string": stream.stopped, "interrupted": res is None,
            "stats": None if res is None else _finite(res.stats), "budget_auto": p.budget_auto}


def _finite(x):
    """NaN / inf → None, so the JSON is standard."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _jsonable(x):
    return float(x) if hasattr(x, "__float__") else str(x)


def decode_speed(s: dict) -> str:
    """Tokens/s over the decode steps that compiled nothing; "n/a" when every step compiled (a speed that timed
    compiles would mislead by orders of magnitude)."""
    v = s.get("tokens_per_s", float("nan"))
    return f"{v:.1f} tokens/s" if v == v and s.get("decoded_tokens", 1) else "n/a (every decode step compiled)"


def stats_line(s: dict) -> str:
    """One stderr line: totals labelled as totals, per-token figures as per token, compile time on its own."""
    n = s["generated_tokens"]
    line = (f"[{plural(n, 'token')} | compile {s['compile_s']:.2f} s | prefill {s['prefill_s'] * 1e3:.1f} ms for "
            f"{plural(s['prompt_tokens'], 'prompt token')} | decode {decode_speed(s)}")
    if s["step"] != "resident":  # an offloaded source (every source reports the same keys: SourceStats)
        real = s["h2d_bytes_real"]
        h2d = f"H2D {fmt_bytes(real)} total"
        if real != s["h2d_bytes"]:
            h2d += f" ({fmt_bytes(s['h2d_bytes'])} at the timing preset's expert size)"
        line += (f" | experts: hit rate {s['hit_rate']:.3f}, {s['misses']} miss{'' if s['misses'] == 1 else 'es'}"
                 f", {h2d}, stall {s['stall_s'] * 1e3:.1f} ms total ({s['stall_s'] * 1e3 / max(n, 1):.2f} ms/token)"
                 f", resident {fmt_bytes(s['expert_bytes_resident'])}")
        if s["devices"] > 1:  # --devices N: the budget and the resident bytes are each device's
            line += " per device | " + ", ".join(
                f"{d['device']}: hit rate {d['hit_rate']:.3f}, H2D {fmt_bytes(d['h2d_bytes'])}" for d in s["per_device"])
    elif s["devices"] > 1:
        line += f" | experts split over {s['devices']} devices"
    return line + "]"
