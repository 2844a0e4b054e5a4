"""The quick start: compile an example model for a preset platform, run it, and print what hetflow built.

    python -m hetflow.examples.quickstart [--model mlp|gpt2] [--platform host]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["mlp", "gpt2"], default="gpt2")
    parser.add_argument("--platform", default="host")
    args = parser.parse_args(argv)

    import torch

    import hetflow
    from hetflow.runtime import load
    if args.model == "mlp":
        from hetflow.examples.mlp import build
    else:
        from hetflow.examples.gpt2_tiny import build
    module, inputs = build()
    print(f"== compiling the example {args.model} for platform {args.platform!r}")
    compiled = hetflow.compile(module, inputs, platform=args.platform)
    print(compiled.report())

    with torch.no_grad():
        expected = module(*inputs)
    start = time.perf_counter()
    got = compiled(*inputs)
    elapsed = time.perf_counter() - start
    error = float((got - expected).abs().max())
    print(f"\n== ran it: {elapsed * 1e3:.1f} ms (measured); max |hetflow - torch eager| = {error:.2e}")

    with tempfile.TemporaryDirectory() as tmp:
        compiled.save(tmp)
        runtime_model = load(tmp)
        feeds = {name: t.numpy() for name, t in zip(runtime_model.input_names, inputs)}
        out = next(iter(runtime_model.run(feeds).values()))
        print(f"== artifact round trip through hetflow.runtime (no torch): max error "
              f"{float(np.abs(out - expected.numpy()).max()):.2e}")
    print("\nPlacement, memory plan and timeline: not built yet (see the README's roadmap).")
    return 0 if error <= 1e-4 * max(1.0, float(expected.abs().max())) else 1


if __name__ == "__main__":
    raise SystemExit(main())
