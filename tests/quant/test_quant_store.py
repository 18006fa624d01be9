"""`ef-jax convert` → ef_jax.load(STORE): identical tokens, refused mismatches, atomic writes."""
import json
import os
import shutil

import numpy as np
import pytest

import ef_jax
from ef_jax import OffloadConfig
from ef_jax.cli.commands import main
from ef_jax.quant import QuantExpertPool
from ef_jax.quant.store import MANIFEST, StoreMismatch, convert, is_store
from ef_jax.engine.transfer.store import store_for

PROMPTS = [[5, 17, 3, 9], [11, 2]]


@pytest.fixture(scope="module")
def source(tiny_checkpoint, tmp_path_factory):
    """A private copy of a tiny checkpoint (tests below modify it)."""
    d = str(tmp_path_factory.mktemp("src"))
    shutil.copytree(tiny_checkpoint("qwen2moe-shared"), d, dirs_exist_ok=True)
    return d


@pytest.fixture(scope="module")
def store(source, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("stores") / "int4")
    convert(source, out, expert_dtype="int4", group_size=8, dtype="float32")
    return out


def test_round_trip_gives_identical_experts_and_tokens(source, store):
    direct = ef_jax.load(source, dtype="float32", expert_dtype="int4", group_size=8)
    loaded = ef_jax.load(store)
    assert loaded.dtype == "float32" and loaded.expert_quant == direct.expert_quant
    for a, b in zip(direct.host_experts, loaded.host_experts):
        if a is None:
            assert b is None
            continue
        assert isinstance(b, QuantExpertPool)
        for (na, xa), (nb, xb) in zip(a.leaves(), b.leaves()):
            assert na == nb and xa.dtype == xb.dtype
            np.testing.assert_array_equal(xa, xb)
    ref = ef_jax.generate(direct, PROMPTS, max_new_tokens=5).tokens
    assert ef_jax.generate(loaded, PROMPTS, max_new_tokens=5).tokens == ref
    got = ef_jax.generate(loaded, PROMPTS, max_new_tokens=5,
                          offload=OffloadConfig(slots_per_layer=loaded.config.top_k, check=True)).tokens
    assert got == ref


def test_manifest_records_what_it_was_built_from(source, store):
    m = json.load(open(os.path.join(store, MANIFEST)))
    assert m["source"]["path"] == os.path.abspath(source) and len(m["source"]["fingerprint"]) == 64
    assert (m["expert_dtype"], m["group_size"], m["dtype"], m["ef_jax_version"]) == ("int4", 8, "float32",
                                                                                    ef_jax.__version__)
    assert m["bytes_per_expert"] == store_for(ef_jax.load(store)).bytes_per_expert


@pytest.mark.parametrize("kwargs,match", [
    (dict(expert_dtype="int8"), "holds int4 experts"),
    (dict(group_size=16), "group_size=8"),
    (dict(dtype="bfloat16"), "non-expert weights in float32"),
])
def test_mismatched_request_is_refused(store, kwargs, match):
    with pytest.raises(StoreMismatch, match=match):
        ef_jax.load(store, **kwargs)


def test_other_ef_jax_version_is_refused(store, monkeypatch):
    monkeypatch.setattr(ef_jax, "__version__", "99.0")
    with pytest.raises(StoreMismatch, match="converted by ef_jax .* this is 99.0: re-run"):
        ef_jax.load(store)


def test_changed_source_is_refused(source, tmp_path):
    src = str(tmp_path / "src")
    shutil.copytree(source, src)
    out = str(tmp_path / "store")
    convert(src, out, expert_dtype="int8", group_size=8, dtype="float32")
    ef_jax.load(out)  # unchanged: loads
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["rms_norm_eps"] = 1e-5
    json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
    with pytest.raises(StoreMismatch, match="changed since"):
        ef_jax.load(out)
    shutil.rmtree(src)  # a deleted source is fine: the store is self-contained
    assert isinstance(ef_jax.load(out).host_experts[0], QuantExpertPool)


def test_failed_write_leaves_nothing(source, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(ocp.StandardCheckpointer, "save", boom)
    out = str(tmp_path / "store")
    with pytest.raises(RuntimeError, match="disk full"):
        convert(source, out, expert_dtype="int4", group_size=8)
    assert os.listdir(tmp_path) == []  # neither STORE nor its temporary directory


def test_cli_convert_and_existing_out_refused(source, tmp_path, capsys):
    out = str(tmp_path / "store")
    assert main(["convert", "--model", source, "--out", out, "--expert-dtype", "int8", "--group-size", "8"]) == 0
    assert is_store(out) and "int8 experts" in capsys.readouterr().out
    assert main(["convert", "--model", source, "--out", out]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert", "--model", source, "--out", out, "--group-size", "8", "--overwrite"]) == 0
    assert json.load(open(os.path.join(out, MANIFEST)))["expert_dtype"] == "int4"
