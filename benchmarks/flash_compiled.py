"""The flash ladder's model compiled by hetflow under a DRAM budget: the tile_flash pass in the pipeline, the
artifact's flash image, the runtime's flash runner. Measured on this machine.

    python benchmarks/flash_compiled.py --dir /var/tmp/hetflow-flash-compiled      # about 5 minutes

The model is ``benchmarks/flash.py``'s OPT-style decoder (24 layers x 1024, FFN 4096, f32, 1.16 GiB, ReLU
sparsity imposed as stated there), captured by ``hetflow.compile`` as a forward pass over a 16-token context
(no KV cache in this graph: each call recomputes the context; the per-token decode ladder with a KV cache
is ``benchmarks/flash.py``'s). Compiled three ways and saved, each artifact then loaded and run in a fresh
process:

* resident: no budget (every weight in ``weights.safetensors``);
* streamed: ``--dram-budget 580 MiB``: FFN layers that do not fit stream whole from the flash image, the next
  layer prefetched while one computes (exact);
* predicted: ``flash_predict`` under the budget plus 96 MiB (its predictors and window caches, sized on the one
  16-token example context, do not fit 580): a predictor per streamed layer picks the neurons to read; a window
  cache keeps the recent ones (approximate).

Printed per artifact: the plan (from the compile report), median ms per call, MiB read from the image per
call, peak RSS over the RSS before the artifact was loaded (against the budget), and the logits' error and
argmax agreement against torch eager on the same context.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CONTEXT = 16
CALLS = 6
MiB = 1 << 20
PREDICTED_EXTRA_MIB = 96   # the predictors and window caches sized on one 16-token context need more than 580 MiB


def _model():
    import torch
    sys.path.insert(0, str(HERE))
    import flash as ladder
    model = ladder.build_model()

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m(input_ids=ids, use_cache=False).logits
    return Logits(model).eval(), ladder.VOCAB


def compile_all(directory: Path, budget_mib: int, platform: str) -> dict:
    import torch

    import hetflow
    wrapped, vocab = _model()
    ids = torch.randint(0, vocab, (1, CONTEXT), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        eager = wrapped(ids).numpy()
    np.savez(directory / "eager.npz", ids=ids.numpy(), logits=eager)
    info = {}
    for name, options in (("resident", {}), ("streamed", {"dram_budget": budget_mib * MiB}),
                          ("predicted", {"dram_budget": (budget_mib + PREDICTED_EXTRA_MIB) * MiB,
                                         "flash_predict": True})):
        began = time.perf_counter()
        compiled = hetflow.compile(wrapped, (ids,), platform=platform, **options)
        seconds = time.perf_counter() - began
        compiled.save(directory / name)
        plan = compiled.flash_plan.describe() if compiled.flash_plan is not None else "no budget: all resident"
        info[name] = {"compile_seconds": seconds, "plan": plan,
                      "image_mib": (directory / name / "flash.bin").stat().st_size / MiB
                      if (directory / name / "flash.bin").exists() else 0.0}
        print(f"compiled {name} in {seconds:.1f} s: {plan}", flush=True)
        del compiled
    return info


def run_artifact(directory: Path, name: str) -> dict:
    from hetflow.runtime import load
    from hetflow.runtime.flash_io import current_rss_bytes, drop_page_cache, peak_rss_bytes
    reference = np.load(directory / "eager.npz")
    image = directory / name / "flash.bin"
    if image.exists():
        drop_page_cache(image)
    import onnxruntime  # noqa: F401  (the libraries' own memory is not the model's: the baseline has them)
    baseline = current_rss_bytes()
    model = load(directory / name)
    feeds = {model.input_names[0]: reference["ids"]}
    seconds, outputs = [], None
    for _ in range(CALLS):
        began = time.perf_counter()
        outputs = model.run(feeds)
        seconds.append(time.perf_counter() - began)
    logits = next(iter(outputs.values()))
    want = reference["logits"]
    runners = [r for r in model.executor.runners if hasattr(r, "stats")]
    read = sum(r.stats().get("bytes_read", 0) for r in runners)
    return {"ms_per_call": float(np.median(seconds[1:]) * 1e3), "read_mib_per_call": read / CALLS / MiB,
            "streamed_layers": sum(1 for r in runners if r.stats()["streamed"]),
            "peak_over_baseline_mib": (peak_rss_bytes() - baseline) / MiB,
            "logits_error": float(np.abs(logits - want).max() / np.abs(want).max()),
            "argmax_equal": int((logits.argmax(-1) == want.argmax(-1)).sum()), "positions": int(want.shape[1])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="where the artifacts go (~2.5 GiB; default: a temporary directory)")
    parser.add_argument("--budget-mib", type=int, default=580)
    parser.add_argument("--platform", default="laptop-ssd",
                        help="a platform with [flash]; a calibrated one ('hetflow calibrate --platform laptop-ssd -o F')")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--reuse", action="store_true", help="run the artifacts a previous run left in --dir")
    args = parser.parse_args(argv)
    directory = Path(args.dir or tempfile.mkdtemp(prefix="hetflow-flash-compiled-"))
    directory.mkdir(parents=True, exist_ok=True)
    if args.worker:
        print(json.dumps(run_artifact(directory, args.worker)))
        return 0
    print(f"artifacts in {directory}; budget {args.budget_mib} MiB; platform {args.platform} (measured)", flush=True)
    if not (args.reuse and (directory / "eager.npz").exists()):
        compile_all(directory, args.budget_mib, args.platform)
    rows = {}
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="2")
    for name in ("resident", "streamed", "predicted"):
        result = subprocess.run([sys.executable, __file__, "--worker", name, "--dir", str(directory)],
                                capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
        r = rows[name] = json.loads(result.stdout.strip().splitlines()[-1])
        budget = args.budget_mib + (PREDICTED_EXTRA_MIB if name == "predicted" else 0)
        within = "within" if r["peak_over_baseline_mib"] <= budget else "OVER"
        against = (f"({within} {'its' if name == 'predicted' else 'the'} {budget} MiB budget)" if name != "resident"
                   else "(compiled without a budget)")
        print(f"  {name:9s} {r['ms_per_call']:8.1f} ms/call  {r['streamed_layers']:2d} FFN layers streamed, read "
              f"{r['read_mib_per_call']:6.1f} MiB/call  peak RSS +{r['peak_over_baseline_mib']:.0f} MiB over the "
              f"pre-load RSS {against}  logits error {r['logits_error']:.1e}, "
              f"argmax equal {r['argmax_equal']}/{r['positions']}", flush=True)
    s, p = rows["streamed"], rows["predicted"]
    print(f"compiled, streamed whole vs resident: {s['ms_per_call'] / rows['resident']['ms_per_call']:.2f}x the time; "
          f"predicted vs streamed whole: {s['ms_per_call'] / p['ms_per_call']:.2f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
