"""The ``hetflow`` command line: compile ahead of time, run and inspect artifacts."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

from hetflow.ir.errors import HetflowError

EPILOG = """\
examples:
  hetflow compile model.onnx -o out/                     compile an ONNX model
  hetflow compile hetflow.examples.mlp:build -o out/     compile a torch module that build() returns
  hetflow run out/ --input x=x.npy --output-dir res/     run the artifact on inputs saved with numpy.save
  hetflow run out/ --random                              run it on random inputs of the declared shapes
  hetflow inspect out/                                   fused groups, op counts, parameters, FLOPs
  hetflow memplan problem.csv --capacity 1048576         solve a static memory allocation problem

Run 'hetflow COMMAND --help' for the options of each command.
"""


class UsageError(HetflowError):
    pass


def _load_model_spec(spec: str):
    """MODEL is a .onnx path or 'package.module:function' / 'file.py:function' returning (module, inputs)."""
    if spec.endswith(".onnx") or (Path(spec).exists() and ":" not in spec):
        return spec, None
    if ":" not in spec:
        raise UsageError(f"MODEL {spec!r} is neither a .onnx file nor 'module:function'")
    module_name, func_name = spec.rsplit(":", 1)
    try:
        if module_name.endswith(".py"):
            if not Path(module_name).exists():
                raise UsageError(f"{module_name}: no such file")
            loader_spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r}: {exc}") from None
    func = getattr(module, func_name, None)
    if func is None:
        raise UsageError(f"{module_name!r} has no function {func_name!r}")
    result = func()
    if not (isinstance(result, tuple) and len(result) == 2):
        raise UsageError(f"{spec} must return (torch_module, example_inputs), got {type(result).__name__}")
    model, example_inputs = result
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    return model, tuple(example_inputs)


def cmd_compile(args) -> int:
    import hetflow
    model, example_inputs = _load_model_spec(args.model)
    start = time.perf_counter()
    compiled = hetflow.compile(model, example_inputs, platform=args.platform, passes=args.passes)
    out = compiled.save(args.output)
    print(compiled.report())
    print(f"\nwrote {out}/ in {time.perf_counter() - start:.2f} s")
    return 0


def _parse_inputs(pairs: list[str]) -> dict[str, np.ndarray]:
    feeds = {}
    for pair in pairs:
        if "=" not in pair:
            raise UsageError(f"--input {pair!r}: expected NAME=FILE.npy")
        name, path = pair.split("=", 1)
        if not Path(path).exists():
            raise UsageError(f"--input {name}: {path}: no such file")
        try:
            feeds[name] = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise UsageError(f"--input {name}: {path} is not a .npy array file: {exc}") from None
    return feeds


def _random_inputs(graph) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for v in graph.inputs:
        if v.type is None or not v.type.is_static:
            raise UsageError(f"--random: input {v.name!r} has a non-static type {v.type}; give --input")
        if v.type.dtype.is_float:
            feeds[v.name] = rng.standard_normal(v.type.shape).astype(v.type.dtype.numpy)
        else:
            feeds[v.name] = rng.integers(0, 2, size=v.type.shape).astype(v.type.dtype.numpy)
    return feeds


def cmd_run(args) -> int:
    from hetflow.runtime import load
    model = load(args.artifact)
    feeds = _random_inputs(model.graph) if args.random else {}
    feeds.update(_parse_inputs(args.input or []))
    start = time.perf_counter()
    outputs = model.run(feeds)
    elapsed = time.perf_counter() - start
    for name, value in outputs.items():
        preview = np.array2string(value.reshape(-1)[:6], precision=4, separator=", ")
        print(f"{name}: {value.dtype}{list(value.shape)} {preview}{' ...' if value.size > 6 else ''}")
        if args.output_dir:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            np.save(Path(args.output_dir) / f"{_file_safe(name)}.npy", value)
    print(f"ran in {elapsed * 1e3:.2f} ms (measured, reference interpreter)")
    return 0


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def cmd_inspect(args) -> int:
    from hetflow.report import graph_summary
    from hetflow.runtime import load
    model = load(args.artifact)
    m = model.manifest
    print(f"artifact {args.artifact}: schema {m['schema']}, hetflow {m.get('hetflow')}, platform {m.get('platform')}, "
          f"created {m.get('created')}")
    print(graph_summary(model.graph))
    if args.ir:
        print()
        print(model.graph)
    return 0


def cmd_memplan(args, rest: list[str]) -> int:
    try:
        from hetflow.passes.memplan import cli
    except ImportError:
        raise UsageError("the memory planner is not available in this build") from None
    return cli(rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hetflow",
        description="hetflow compiles torch and ONNX models for heterogeneous platforms (CPU, GPU, NPU, PIM, "
                    "flash) and runs the result.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("compile", help="compile a model ahead of time into an artifact directory",
                       description="Compile MODEL into an artifact directory (manifest.json, graph.json, "
                                   "weights.safetensors) that 'hetflow run' and hetflow.runtime.load() execute "
                                   "without torch.",
                       epilog="MODEL is a .onnx file, or 'package.module:function' (or 'file.py:function') whose "
                              "function returns (torch_module, example_inputs).")
    p.add_argument("model", metavar="MODEL", help="a .onnx file or module:function")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="artifact directory to write")
    p.add_argument("--platform", default="host", help="target platform preset (default: host)")
    p.add_argument("--passes", metavar="P1,P2", help="run these passes instead of the default pipeline "
                   "(canonicalize,fuse); '' runs none. HETFLOW_DUMP_IR=DIR writes the IR after each pass")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("run", help="run a compiled artifact on inputs",
                       description="Run an artifact. Inputs are .npy files (numpy.save) given by name; names, "
                                   "dtypes and shapes are checked against the compiled model's signature.")
    p.add_argument("artifact", metavar="OUT", help="artifact directory written by 'hetflow compile'")
    p.add_argument("--input", action="append", metavar="NAME=FILE.npy", help="an input, repeatable")
    p.add_argument("--random", action="store_true", help="random values for the inputs not given")
    p.add_argument("--output-dir", metavar="DIR", help="save each output as DIR/NAME.npy")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("inspect", help="summarise an artifact: signature, op counts, parameters, FLOPs",
                       description="Print what an artifact holds.")
    p.add_argument("artifact", metavar="OUT")
    p.add_argument("--ir", action="store_true", help="also print the textual IR")
    p.set_defaults(func=cmd_inspect)

    sub.add_parser("memplan", help="solve a static memory allocation problem (MiniMalloc CSV)", add_help=False)
    return parser


def _version() -> str:
    from hetflow import __version__
    return f"hetflow {__version__}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        if argv and argv[0] == "memplan":
            return cmd_memplan(None, argv[1:])
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return args.func(args)
    except HetflowError as exc:
        print(f"hetflow: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hetflow: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
