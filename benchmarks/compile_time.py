"""Compile time of GPT-2 small (hetflow.examples.models.build_gpt2 at 12 layers x 768, vocab 50257, 128 tokens,
random weights) from a torch module: cold with the cache off, cold into an empty compile cache (key + store),
and again from the cache in the same process and in a fresh one; wall and CPU seconds, and the stage table.

    python benchmarks/compile_time.py                 # about 1 min on this 2-core machine when idle
    python benchmarks/compile_time.py --small         # a 2-layer GPT-2 (seconds)

CPU seconds (``time.process_time``, every thread of this process) are printed beside the wall time: on a shared
machine the wall time of a compile grows with the other processes' load, its CPU time much less.
Targets (issue 17): under 5 s cold, under 1 s from the cache.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings


def build(small: bool):
    from hetflow.examples import models
    if small:
        return models.build_gpt2()
    return models.build_gpt2(n_layer=12, n_embd=768, n_head=12, seq=128, vocab=50257)


def timed_compile(module, inputs, **options):
    import hetflow
    wall, cpu = time.perf_counter(), time.process_time()
    compiled = hetflow.compile(module, inputs, platform="host", **options)
    return compiled, time.perf_counter() - wall, time.process_time() - cpu


def warm_up():
    """Imports and one tiny compile, so that the times below are the model's, not the first import's."""
    import hetflow
    from hetflow.examples import models
    module, inputs = models.build_gpt2()
    hetflow.compile(module, inputs, platform="host", cache=False)


def fresh_process_hit(cache_dir: str, small: bool) -> dict:
    """The same compile in a new Python process (imports and the model built first, then timed)."""
    code = (f"import sys, json, warnings; warnings.filterwarnings('ignore'); sys.argv = ['x'] + {['--small'] if small else []!r}\n"
            "sys.path.insert(0, 'benchmarks'); import compile_time as ct\n"
            "ct.warm_up(); module, inputs = ct.build(%r)\n"
            "c, wall, cpu = ct.timed_compile(module, inputs, cache=True, cache_dir=%r)\n"
            "print(json.dumps({'wall': wall, 'cpu': cpu, 'status': c.cache.status, 'timings': c.timings}))"
            % (small, cache_dir))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="a 2-layer GPT-2 instead of GPT-2 small")
    ap.add_argument("--json", help="write the numbers to this file")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    import os
    import torch
    torch.set_num_threads(2)
    warm_up()
    module, inputs = build(args.small)
    rows = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        off, wall, cpu = timed_compile(module, inputs, cache=False)
        rows["cold, cache off"] = {"wall": wall, "cpu": cpu, "timings": off.timings, "status": off.cache.status}
        cold, wall, cpu = timed_compile(module, inputs, cache=True, cache_dir=cache_dir)
        rows["cold, into an empty cache"] = {"wall": wall, "cpu": cpu, "timings": cold.timings, "status": cold.cache.status}
        hit, wall, cpu = timed_compile(module, inputs, cache=True, cache_dir=cache_dir)
        rows["from the cache (same process)"] = {"wall": wall, "cpu": cpu, "timings": hit.timings, "status": hit.cache.status}
        equal = bool(torch.equal(hit(*inputs), cold(*inputs)))
        rows["from the cache (fresh process)"] = fresh_process_hit(cache_dir, args.small)
    print(f"GPT-2 {'2 layers x 64' if args.small else 'small (12 x 768, vocab 50257, 128 tokens)'}; "
          f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'compile':34s} {'wall s':>8s} {'cpu s':>8s}  cache")
    for name, row in rows.items():
        print(f"{name:34s} {row['wall']:8.2f} {row['cpu']:8.2f}  {row['status']}")
    print(f"cached outputs equal to the cold compile's: {equal}")
    for name in ("cold, into an empty cache", "from the cache (fresh process)"):
        print(f"\n{name}: stages (wall ms)")
        for stage, seconds in rows[name]["timings"].items():
            print(f"  {stage:30s} {seconds * 1e3:9.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
