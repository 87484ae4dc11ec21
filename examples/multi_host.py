"""FlexMerge on several processes, as on a TPU pod, here two on one machine.

    python examples/multi_host.py

Writes the bundled zoo's models as safetensors files, then starts two
processes of this script (2 CPU devices each, gloo collectives on
127.0.0.1). Each runs :func:`worker`, the part that every host of a pod runs:
initialize ``jax.distributed``, build one mesh over every process's devices,
plan, cut and save with the same calls in the same order. See
docs/multi_host.md.
"""

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path


def worker(process_id: int, num_processes: int, port: int, data: str) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes only
    # On a pod: jax.distributed.initialize() finds all three by itself.
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=num_processes,
                               process_id=process_id)
    import flexmerge_jax as fm

    mesh = jax.make_mesh((jax.device_count(),), ("model",))  # 4 devices, 2 per process
    fts = sorted(str(p) for p in Path(data).glob("task_*.safetensors"))
    plan = fm.plan(f"{data}/base.safetensors", fts, blocks="vit",
                   method=fm.methods.ties(keep=0.2), mesh=mesh)
    fm.save_cut(f"{data}/ties_2x", plan, size=2.0)  # every process, the same path
    if jax.process_index() == 0:
        print(f"process 0 of {jax.process_count()}: {plan}")
        print(fm.load(f"{data}/ties_2x").summary())


def main() -> None:
    import flexmerge_jax as fm
    from flexmerge_jax import zoo

    data = tempfile.mkdtemp(prefix="flexmerge-multihost-")
    z = zoo.load()
    fm.save_params(f"{data}/base.safetensors", z.base)
    for name, ft in zip(z.task_names, z.finetuned):
        fm.save_params(f"{data}/task_{name}.safetensors", ft)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [subprocess.Popen([sys.executable, __file__, str(i), "2", str(port), data], env=env)
             for i in range(2)]
    codes = [p.wait(timeout=600) for p in procs]
    print(f"exit codes {codes}; outputs in {data}")
    sys.exit(max(codes))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        main()
