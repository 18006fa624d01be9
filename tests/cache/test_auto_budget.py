"""--expert-memory auto / OffloadConfig(expert_memory="auto"): the arithmetic against fake GPU memory stats, the real
CPU path, quantized vs bf16 slot counts, the engine's sizes (KV cache, non-expert weights) against what it really
allocates, and the CLI's one line and its refusal before any model work."""
import dataclasses

import numpy as np
import pytest

import ef_jax
from ef_jax import OffloadConfig, cli
from ef_jax.cache import auto_budget as ab
from ef_jax.cache.auto_budget import BudgetRequest, BudgetTooSmall, auto_budget, kv_cache_bytes
from ef_jax.random_model import presets, with_layers

GiB = 2**30
DS = with_layers(presets()["deepseek-v2-lite"], 26)  # 26 MoE layers × 64 experts, top-6, D=2048, F=1408


def fake_stats(free: int, in_use: int = 3 * GiB) -> dict:
    """What a GPU's device.memory_stats() reports (the keys auto reads, plus one it ignores)."""
    return {"bytes_limit": in_use + free, "bytes_in_use": in_use, "peak_bytes_in_use": in_use}


def ds_request(bytes_per_expert: int, dtype: str = "bf16", batch: int = 1, context: int = 4096) -> BudgetRequest:
    return BudgetRequest(num_moe_layers=DS.num_moe_layers, num_experts=DS.num_experts, top_k=DS.top_k,
                         bytes_per_expert=bytes_per_expert, float_bytes_per_expert=DS.expert_params() * 2,
                         non_expert_bytes=3 * GiB, non_expert_on_device=False,
                         kv_bytes=kv_cache_bytes(DS, batch, context, 2), batch=batch, context=context,
                         expert_dtype=dtype)


def quant_bytes(cfg, dtype: str) -> int:
    from ef_jax.quant.codes import quantized_nbytes, spec_for
    spec = spec_for(dtype, None, "bfloat16")
    D, F = cfg.hidden_size, cfg.moe_intermediate
    return 2 * quantized_nbytes(D, F, spec) + quantized_nbytes(F, D, spec)


# ---- the arithmetic ---------------------------------------------------------------------------------------------
def test_gpu_budget_is_free_minus_weights_kv_and_margin():
    per = DS.expert_params() * 2
    req = ds_request(per)
    free = 16 * GiB
    b = auto_budget(req, fake_stats(free))
    left = free - 3 * GiB - req.kv_bytes
    available = left - ab.RESERVE_BYTES - int(np.ceil(ab.MARGIN_FRACTION * left))
    assert b.source == "device" and b.available_bytes == available and b.free_bytes == free
    assert b.slots_per_layer == available // (DS.num_moe_layers * per)
    assert b.expert_memory == b.slots_per_layer * DS.num_moe_layers * per <= available
    # the MLA cache: (512 + 64) bf16 per position and layer, 26 layers × 4096 positions, + the bool mask
    assert req.kv_bytes == 26 * 4096 * 576 * 2 + 4096
    line = b.describe()
    for word in (f"{b.slots_per_layer}/64 slots", "free on the device", "KV cache", "1 × 4096", "margin", "to load"):
        assert word in line, (word, line)


def test_quantized_experts_get_more_slots_from_the_same_memory():
    free = 10 * GiB
    slots = {dt: auto_budget(ds_request(per, dt), fake_stats(free)).slots_per_layer
             for dt, per in (("bf16", DS.expert_params() * 2), ("int8", quant_bytes(DS, "int8")),
                             ("int4", quant_bytes(DS, "int4")))}
    assert DS.top_k <= slots["bf16"] < slots["int8"] < slots["int4"] <= DS.num_experts
    assert slots["int8"] >= 1.8 * slots["bf16"] and slots["int4"] >= 3.0 * slots["bf16"], slots


def test_every_expert_fits_caps_at_E():
    b = auto_budget(ds_request(quant_bytes(DS, "int4"), "int4"), fake_stats(120 * GiB))
    assert b.slots_per_layer == DS.num_experts and "every expert fits" in b.describe()


def test_too_small_is_refused_with_the_minimum_and_the_minimum_is_enough():
    req = ds_request(DS.expert_params() * 2, context=32768, batch=4)  # a big KV cache
    with pytest.raises(BudgetTooSmall, match="the minimum is") as e:
        auto_budget(req, fake_stats(4 * GiB))
    need = e.value.minimum_free
    assert need > 4 * GiB
    assert auto_budget(req, fake_stats(need)).slots_per_layer == DS.top_k  # exactly enough for top-k
    with pytest.raises(BudgetTooSmall):
        auto_budget(req, fake_stats(need - 2**20))


def test_weights_already_on_the_device_are_not_subtracted_twice():
    req = ds_request(DS.expert_params() * 2)
    placed = dataclasses.replace(req, non_expert_on_device=True)
    free = 16 * GiB
    assert auto_budget(placed, fake_stats(free - 3 * GiB)).slots_per_layer == \
        auto_budget(req, fake_stats(free)).slots_per_layer


def test_cpu_default_without_memory_stats():
    bf16, int4 = (auto_budget(ds_request(per, dt), None) for dt, per in
                  (("bf16", DS.expert_params() * 2), ("int4", quant_bytes(DS, "int4"))))
    assert bf16.source == int4.source == "cpu-default" and bf16.free_bytes is None
    assert bf16.slots_per_layer == int(ab.CPU_DEFAULT_FRACTION * DS.num_experts) == 16
    assert int4.slots_per_layer > 3 * bf16.slots_per_layer  # the same default memory holds more int4 experts
    assert "memory_stats() is None" in bf16.describe() and "25%" in bf16.describe()
    tiny = dataclasses.replace(ds_request(DS.expert_params() * 2), num_experts=8)  # 25 % of 8 < top-6
    raised = auto_budget(tiny, None)
    assert raised.slots_per_layer == DS.top_k and "raised to top-6" in raised.describe()
    assert "raised" not in bf16.describe()


def test_offload_config_accepts_auto_and_resolve_slots_needs_bytes():
    for v in ("auto", "AUTO", " Auto "):
        assert OffloadConfig(expert_memory=v).auto
    assert not OffloadConfig(expert_memory="2GiB").auto
    with pytest.raises(ValueError, match="auto"):
        OffloadConfig(expert_memory="auto").resolve_slots(2, 8, 2, 100)
    with pytest.raises(ValueError, match="not a size"):
        OffloadConfig(expert_memory="autox")


# ---- the engine's sizes and its device path --------------------------------------------------------------------
@pytest.mark.parametrize("family", ["mla", "gqa"])
def test_kv_cache_bytes_is_what_init_cache_allocates(family):
    import jax
    from ef_jax.models.transformer import init_cache
    cfg = dataclasses.replace(presets()["deepseek-v2-lite" if family == "mla" else "mixtral"], num_layers=2,
                              moe_layers=(True, True), sliding_windows=(None, None))
    cache = init_cache(cfg, 3, 40, np.float32)
    allocated = sum(a.nbytes for a in jax.tree.leaves(cache))
    assert kv_cache_bytes(cfg, 3, 40, 4) == allocated


@pytest.fixture(scope="module")
def model():
    """Random weights in the shipped model's shape (10 MoE layers × 32 experts, top-4), float32."""
    from ef_jax.cli.model import preflight
    from ef_jax.random_model import random_model
    return random_model(preflight("--model", None, with_tokenizer=False).config)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_non_expert_bytes_from_the_config_match_the_checkpoint(dtype):
    from ef_jax.checkpoint import iter_param_leaves, load_checkpoint, non_expert_nbytes
    from ef_jax.model import DEFAULT_MODEL_DIR
    cfg, params, _ = load_checkpoint(DEFAULT_MODEL_DIR, dtype)  # host numpy: what ef_jax.load puts on the device
    assert non_expert_nbytes(cfg, dtype) == sum(a.nbytes for _, a in iter_param_leaves(params))


def test_engine_real_cpu_path_and_fake_gpu(model, monkeypatch):
    from ef_jax.engine.transfer import device_memory
    from ef_jax.engine.forward.forward import Forward
    cfg, per = model.config, model.param_bytes()["per_expert"]
    for step in ("device", "layer"):  # both expert sources resolve auto the same way
        with Forward(model, OffloadConfig(expert_memory="auto", step=step), kv_shape=(2, 64)) as fwd:  # this CPU
            s = fwd.stats()
        assert s["budget_auto"]["source"] == "cpu-default" and s["slots_per_layer"] == cfg.num_experts // 4, step
    assert s["budget_auto"]["kv_bytes"] == kv_cache_bytes(cfg, 2, 64, 4)
    with pytest.raises(ValueError, match="kv_shape"):
        Forward(model, OffloadConfig(expert_memory="auto"))
    # a GPU with 5 experts per layer free after the KV cache and the margin (weights already placed)
    kv = kv_cache_bytes(cfg, 2, 64, 4)
    free = int(np.ceil((5 * cfg.num_moe_layers * per + ab.RESERVE_BYTES) / (1 - ab.MARGIN_FRACTION))) + kv + 1
    monkeypatch.setattr(device_memory, "memory_stats", lambda device=None: fake_stats(free))
    with Forward(model, OffloadConfig(expert_memory="auto"), kv_shape=(2, 64)) as fwd:
        s = fwd.stats()
    assert s["slots_per_layer"] == 5 and s["budget_auto"]["source"] == "device"
    assert s["budget_auto"]["non_expert_on_device"] and "already on the device" in s["budget_auto"]["reason"]
    monkeypatch.setattr(device_memory, "memory_stats", lambda device=None: fake_stats(free // 2))
    with pytest.raises(BudgetTooSmall, match="expert_memory='auto'.*minimum"):
        Forward(model, OffloadConfig(expert_memory="auto"), kv_shape=(2, 64))


# ---- the CLI ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bare_dir(tmp_path_factory):
    """The shipped model's config.json alone: all the CLI reads before loading (no tokenizer to import)."""
    import shutil
    from ef_jax.model import DEFAULT_MODEL_DIR
    d = tmp_path_factory.mktemp("bare")
    for f in ("config.json", "generation_config.json"):
        shutil.copy(f"{DEFAULT_MODEL_DIR}/{f}", d / f)
    return str(d)


def _no_model_work(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("model work started before the refusal")
    monkeypatch.setattr(ef_jax, "load", boom)
    monkeypatch.setattr(ef_jax, "generate", boom)


def test_cli_prints_what_auto_chose(bare_dir, monkeypatch, capsys):
    from ef_jax.cli import generate as cli_generate
    args = cli.build_parser().parse_args(["generate", "--model", bare_dir, "--prompt-ids", "3 5 7",
                                          "--max-new-tokens", "9", "--expert-memory", "auto"])
    _no_model_work(monkeypatch)
    p = cli_generate.plan(args)  # the CPU: no memory stats
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("expert memory auto:") and "CPU default" in err[0]
    per = p.pf.config.expert_params() * 4  # float32 on CPU
    assert p.budget == {"expert_memory": 8 * p.pf.config.num_moe_layers * per} and p.budget_auto["slots_per_layer"] == 8
    assert p.budget_auto["context"] == 64  # 3 prompt tokens + 9 new, bucketed as the decode loop allocates


def test_cli_auto_counts_quantized_bytes(bare_dir, monkeypatch, capsys):
    from ef_jax.cli import generate as cli_generate
    from ef_jax.checkpoint import non_expert_nbytes
    from ef_jax.cli.model import preflight
    from ef_jax.engine.transfer import device_memory
    _no_model_work(monkeypatch)
    cfg = preflight("--model", bare_dir, with_tokenizer=False).config
    # free memory for 8 bf16 experts per MoE layer after the weights still to load and the KV cache (1 × 64)
    experts = 8 * cfg.num_moe_layers * cfg.expert_params() * 2
    free = (int(np.ceil((experts + ab.RESERVE_BYTES) / (1 - ab.MARGIN_FRACTION)))
            + non_expert_nbytes(cfg, "bfloat16") + kv_cache_bytes(cfg, 1, 64, 2) + 1)
    monkeypatch.setattr(device_memory, "memory_stats", lambda device=None: fake_stats(free))
    slots = {}
    for dt in ("bf16", "int8", "int4"):
        args = cli.build_parser().parse_args(["generate", "--model", bare_dir, "--prompt-ids", "3 5 7",
                                              "--max-new-tokens", "9", "--dtype", "bfloat16", "--expert-dtype", dt,
                                              "--expert-memory", "auto"])
        slots[dt] = cli_generate.plan(args).budget_auto["slots_per_layer"]
    assert "free on the device" in capsys.readouterr().err
    assert slots["bf16"] == 8 and slots["int8"] >= 14 and slots["int4"] >= 24, slots


@pytest.mark.parametrize("argv", [
    ["generate", "--prompt-ids", "3 5 7", "--expert-memory", "auto"],
    ["eval-policy", "--text", "TEXT", "--policy", "lru", "--expert-memory", "auto"],
    ["serve", "--expert-memory", "auto"],
])
def test_cli_refuses_a_too_small_auto_budget_before_loading(argv, bare_dir, monkeypatch, capsys, tmp_path):
    from ef_jax.engine.transfer import device_memory
    text = tmp_path / "t.txt"
    text.write_text("3 5 7 9")
    argv = [str(text) if a == "TEXT" else a for a in argv] + ["--model", bare_dir]
    _no_model_work(monkeypatch)
    monkeypatch.setattr(device_memory, "memory_stats", lambda device=None: fake_stats(64 * 2**20))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--expert-memory auto" in err and "the minimum is" in err, err


class _Seen(Exception):
    pass


@pytest.fixture
def seen_kv_shape(monkeypatch):
    """Replaces the Forward of every API entry point by one that records its kv_shape and stops the run there."""
    import ef_jax.engine.loop.api
    import ef_jax.engine.loop.generate
    import ef_jax.evalpolicy.harness
    from ef_jax.engine.forward import forward
    seen = []

    def fake(model, offload=None, **kw):
        seen.append(kw.get("kv_shape"))
        raise _Seen
    for mod in (ef_jax.engine.loop.generate, ef_jax.engine.loop.api, ef_jax.evalpolicy.harness, forward):
        monkeypatch.setattr(mod, "Forward", fake)
    return seen


def test_every_entry_point_sizes_its_kv_cache(model, seen_kv_shape):
    from ef_jax.evalpolicy.harness import evaluate_policy
    from ef_jax.cli.serve import build
    auto = OffloadConfig(expert_memory="auto")
    calls = [  # (call, the KV cache its decode loop allocates)
        (lambda: ef_jax.generate(model, [[1] * 20, [2] * 5, [3]], max_new_tokens=30, offload=auto), (3, 64)),
        (lambda: ef_jax.generate(model, [[1] * 20, [2] * 5, [3]], max_new_tokens=60, batch_size=2, offload=auto),
         (2, 128)),  # 20 prompt tokens bucket to 32, + 60 new = 92 → 128 positions
        (lambda: ef_jax.logits(model, [[1, 2, 3, 4]] * 2, offload=auto), (2, 4)),
        (lambda: evaluate_policy(model, list(range(100)), auto, batch_size=2, seq_len=30), (2, 30)),
        (lambda: build(model, auto, max_batch=3, context=256), (6, 256)),  # --max-live defaults to 2 × max-batch
    ]
    for call, want in calls:
        with pytest.raises(_Seen):
            call()
        assert seen_kv_shape[-1] == want
