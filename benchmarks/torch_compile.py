"""torch.compile(backend="hetflow") against hetflow.compile and torch eager, in paired interleaved rounds.

    python benchmarks/torch_compile.py                    # gpt2 (4 layers, 512 wide, seq 64) and resnet18
    python benchmarks/torch_compile.py --models resnet18 --rounds 10 --no-spin

Every peer runs the same module under torch.no_grad() with torch inputs; the ratios are medians of
per-round ratios (``e2e.paired``: rounds of short blocks, the order rotating, so that every peer sees
the same machine speed). Targets (issue 14): torch.compile <= 1.1x hetflow.compile and <= 0.8x eager.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGET_HETFLOW, TARGET_EAGER = 1.1, 0.8
KEYS = ("eager", "hetflow", "tcompile")


def builders():
    from hetflow.examples import models
    return {"gpt2": ("GPT-2 4 layers, 512 wide, 8 heads, vocab 50257, seq 64",
                     lambda: models.build_gpt2(n_layer=4, n_embd=512, n_head=8, seq=64, vocab=50257)),
            "resnet18": ("ResNet-18 224x224 b1", models.build_resnet18)}


def bench(name: str, desc: str, build, args) -> dict:
    import torch

    import peers
    from e2e import _check, paired
    module, inputs = build()
    inputs = tuple(inputs)
    runs, info = {}, {}
    for key, prepare in (("eager", lambda: peers.prepare_eager(module, inputs)),
                         ("hetflow", lambda: peers.prepare_hetflow(module, inputs, args.platform)),
                         ("tcompile", lambda: peers.prepare_hetflow_torch_compile(module, inputs, args.platform))):
        runs[key], info[key] = prepare()
    ref = runs["eager"]()
    for key in ("hetflow", "tcompile"):
        bad = _check(runs[key](), ref)
        if bad:
            info[key]["check"] = bad
    result = paired(runs, args.rounds, args.budget, keys=KEYS, of="tcompile")
    torch._dynamo.reset()
    ms = result["median_ms"]
    print(f"{name:9s} {desc}: eager {ms['eager']:.1f} ms, hetflow.compile {ms['hetflow']:.1f} ms, "
          f"torch.compile(hetflow) {ms['tcompile']:.1f} ms; torch.compile/hetflow.compile "
          f"{result['ratios']['tcompile/hetflow']:.3f} (target <= {TARGET_HETFLOW}), torch.compile/eager "
          f"{result['ratios']['tcompile/eager']:.3f} (target <= {TARGET_EAGER}); {result['rounds']} rounds; "
          f"compile s: hetflow {info['hetflow']['compile_s']:.1f}, torch.compile {info['tcompile']['compile_s']:.1f} "
          f"({info['tcompile']['graphs']} graph)" + "".join(f"; {k} CHECK {v['check']}" for k, v in info.items()
                                                            if "check" in v), flush=True)
    return {"model": name, **result, "info": info}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="gpt2,resnet18")
    ap.add_argument("--platform", default="host")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--budget", type=float, default=60.0, help="seconds per model for the rounds (x3 at most)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-spin", action="store_true", help="idle worker threads sleep (a busy machine)")
    args = ap.parse_args(argv)
    import peers
    peers.set_threads(args.threads, spin=not args.no_spin)
    table = builders()
    for name in args.models.split(","):
        desc, build = table[name]
        t0 = time.perf_counter()
        bench(name, desc, build, args)
        print(f"          ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
