"""gpu_suite part "hf_accelerate": the peer a user would otherwise pick — transformers' Mixtral with its routed
experts offloaded to CPU memory by accelerate — on the same shapes and machine as the "mixtral" part, as tokens/s.

[MixtralConfig of the mixtral part's shapes] → accelerate.init_empty_weights → random bf16 weights materialised on
the CPU (norms 1) → resident: the whole model on the GPU, generate → offloaded: accelerate.dispatch_model with
every `*.experts` module on "cpu" and everything else on GPU 0 (accelerate moves an offloaded module's weights to
the GPU for each forward call and drops them after), generate. Greedy, batch 1, EOS suppressed; decode tokens/s over
the same span ef_jax times (hf_timing). The ratio ef_jax/accelerate reads the mixtral part's record when it exists.

In transformers 5 a layer's experts are one fused module (MixtralExperts: gate_up_proj [E, 2F, D], down_proj), so
accelerate moves all E experts of a layer per forward — that is what offloading with accelerate costs there.
"""
from __future__ import annotations

import json
import os
import time

from hf_timing import hf_decode
from suite_common import fmt, md_header, table


def build_hf_mixtral(kwargs: dict, dtype, init_empty):
    """transformers MixtralForCausalLM with random weights, built without first initialising them (fast)."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM
    cfg = MixtralConfig(**kwargs)
    with init_empty():
        model = MixtralForCausalLM(cfg)
    gen = torch.Generator().manual_seed(0)
    for name, p in list(model.named_parameters()):
        mod_name, _, leaf = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        if p.dim() == 1:  # RMSNorm scales
            value = torch.ones(p.shape, dtype=dtype)
        else:  # uniform with std 0.02
            value = torch.empty(p.shape, dtype=dtype).uniform_(-0.0346, 0.0346, generator=gen)
        mod._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    return model.eval()


def experts_device_map(model, main) -> dict:
    """Every `*.experts` module → "cpu" (offloaded), every other parameter's or buffer's module → main."""
    experts = sorted({n for n, _ in model.named_modules() if n.endswith(".experts")})
    dmap: dict = {}
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    for name in names:
        owner = name.rpartition(".")[0]
        hit = next((e for e in experts if owner == e or owner.startswith(e + ".")), None)
        dmap[hit if hit else owner] = "cpu" if hit else main
    return dmap


def init_empty_fallback():
    """accelerate.init_empty_weights, or (without accelerate) a plain CPU build."""
    try:
        from accelerate import init_empty_weights
        return init_empty_weights
    except ImportError:
        import contextlib
        return contextlib.nullcontext


def part_hf(part, args) -> None:
    try:
        import torch
        import transformers
    except ImportError as e:
        part.skip("transformers + accelerate", f"not importable here: {e}")
        return
    from suite_models import hf_mixtral_kwargs, mixtral_config
    rec = part.record
    dry = part.dry_run
    cuda = torch.cuda.is_available()
    if not cuda and not dry:
        part.skip("transformers + accelerate", f"torch {torch.__version__} sees no CUDA device: a CPU run of these "
                                               "shapes would say nothing about the GPU peer")
        return
    main = 0 if cuda else "cpu"
    dev = torch.device("cuda:0" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda and not dry else torch.float32
    new_tokens = 3 if dry else args.hf_tokens
    try:
        import accelerate
        acc_version = accelerate.__version__
    except ImportError as e:
        accelerate, acc_version = None, None
        part.skip("accelerate offloading", f"accelerate not importable: {e}")
    kwargs = hf_mixtral_kwargs(mixtral_config(dry))
    t = time.perf_counter()
    model = build_hf_mixtral(kwargs, dtype, init_empty_fallback())
    rec["setup"] = {"transformers": transformers.__version__, "torch": torch.__version__, "accelerate": acc_version,
                    "device": torch.cuda.get_device_name(0) if cuda else "cpu", "dtype": str(dtype),
                    "config": kwargs, "new_tokens": new_tokens, "build_s": time.perf_counter() - t,
                    "expert_bytes": sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                                        if ".experts." in n)}
    rec["meta"].update(device=rec["setup"]["device"], backend="torch " + ("cuda" if cuda else "cpu"))
    rec["rows"] = []
    part.save()
    ids = torch.randint(0, kwargs["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(1))

    def measure(label, placement, m):
        x = ids.to(dev)
        t0 = time.perf_counter()
        hf_decode(m, x, 2, pad_token_id=0)  # burn-in: kernels, allocator, hooks
        burn = time.perf_counter() - t0
        row = hf_decode(m, x, new_tokens, pad_token_id=0)
        row.pop("tokens")
        row.update(config=label, placement=placement, burn_in_s=burn)
        rec["rows"].append(row)
        part.save()
        print(f"[hf_accelerate] {label:22s} {row['tokens_per_s']:8.3f} tok/s (burn-in {burn:.1f} s)", flush=True)

    if part.has_time(10 if dry else 40, "transformers resident"):
        try:
            model.to(dev)
            measure("transformers resident", f"every weight on {dev}", model)
            model.to("cpu")
            if cuda:
                torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001
            part.error("transformers resident", e)
            model.to("cpu")
    if accelerate is not None and part.has_time(10 if dry else 40, "accelerate offloaded experts"):
        try:
            dmap = experts_device_map(model, main)
            model = accelerate.dispatch_model(model, device_map=dmap, main_device=main)
            n_off = sum(1 for k in dmap if k.endswith(".experts"))
            measure("accelerate offload", f"{n_off} experts modules on cpu (accelerate.dispatch_model), the rest "
                                          f"on {main}" + ("" if cuda else " — no GPU: hooks without any offload"),
                    model)
        except Exception as e:  # noqa: BLE001
            part.error("accelerate offloaded experts", e)
    rec["ratios"] = ef_jax_ratios(part.out_dir, rec["rows"])
    part.save()


def ef_jax_ratios(out_dir: str, hf_rows: list[dict]) -> dict:
    """ef_jax tokens/s (the mixtral part's rows, same shapes and machine) / transformers tokens/s."""
    path = os.path.join(out_dir, "mixtral.json")
    if not os.path.exists(path):
        return {"note": "no mixtral.json in this run's output: ratio not computed"}
    with open(path) as f:
        ef = {f"{r['policy']} {round(100 * r['budget'])}%": r["tokens_per_s"] for r in json.load(f).get("rows", [])}
    hf = {r["config"]: r["tokens_per_s"] for r in hf_rows}
    out = {}
    for name, v in ef.items():
        if "accelerate offload" in hf and not name.startswith("resident"):
            out[f"ef_jax {name} / accelerate offload"] = v / hf["accelerate offload"]
        if name.startswith("resident") and "transformers resident" in hf:
            out["ef_jax resident / transformers resident"] = v / hf["transformers resident"]
    return out


def hf_markdown(rec: dict) -> str:
    s = rec.get("setup", {})
    lines = md_header(rec, "transformers + accelerate on the mixtral part's shapes")
    if s:
        c = s["config"]
        lines += [f"transformers {s['transformers']}, torch {s['torch']}, accelerate {s['accelerate']}; {s['device']}, "
                  f"{s['dtype']}; MixtralForCausalLM {c['num_hidden_layers']} layers, D={c['hidden_size']}, "
                  f"{c['num_local_experts']} experts top-{c['num_experts_per_tok']} F={c['intermediate_size']} "
                  f"({s['expert_bytes'] / 1e9:.2f} GB of experts); batch 1, {s['new_tokens']} new tokens, greedy.", ""]
    lines += table(["configuration", "placement", "decode tokens/s", "prefill s", "burn-in s"],
                   [[r["config"], r["placement"], r["tokens_per_s"], r["prefill_s"], r["burn_in_s"]]
                    for r in rec.get("rows", [])])
    ratios = rec.get("ratios") or {}
    if ratios:
        lines += ["", "Ratios (tokens/s, same shapes, same machine):", ""]
        lines += [f"- {k}: {fmt(v) if not isinstance(v, str) else v}" for k, v in ratios.items()]
    return "\n".join(lines) + "\n"
