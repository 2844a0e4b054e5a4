"""The quick start: compile an example model for a preset platform, run it, and print what hetflow built.

    python -m hetflow.examples.quickstart [--model gpt2|mlp|resnet18] [--platform mobile-soc] [--placement split]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["gpt2", "mlp", "resnet18"], default="gpt2")
    parser.add_argument("--platform", default="mobile-soc", help="a preset: see 'hetflow platforms'")
    parser.add_argument("--placement", default="split", choices=["roofline", "optimal", "split"])
    args = parser.parse_args(argv)

    import torch

    import hetflow
    from hetflow.runtime import load
    from hetflow.examples import models
    from hetflow.examples.mlp import build as build_mlp
    builders = {"mlp": build_mlp, "resnet18": models.build_resnet18,
                "gpt2": lambda: models.build_gpt2(n_layer=4, n_embd=256, n_head=4, seq=64, vocab=2048)}
    module, inputs = builders[args.model]()
    print(f"== compiling the example {args.model} for platform {args.platform!r} ({args.placement} placement)")
    compiled = hetflow.compile(module, inputs, platform=args.platform, placement=args.placement)
    print(compiled.report())

    with torch.no_grad():
        expected = module(*inputs)
    compiled(*inputs)  # the first call loads the partitions (ONNX Runtime sessions)
    start = time.perf_counter()
    got = compiled(*inputs)
    elapsed = time.perf_counter() - start
    error = float((got - expected).abs().max())
    print(f"\n== ran it on this machine: {elapsed * 1e3:.1f} ms (measured); max |hetflow - torch eager| = {error:.2e}")

    with tempfile.TemporaryDirectory() as tmp:
        compiled.save(tmp)
        runtime_model = load(tmp)
        feeds = {name: t.numpy() for name, t in zip(runtime_model.input_names, inputs)}
        out = next(iter(runtime_model.run(feeds).values()))
        print(f"== artifact round trip through hetflow.runtime (no torch): max error "
              f"{float(np.abs(out - expected.numpy()).max()):.2e}")
    simulated: dict[str, float] = {}
    for event in compiled.executor.last.events:
        if event.modelled is not None:
            simulated[event.device] = simulated.get(event.device, 0.0) + event.modelled
    by_simulator = "; ".join(f"{device} {seconds * 1e3:.3f} ms" for device, seconds in sorted(simulated.items()))
    print("\nThe run is real: CPU partitions ran in ONNX Runtime (measured). Devices this machine lacks ran "
          "functionally: an NPU or PIM runs its emitted program on its simulator, which also models its time "
          f"({by_simulator or 'none here'}); other devices (a phone's GPU) on the reference interpreter. The "
          "placement, memory plan and timeline above are the compiler's predictions for the platform (modelled).")
    for note in compiled.executor.fallbacks:
        print(f"fallback: {note}")
    return 0 if error <= 1e-4 * max(1.0, float(expected.abs().max())) else 1


if __name__ == "__main__":
    raise SystemExit(main())
