"""One process of tests/test_multihost.py: joins a 2-process jax.distributed run on 127.0.0.1 (CPU collectives by
gloo, one CPU device each) and decodes a checkpoint on a mesh spanning both processes, resident and offloaded.

python tests/multihost_worker.py PROCESS_ID PORT OUT.json CHECKPOINT_DIR
"""
import json
import sys

import jax


# rows of different lengths (padding masked); the prompts and length of tests/test_offload_engine.py, whose one-device
# reference programs the parent then finds in the run's compile cache
PROMPTS = [[5, 17, 33, 2, 70, 41, 9], [88, 3, 60, 12], [40, 41]]
NEW = 6


def main(process_id: int, port: int, out: str, checkpoint: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    import ef_jax
    from ef_jax.mesh import expert_mesh
    assert len(jax.devices()) == 2 and len(jax.local_devices()) == 1
    model = ef_jax.load(checkpoint, mesh=expert_mesh(2))
    resident = ef_jax.generate(model, PROMPTS, max_new_tokens=NEW)
    # the least budget (top-k slots per device and MoE layer): every device caches and copies
    offloaded = ef_jax.generate(model, PROMPTS, max_new_tokens=NEW, offload=ef_jax.OffloadConfig(
        slots_per_layer=model.config.top_k, policy="lru", check=True))
    with open(out, "w") as f:
        json.dump({"resident": resident.tokens, "offloaded": offloaded.tokens,
                   "per_device": offloaded.stats["per_device"]}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
