"""One process of tests/test_multihost.py: joins a 2-process jax.distributed run on 127.0.0.1 (CPU collectives by
gloo, one CPU device each) and decodes the shipped model on a mesh spanning both processes, resident and offloaded.

python tests/multihost_worker.py PROCESS_ID PORT OUT.json
"""
import json
import sys

import jax


def main(process_id: int, port: int, out: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    import ef_jax
    from ef_jax.mesh import expert_mesh
    assert len(jax.devices()) == 2 and len(jax.local_devices()) == 1
    model = ef_jax.load(mesh=expert_mesh(2))
    prompts = ["To be, or not", "In the beginning"]
    resident = ef_jax.generate(model, prompts, max_new_tokens=5)
    offloaded = ef_jax.generate(model, prompts, max_new_tokens=5,
                                offload=ef_jax.OffloadConfig(slots_per_layer=4, policy="lru", check=True))
    with open(out, "w") as f:
        json.dump({"resident": resident.tokens, "offloaded": offloaded.tokens,
                   "per_device": offloaded.stats["per_device"]}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
