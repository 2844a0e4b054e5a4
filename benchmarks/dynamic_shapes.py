"""One artifact compiled with dynamic shapes against a model compiled for each size, and eager.

    python benchmarks/dynamic_shapes.py                   # GPT-2 (2 layers, 256 wide), batch 1-4 x seq 16-128
    python benchmarks/dynamic_shapes.py --rounds 10 --layers 4 --width 512

For each (batch, seq): the dynamic model (compiled once, loaded from its artifact) and a model compiled for
exactly that size run in paired interleaved rounds (``e2e.paired``) with eager PyTorch; every output is
checked against eager first. The ratio dynamic/static is what one artifact for every size costs per call;
the compile times say what it saves. Results: benchmarks/results/dynamic_shapes.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SIZES = ((1, 16), (2, 64), (4, 128))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds per size (soft)")
    parser.add_argument("--platform", default="host")
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    from torch.export import Dim

    import hetflow
    from e2e import paired
    from hetflow.examples import models
    torch.set_num_threads(2)
    module, example = models.build_gpt2_dynamic(n_layer=args.layers, n_embd=args.width, n_head=4, vocab=1000)
    start = time.perf_counter()
    dynamic = hetflow.compile(module, example, platform=args.platform, cache=False,
                              dynamic_shapes=({0: Dim("batch", min=1, max=4), 1: Dim("seq", min=2, max=128)},))
    dynamic_compile = time.perf_counter() - start
    directory = Path(tempfile.mkdtemp()) / "dynamic"
    dynamic.save(directory)
    loaded = hetflow.runtime.load(directory)
    rows, static_compile = [], 0.0
    for batch, seq in SIZES:
        ids = torch.randint(0, 1000, (batch, seq))
        start = time.perf_counter()
        static = hetflow.compile(module, (ids,), platform=args.platform, cache=False)
        static_compile += time.perf_counter() - start
        feeds = {"x": ids.numpy()}
        with torch.no_grad():
            expected = module(ids).numpy()
        for name, out in (("dynamic", next(iter(loaded.run(feeds).values()))), ("static", static.executor.run(
                feeds)[static.graph.outputs[0].name])):
            error = float(np.abs(out - expected).max())
            if error > 1e-3:
                raise SystemExit(f"{name} at batch {batch}, seq {seq} differs from eager by {error:.3g}")

        def eager():
            with torch.no_grad():
                module(ids)
        runs = {"dynamic": lambda: loaded.run(feeds), "static": lambda: static.executor.run(feeds), "eager": eager}
        result = paired(runs, args.rounds, args.budget, keys=("dynamic", "static", "eager"), of="dynamic")
        ms = result["median_ms"]
        rows.append({"batch": batch, "seq": seq, **result})
        print(f"batch {batch} seq {seq:3d}: dynamic {ms['dynamic']:.2f} ms, static {ms['static']:.2f} ms, eager "
              f"{ms['eager']:.2f} ms; dynamic/static {result['ratios']['dynamic/static']:.3f}, dynamic/eager "
              f"{result['ratios']['dynamic/eager']:.3f} ({result['rounds']} rounds)", flush=True)
    out = Path(__file__).resolve().parent / "results" / "dynamic_shapes.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"layers": args.layers, "width": args.width, "platform": args.platform,
                               "dynamic_compile_s": dynamic_compile, "static_compile_s": static_compile,
                               "rows": rows}, indent=1))
    ratio = statistics.median(r["ratios"]["dynamic/static"] for r in rows)
    print(f"one dynamic artifact compiled in {dynamic_compile:.1f} s vs {static_compile:.1f} s for {len(SIZES)} "
          f"static compiles; median dynamic/static per call {ratio:.3f} over {len(SIZES)} sizes, all equal to eager")
    return 0


if __name__ == "__main__":
    sys.exit(main())
