"""ONNX backend node tests through hetflow, scored over the cases onnx's own reference evaluator passes.

    python benchmarks/onnx_conformance.py [--mode interpreter|compiled|gpu-program] [--failures]

``--mode compiled`` runs every case through the compiled host path: the pipeline,
an artifact on disk, hetflow.runtime.load and ONNX Runtime kernels.
``--mode gpu-program`` runs every case as the GPU backend's emitted PyTorch program
(on the CUDA GPU when there is one, else on the CPU); a case with an op the GPU
backend does not emit counts as an "error" (placement keeps such ops off the GPU).

The cases are generated in memory from the installed onnx package. The last line
printed is ``passed/total``: hetflow's passes among the reference evaluator's.
"""
from __future__ import annotations

import argparse
import collections
import sys
import time

from hetflow.conformance import (node_test_cases, prepare_hetflow_compiled, prepare_hetflow_gpu_program,
                                 prepare_hetflow_interpreter, prepare_reference, run_suite)

MODES = {"interpreter": prepare_hetflow_interpreter, "compiled": prepare_hetflow_compiled,
         "gpu-program": prepare_hetflow_gpu_program}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=sorted(MODES), default="interpreter",
                        help="which hetflow path runs the cases (default: the reference interpreter)")
    parser.add_argument("--failures", action="store_true", help="list every failing case with its message")
    args = parser.parse_args(argv)

    start = time.time()
    cases = node_test_cases()
    print(f"{len(cases)} node test cases generated from onnx in {time.time() - start:.1f} s")
    start = time.time()
    reference = run_suite(prepare_reference)
    ref_passed = {r.name for r in reference if r.passed}
    print(f"onnx.reference.ReferenceEvaluator passes {len(ref_passed)}/{len(cases)} ({time.time() - start:.1f} s)")
    start = time.time()
    results = run_suite(MODES[args.mode], names=ref_passed)
    print(f"hetflow ({args.mode}) ran them in {time.time() - start:.1f} s")
    counts = collections.Counter(r.category for r in results)
    for category, n in counts.most_common():
        print(f"  {category:12s} {n}")
    failures = [r for r in results if not r.passed]
    if args.failures:
        for r in failures:
            print(f"  {r.category:12s} {r.name}: {r.message[:160]}")
    passed = sum(r.passed for r in results)
    print(f"pass rate over the reference's passes: {100.0 * passed / len(results):.1f}%")
    print(f"{passed}/{len(results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
