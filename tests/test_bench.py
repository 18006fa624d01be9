"""`ef-jax bench` on a tiny checkpoint: one row per configuration (resident, each budget × policy), speeds measured
after a burn-in (compile time apart), hit rate and bytes per token for offloaded rows, the host→device bandwidth;
a markdown table or JSON; bad flags refused before the weights load."""
import json

from ef_jax.bench import configs, markdown
from ef_jax.cli.commands import main


def test_bench_json_and_table(tiny_checkpoint, capsys):
    d = tiny_checkpoint("qwen3moe-norm")
    argv = ["bench", "--model", d, "--repetitions", "1", "--gen-tokens", "4", "--prompt-tokens", "5", "--budgets",
            "0.5", "--policies", "lru,nocache"]
    assert main(argv + ["--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert [r["config"] for r in rec["rows"]] == ["resident", "lru, 4 slots/layer", "nocache, 4 slots/layer"]
    assert rec["h2d_gbps"] > 0 and all(r["tg_tokens_per_s"] > 0 and r["pp_tokens_per_s"] > 0 for r in rec["rows"])
    assert rec["rows"][0]["compile_s"] > 0 and "hit_rate" not in rec["rows"][0]
    nocache = rec["rows"][2]
    assert nocache["hit_rate"] == 0 and nocache["mb_per_token"] > 0
    table = markdown(rec)
    assert table.count("\n| ") == 4 and "| resident |" in table and "GB/s measured" in table


def test_bench_refuses_bad_flags_before_loading(capsys):
    assert main(["bench", "--gen-tokens", "1"]) == 2
    assert main(["bench", "--policies", "nosuch"]) == 2
    assert main(["bench", "--budgets", "1.5"]) == 2
    assert "--budgets" in capsys.readouterr().err


def test_configs_keep_top_k_slots_at_least():
    cs = configs(num_experts=8, top_k=2, budgets=[0.1, 1.0], policies=["lru"], steps=["layer", "device"])
    assert [(c.slots, c.step) for c in cs] == [(None, "layer"), (2, "layer"), (2, "device"), (8, "layer"),
                                               (8, "device")]
