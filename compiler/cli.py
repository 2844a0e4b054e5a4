"""The ``hetflow`` command line: compile ahead of time, run and inspect artifacts."""
from __future__ import annotations

import argparse
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
  hetflow run out/ --random --trace t.json --profile     a Perfetto trace; per-group measured vs predicted
  hetflow compile hetflow.examples.models:build_gpt2_decode -o dec/ && hetflow run dec/ --generate 16
  hetflow compile hetflow.examples.gpt2_generate:build_prefill -o gen/prefill   (and :build_decode -o gen/decode)
  hetflow run gen/ --generate 16 --prompt 1,2,3 [--sample --temperature 0.8 --top-k 40 --seed 0]
  hetflow compile model.onnx --platform mobile-soc --placement split -o out/
  hetflow compile hetflow.examples.models:build_gpt2_dynamic --dynamic batch=1..4,seq=2..128 -o dyn/
  hetflow run dyn/ --random --sizes batch=2,seq=64    one artifact, any size in the declared ranges
  hetflow inspect out/ --plot plots/                     placement, timeline; roofline + Gantt PNGs, trace
  hetflow keygen me && hetflow compile model.onnx -o out/ --sign me.key
  hetflow run out/ --random --verify-key me.pub           refuse the artifact unless its signature verifies
  hetflow platforms [show NAME]                          the platform presets
  hetflow memplan problem.csv --capacity 1048576         solve a static memory allocation problem
  hetflow sweep MODEL --platform duplex --set device.pim.channels=80,160 --batch 1,32 -o s.parquet
                                                         a design-space study on Ray; 'hetflow sweep plot s.parquet'
  hetflow compile model.onnx -o out/ --timings           the wall time of each compile stage
  hetflow cache info | clear                             the compile cache (--no-cache: compile from nothing)

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
    from .user_function import import_function
    func = import_function(spec, UsageError)
    result = func()
    if not (isinstance(result, tuple) and len(result) == 2):
        raise UsageError(f"{spec} must return (torch_module, example_inputs), got {type(result).__name__}")
    model, example_inputs = result
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    return model, tuple(example_inputs)


DEFAULT_AXES = {"batch": 0, "seq": 1}  # --dynamic's axis for these names when none is given


def parse_dynamic(text: str) -> list[tuple[str, int | None, tuple[int, int] | None]]:
    """``--dynamic batch,seq=2..128,frames@2=1..64`` as ``[(name, axis or None, (min, max) or None)]``."""
    items = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        head, _, bounds = item.partition("=")
        name, _, axis = head.partition("@")
        if not name.isidentifier() or (axis and not axis.isdigit()):
            raise UsageError(f"--dynamic {item!r}: write NAME[@AXIS][=MIN..MAX], e.g. batch=1..8 or frames@2")
        span = None
        if bounds:
            low, sep, high = bounds.partition("..")
            if not sep or not low.isdigit() or not high.isdigit() or int(low) > int(high):
                raise UsageError(f"--dynamic {item!r}: the range is MIN..MAX with MIN <= MAX, e.g. {name}=1..8")
            span = (int(low), int(high))
        items.append((name, int(axis) if axis else None, span))
    if not items:
        raise UsageError("--dynamic: name at least one size, e.g. --dynamic batch,seq")
    return items


def dynamic_shapes_for(items, model, example_inputs):
    """``--dynamic`` as ``hetflow.compile``'s ``dynamic_shapes``: Dims per input axis for a torch module
    (the size's axis of every input that has it; without a range, 1 up to the example's size), or
    ranges by dim_param name for an ONNX model (a range is then required: there is no example)."""
    if example_inputs is None:
        missing = next((name for name, _, span in items if span is None), None)
        if missing is not None:
            raise UsageError(f"--dynamic {missing}: an ONNX model has no example inputs to take a maximum from; "
                             f"give the range ({missing}=MIN..MAX)")
        return {name: span for name, _, span in items}
    from torch.export import Dim
    specs = [{} for _ in example_inputs]
    for name, axis, span in items:
        axis = DEFAULT_AXES.get(name) if axis is None else axis
        if axis is None:
            raise UsageError(f"--dynamic {name}: say which axis of the inputs it is ({name}@AXIS); only "
                             f"{', '.join(f'{k} ({v})' for k, v in DEFAULT_AXES.items())} have a default")
        holders = [i for i, x in enumerate(example_inputs) if getattr(x, "ndim", 0) > axis]
        if not holders:
            raise UsageError(f"--dynamic {name}: no example input has an axis {axis}")
        largest = max(int(example_inputs[i].shape[axis]) for i in holders)
        low, high = span if span is not None else (1, largest)
        dim = Dim(name, min=low, max=high)
        for i in holders:
            specs[i][axis] = dim
    return tuple(specs)


def cmd_compile(args) -> int:
    import hetflow
    model, example_inputs = _load_model_spec(args.model)
    dynamic = dynamic_shapes_for(parse_dynamic(args.dynamic), model, example_inputs) if args.dynamic else None
    start = time.perf_counter()
    devices = [d for d in args.devices.split(",") if d] if args.devices else None
    _check_output_directory(args.output, "-o")
    if args.sign and not Path(args.sign).is_file():
        raise UsageError(f"--sign {args.sign}: no such key file (make a pair with 'hetflow keygen NAME')")
    compiled = hetflow.compile(model, example_inputs, platform=args.platform, passes=args.passes,
                               placement=args.placement, devices=devices, time_limit=args.time_limit,
                               cpu_backend=args.cpu_backend, dynamic_shapes=dynamic, quantize=args.quantize,
                               cost_model=args.cost_model, dram_budget=args.dram_budget,
                               flash_predict=args.flash_predict, cache=False if args.no_cache else None)
    out = compiled.save(args.output, sign_key=args.sign)
    print(compiled.report(timings=False))
    if args.timings:
        print("\ncompile time per stage (wall, measured in this process)\n" + compiled.timings_table())
    print(f"\nwrote {out}/ in {time.perf_counter() - start:.2f} s" + (f", signed with {args.sign}" if args.sign else ""))
    return 0


def cmd_cache(args) -> int:
    """``hetflow cache info|clear``: the compile cache's directory, entries and size; or empty it."""
    from hetflow import compile_cache
    from hetflow.platform import human_bytes
    root = compile_cache.cache_directory(args.dir)
    if args.action == "clear":
        print(f"removed {compile_cache.clear(root)} entries from {root}")
        return 0
    entries, size = compile_cache.cache_usage(root)
    enabled = "on" if compile_cache.default_enabled() else f"off by default ({compile_cache.ENABLE_ENV}=0)"
    print(f"compile cache: {root} ({enabled}): {entries} entries, {human_bytes(size)}")
    return 0


def _check_output_directory(path: str, option: str) -> None:
    """An output directory option names a directory or nothing yet: an existing file is an error."""
    if Path(path).exists() and not Path(path).is_dir():
        raise UsageError(f"{option} {path}: exists and is not a directory")


def cmd_keygen(args) -> int:
    from hetflow.runtime.artifact import generate_keypair
    private, public = Path(f"{args.name}.key"), Path(f"{args.name}.pub")
    for path in (private, public):
        if path.exists():
            raise UsageError(f"{path} exists: not overwriting a key")
    generate_keypair(private, public)
    print(f"wrote {private} (the private key: keep it; 'hetflow compile --sign {private}') and {public} "
          f"(give it to users: 'hetflow run OUT --verify-key {public}')")
    return 0


def _parse_inputs(pairs: list[str], graph) -> dict[str, np.ndarray]:
    declared = {v.name: v.type for v in graph.inputs}
    feeds = {}
    for pair in pairs:
        if "=" not in pair:
            raise UsageError(f"--input {pair!r}: expected NAME=FILE.npy")
        name, path = pair.split("=", 1)
        if name not in declared:
            raise UsageError(f"unknown input {name!r}; the model's inputs are {list(declared)}")
        feeds[name] = read_npy(path, name, declared[name])
    return feeds


def read_npy(path: str | Path, name: str, declared=None) -> np.ndarray:
    """A ``.npy`` file's array, its header checked (against ``declared``, the input's type) before any
    allocation: a header that declares terabytes, a truncated file or a pickled object is one line, not a
    crash. A big-endian array is converted to this machine's byte order."""
    where = f"--input {name}: {path}"
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{where}: no such file")
    if not path.is_file():
        raise UsageError(f"{where}: not a regular file")
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
        except Exception as exc:  # noqa: BLE001  (numpy's header parser raises whatever its tokenizer does)
            detail = (str(exc).splitlines() or [type(exc).__name__])[0][:120] or "empty"
            raise UsageError(f"{where} is not a .npy array file ({detail})") from None
        if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
            raise UsageError(f"{where} holds {dtype} values (objects or records); inputs are plain numeric arrays")
        count = 1
        for d in shape:
            count *= d
        nbytes = count * dtype.itemsize
        remaining = path.stat().st_size - f.tell()
        if nbytes != remaining:
            raise UsageError(f"{where}: its header declares {dtype}{list(shape)} ({nbytes} bytes), but the file "
                             f"holds {remaining} bytes of data")
        if declared is not None and declared.is_static:  # the runtime's own words, before anything is allocated
            from hetflow.ir.types import DType, TensorType
            try:
                got = TensorType(DType.from_numpy(dtype.newbyteorder("=")), tuple(int(d) for d in shape))
            except (HetflowError, ValueError):
                raise UsageError(f"{where} holds {dtype} values, which hetflow has no type for") from None
            if got.dtype != declared.dtype:
                raise UsageError(f"input {name!r}: expected dtype {declared.dtype.value} ({declared}), got "
                                 f"{got.dtype.value} {got} ({path})")
            if got.shape != tuple(declared.shape):
                raise UsageError(f"input {name!r}: expected shape {declared}, got {got} ({path})")
        data = np.fromfile(f, dtype=dtype, count=count)
    array = data.reshape(shape, order="F" if fortran else "C")
    if not dtype.isnative:
        array = array.astype(dtype.newbyteorder("="))
    return array if array.flags.c_contiguous else np.ascontiguousarray(array)  # (never 0-d made 1-d)


def _random_inputs(graph, sizes_text: str | None = None) -> dict[str, np.ndarray]:
    """Random inputs of the declared shapes; a dynamic size at its maximum, or as ``--sizes`` says."""
    from hetflow.ir.symbolic import SymbolicError, concrete_shape
    sizes = {name: high for name, (low, high) in graph.dims.items()}
    for item in (t for t in (sizes_text or "").split(",") if t.strip()):
        name, _, value = item.strip().partition("=")
        if name not in graph.dims or not value.isdigit():
            raise UsageError(f"--sizes {item!r}: write NAME=N for a declared size "
                             f"({', '.join(graph.dims) or 'this artifact declares none'})")
        sizes[name] = int(value)
    rng = np.random.default_rng(0)
    feeds = {}
    for v in graph.inputs:
        try:
            shape = concrete_shape(v.type.shape, sizes) if v.type is not None else None
        except SymbolicError:
            shape = None
        if shape is None:
            raise UsageError(f"--random: input {v.name!r} has a non-static type {v.type}; give --input")
        if v.type.dtype.is_float:
            feeds[v.name] = rng.standard_normal(shape).astype(v.type.dtype.numpy)
        else:
            feeds[v.name] = rng.integers(0, 2, size=shape).astype(v.type.dtype.numpy)
    return feeds


def cmd_run(args) -> int:
    from hetflow.runtime import load
    if args.output_dir:
        _check_output_directory(args.output_dir, "--output-dir")
    if args.generate is None and (args.sample or args.temperature is not None or args.top_k is not None
                                  or args.seed is not None):
        raise UsageError("--sample, --temperature, --top-k and --seed choose how --generate picks tokens: "
                         "give --generate N too")
    if args.generate and (Path(args.artifact) / "decode").is_dir():
        return _generate_pair(args)
    model = load(args.artifact, fallback=args.fallback, gpu_kernels=args.gpu_kernels, verify_key=args.verify_key,
                 trust_native_code=args.trust_manifest or args.trust_native_code)
    if args.verify_key:
        print(f"signature: manifest.sig verified with {args.verify_key}", file=sys.stderr)
    for note in model.fallbacks:
        print(f"fallback: {note}", file=sys.stderr)
    if args.generate:
        return _generate(model, args)
    if args.sizes and not args.random:
        raise UsageError("--sizes chooses the shapes of --random inputs: give --random too")
    feeds = _random_inputs(model.graph, args.sizes) if args.random else {}
    feeds.update(_parse_inputs(args.input or [], model.graph))
    start = time.perf_counter()
    outputs = model.run(feeds)
    elapsed = time.perf_counter() - start
    if args.trace or args.profile:
        model.run(feeds)  # a warm run: the first one pays for allocation
    for name, value in outputs.items():
        preview = np.array2string(value.reshape(-1)[:6], precision=4, separator=", ")
        print(f"{name}: {value.dtype}{list(value.shape)} {preview}{' ...' if value.size > 6 else ''}")
        if args.output_dir:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            np.save(Path(args.output_dir) / f"{_file_safe(name)}.npy", value)
    fell_back = {p.index for p in model.partitions if any(f"partition {p.index} " in n for n in model.fallbacks)}
    words = {p.index: "on the CPU: --fallback cpu" if p.index in fell_back else _BACKEND_WORDS[p.backend]
             for p in model.partitions}
    backends = sorted({f"{p.device} ({words[p.index]})" for p in model.partitions}) or ["interpreter"]
    print(f"ran in {elapsed * 1e3:.2f} ms (measured; {', '.join(backends)})")
    modelled: dict[str, list[float]] = {}
    for event in model.executor.last.events if model.executor is not None else []:
        if event.modelled is not None:
            modelled.setdefault(event.device, []).append(event.modelled)
    for device, times in sorted(modelled.items()):
        predicted = sum(p.predicted_end - p.predicted_start for p in model.partitions
                        if p.device == device and p.backend in ("npu", "pim", "flash"))
        print(f"  {device}: {sum(times) * 1e3:.3f} ms modelled by its simulator over {len(times)} partitions "
              f"(the cost model predicted {predicted * 1e3:.3f} ms)")
    _print_flash(model)
    if args.trace:
        _write_trace(model, args.trace)
    if args.profile:
        _print_profile(model, feeds)
    return 0


def _flash_reads(model) -> list[dict]:
    """The last run's flash reads (prefetches and waits), as trace events beside the partitions."""
    if model.executor is None:
        return []
    events = {e.name: e for e in model.executor.last.events}
    for part, runner in zip(model.partitions, model.executor.runners):
        event = events.get(part.file)
        if hasattr(runner, "io_events") and event is not None and hasattr(runner, "call_began"):
            start = runner.call_began - event.start   # the run's start, in perf_counter seconds
            return runner.io_events(start)   # the log is shared by every streamed layer
    return []


def _print_flash(model) -> None:
    """What the layers streamed from flash read in the last run (measured on this machine's disk)."""
    stats = [r.stats() for r in (model.executor.runners if model.executor is not None else []) if hasattr(r, "stats")]
    streamed = [s for s in stats if s["streamed"]]
    if streamed:
        mib = 1 << 20
        read = sum(s["bytes_read"] for s in streamed)
        io = sum(s["io_seconds"] for s in streamed)
        print(f"  flash: {len(streamed)} FFN layers streamed ({streamed[0]['mode']}, {streamed[0]['reader']} reads): "
              f"{read / mib:.1f} MiB read over the runs so far, {io * 1e3:.2f} ms waiting on reads (measured)")


def _prompt_ids(args) -> list[int]:
    try:
        return [int(t) for t in args.prompt.split(",") if t.strip()] if args.prompt else [0]
    except ValueError:
        raise UsageError(f"--prompt {args.prompt!r}: expected token ids separated by commas, e.g. 1,2,3") from None


def _choice_options(args) -> dict:
    """--sample, --temperature, --top-k, --seed as ``generate``'s keyword arguments."""
    return {"sample": args.sample, "temperature": 1.0 if args.temperature is None else args.temperature,
            "top_k": args.top_k, "seed": args.seed}


def _generate(model, args) -> int:
    from hetflow.runtime.generate import Generator, generate
    if any(v.name == "cache_0" for v in model.graph.inputs):   # a Generator decode step without its prefill
        return _generate_in_place(Generator(model), args)
    prompt = _prompt_ids(args)
    result = generate(model, prompt, args.generate, max_seq=args.max_seq, **_choice_options(args))
    steps = list(result.step_seconds)
    decode = steps[result.prefill_steps:] or steps
    print(f"prompt {prompt} -> generated {list(result)}")
    print(f"{len(steps)} decode steps ({result.prefill_steps} for the prompt), KV cache in its own paged arena; "
          f"median step {sorted(decode)[len(decode) // 2] * 1e3:.2f} ms (measured)")
    return 0


def _generate_pair(args) -> int:
    """``hetflow run DIR --generate N`` on a generator directory (DIR/decode, optionally DIR/prefill)."""
    from hetflow.runtime.generate import Generator
    generator = Generator.load(args.artifact, fallback=args.fallback, gpu_kernels=args.gpu_kernels,
                               verify_key=args.verify_key,
                               trust_native_code=args.trust_manifest or args.trust_native_code)
    for model in (generator.prefill, generator.decode):
        for note in model.fallbacks if model is not None else ():
            print(f"fallback: {note}", file=sys.stderr)
    return _generate_in_place(generator, args)


def _generate_in_place(generator, args) -> int:
    """Generate with a ``Generator`` (the KV cache one buffer written in place) and print what was measured."""
    prompt = _prompt_ids(args)
    if args.max_seq is not None and args.max_seq > generator.max_seq:
        raise UsageError(f"--max-seq {args.max_seq} exceeds the decode step's KV cache of {generator.max_seq} tokens")
    if args.max_seq is not None and len(prompt) + args.generate - 1 > args.max_seq:
        raise UsageError(f"--max-seq {args.max_seq}: a prompt of {len(prompt)} token(s) plus {args.generate} "
                         f"generated needs {len(prompt) + args.generate - 1} cached tokens")
    result = generator.generate(prompt, args.generate, **_choice_options(args))
    how = "sampled" if args.sample else "greedy"
    print(f"prompt {prompt} -> generated ({how}) {list(result)}")
    prefill = (f"one prefill call of {generator.prompt_len} tokens" if generator.prefill is not None
               else "no prefill artifact")
    print(f"prefill {result.prefill_seconds * 1e3:.2f} ms ({prefill}, {result.prefill_steps} call(s)); decode "
          f"{result.decode_tokens_per_second:.2f} tokens/s over {len(result.decode_seconds)} step(s); "
          f"{result.tokens_per_second:.2f} tokens/s overall (measured); KV cache one buffer of "
          f"{generator.kv.nbytes / 2**20:.1f} MiB for {generator.max_seq} tokens, written in place")
    return 0


_BACKEND_WORDS = {"cpu": "ONNX Runtime, measured", "cuda": "PyTorch/Triton on the CUDA GPU, measured",
                  "tvm-llvm": "TVM LLVM, measured", "npu": "NPU program on its simulator: functional, time modelled",
                  "simulated": "simulated: functional, time modelled", "transfer": "copy",
                  "pim": "PIM command stream on the DRAM PIM simulator, time modelled",
                  "flash": "FFN layers streamed from the flash image"}


def _write_trace(model, path) -> None:
    from hetflow.passes.schedule import Schedule
    from hetflow.plots import chrome_trace
    manifest = model.manifest
    schedule = Schedule.from_dict(manifest["schedule"]) if "schedule" in manifest else Schedule(
        manifest.get("platform", "?"))
    measured = [e.as_dict() for e in model.executor.last.events] if model.executor is not None else []
    measured += _flash_reads(model)
    chrome_trace(schedule, path, measured=measured)
    print(f"wrote {path}: predicted timeline (modelled) beside the measured run; open it in ui.perfetto.dev")


def _print_profile(model, feeds) -> None:
    from hetflow.report import table
    from hetflow.profile import profile
    rows = profile(model.graph, model.platform, {k: v if v.flags.c_contiguous else np.ascontiguousarray(v)
                                                             for k, v in feeds.items()})
    body = [[r.name[:30], r.kind[:14], r.device, f"{r.predicted * 1e6:.1f}", f"{r.measured * 1e6:.1f}",
             f"{r.measured / r.predicted:.2f}" if r.predicted and r.real else "-",
             {"cpu": "measured", "cuda": "measured (copies in and out included)"}.get(
                 r.backend, "simulated (NumPy wall time)")] for r in rows]
    print(table(body, ["group", "kind", "device", "predicted us", "measured us", "ratio", "how"]))
    real = [r for r in rows if r.real]
    total_p = sum(r.predicted for r in real)
    total_m = sum(r.measured for r in real)
    print(f"groups on real devices: predicted {total_p * 1e3:.2f} ms (modelled), measured {total_m * 1e3:.2f} ms "
          "(each group alone)")


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def cmd_inspect(args) -> int:
    from hetflow.report import graph_summary
    from hetflow.runtime import load
    model = load(args.artifact, verify_key=args.verify_key, prepare=False)  # read and checked, nothing loaded
    m = model.manifest
    print(f"artifact {args.artifact}: schema {m['schema']}, hetflow {m.get('hetflow')}, platform {m.get('platform')}"
          + (f", created {m['created']}" if m.get("created") else ""))
    print(f"manifest {model.digest}" + (f" (signature verified with {args.verify_key})" if model.signed else
                                        " (signature not checked: --verify-key PUB checks it)"))
    print(graph_summary(model.graph))
    _print_placement(model, args)
    if args.device:
        _print_programs(model, args.artifact, args.device)
    if args.ir:
        print()
        print(model.graph)
    return 0


def _print_programs(model, artifact, device: str) -> None:
    """``--device D``: the disassembly of the device's NPU programs (the files the manifest's hashes checked)."""
    from hetflow.backends.npu import disassemble
    entries = [e for e in model.manifest["partitions"] if e["device"] == device]
    if not entries:
        raise UsageError(f"--device {device!r}: no partition of this artifact runs on it")
    for entry in entries:
        print(f"\npartition {entry['index']} ({entry['file']}, backend {entry['backend']})")
        if entry["backend"] != "npu":
            print("  (no program to disassemble: this backend stores the partition's IR or a binary)")
            continue
        text = (Path(artifact) / entry["file"]).read_text()
        try:
            print(disassemble(text))
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{entry['file']} is not a readable NPU program: {type(exc).__name__}: "
                             f"{str(exc)[:120]}") from None


def _print_placement(model, args) -> None:
    from hetflow.passes.cost import cost_node
    from hetflow.platform import platform_from_dict
    from hetflow.passes.schedule import Schedule
    from hetflow.report import placement_table, provenance, timeline_text
    manifest = model.manifest
    if "platform_data" not in manifest:
        return
    platform = platform_from_dict(manifest["platform_data"], "artifact platform")
    nodes = [n for n in model.graph.nodes if n.op != "hetflow.transfer" and n.meta.get("device") in platform.devices]
    costs = [cost_node(n, platform) for n in nodes]
    placement = manifest.get("placement", {})
    print(f"\nplacement ({placement.get('policy', '?')}; {placement.get('solver', '')})")
    print(placement_table(costs))
    if "memory_plan" in manifest:
        from hetflow.passes.plan_memory import MemoryPlanReport, SpacePlan
        from hetflow.report import memory_table
        plans = MemoryPlanReport({m: SpacePlan(m, p["size"], p["lower_bound"], p["greedy"], p["no_reuse"],
                                               p["offsets"], p["method"], p["note"], buffers=len(p["offsets"]))
                                  for m, p in manifest["memory_plan"].items()})
        print("\nmemory plan\n" + memory_table(plans))
    schedule = None
    if "schedule" in manifest:
        schedule = Schedule.from_dict(manifest["schedule"])
        print("\ntimeline\n" + timeline_text(schedule))
        print(provenance(platform))
    if args.plot:
        from hetflow.plots import write_plots
        for path in write_plots(args.plot, costs, platform, schedule):
            print(f"wrote {path}")


def cmd_platforms(args) -> int:
    from hetflow.platform import load_platform, preset_names
    from hetflow.report import human_bytes, table
    if args.action == "show":
        if not args.name:
            raise UsageError("usage: hetflow platforms show NAME")
        platform = load_platform(args.name)
        print(f"{platform.name}: {platform.description}\nsource: {platform.source}")
        print(f"sync: flag {platform.sync * 1e6:.1f} us, driver {platform.driver_sync * 1e6:.0f} us")
        rows = []
        for d in platform.devices.values():
            peaks = ", ".join(f"{k} {v / 1e12:g} TFLOP/s" for k, v in d.peak.items())
            rows.append([d.name, d.kind, d.memory, peaks, f"{d.bandwidth / 1e9:g} GB/s",
                         f"{d.launch * 1e6:g} us" + (f" + {d.op_launch * 1e6:g} us/op" if d.op_launch else ""),
                         str(d.tile), "measured" if d.measured else "from the source",
                         d.source[:60]])
        print(table(rows, ["device", "kind", "memory", "peak", "bandwidth", "launch", "tile", "figures", "source"]))
        rows = [[m.name, human_bytes(m.capacity), f"{m.bandwidth / 1e9:g} GB/s",
                 " / ".join(f"{b / 1e9:g}" for b in m.shared) + " GB/s", "yes" if m.unified else "no"]
                for m in platform.memories.values()]
        print(table(rows, ["memory", "capacity", "bandwidth", "shared by 1/2/.. devices", "unified"]))
        for link in platform.links:
            print(f"link {link.name}: {link.src} <-> {link.dst}, {link.bandwidth / 1e9:g} GB/s, {link.latency * 1e6:g} us")
        if platform.flash:
            f = platform.flash
            points = ", ".join(f"{human_bytes(c)}: {t / 1e9:g} GB/s" for c, t in f.throughput)
            print(f"flash: page {human_bytes(f.page_size)}, read latency {f.read_latency * 1e6:g} us, "
                  f"{f.channels} channels; throughput by chunk: {points}")
        return 0
    rows = []
    for name in preset_names():
        platform = load_platform(name)
        rows.append([name, ", ".join(f"{d.name} ({d.kind})" for d in platform.devices.values()),
                     platform.source[:70]])
    print(table(rows, ["platform", "devices", "source"]))
    print("\n'hetflow platforms show NAME' prints one; a .toml file of the same form can be given to --platform.")
    return 0


def cmd_calibrate(args) -> int:
    if args.platform == "host+cuda":
        return _calibrate_cuda(args)
    if args.platform not in (None, "host"):
        from hetflow.platform import load_platform
        platform = load_platform(args.platform)
        if args.disk_dir is not None or (platform.flash is not None and not simulated_devices(platform)):
            return _calibrate_disk(args, platform)
        return _calibrate_simulated(args)
    if args.disk_dir is not None:
        raise UsageError("--disk-dir measures the disk of a platform with a [flash] section: "
                         "'hetflow calibrate --platform laptop-ssd --disk-dir DIR'")
    if args.output:
        raise UsageError("-o is for a platform with simulated devices ('hetflow calibrate --platform mobile-soc "
                         "-o FILE'); the host's fit is saved in the cache and used by the host preset")
    from hetflow.calibrate import calibrate_host
    print("calibrating the host platform: compiling and timing the calibration models (about a minute)", flush=True)
    result = calibrate_host(repeats=args.repeat)
    _print_fit(result, "group")
    return 0


def _print_fit(result: dict, unit: str) -> None:
    print(f"fitted: {result['gemm_flops'] / 1e9:.1f} GFLOP/s, {result['memory_bandwidth'] / 1e9:.1f} GB/s, "
          f"{result['launch'] * 1e6:g} us per {unit} + {result['op_launch'] * 1e6:g} us per op in it, "
          f"{result['call_overhead'] * 1e6:g} us per call")
    for sample in result["fitted_on"]:
        error = sample["predicted"] / sample["measured"] - 1
        print(f"  {sample['model']:18s} measured {sample['measured'] * 1e3:8.2f} ms   predicted "
              f"{sample['predicted'] * 1e3:8.2f} ms   ({100 * error:+.0f}%)")


def _calibrate_cuda(args) -> int:
    from hetflow.calibrate import calibrate_cuda
    if args.output or args.disk_dir is not None:
        raise UsageError("host+cuda's fit is saved in the cache and used by the host+cuda preset: no -o or "
                         "--disk-dir")
    print("calibrating host+cuda: compiling the calibration models onto the CUDA GPU alone and timing them "
          "(a few minutes)", flush=True)
    result = calibrate_cuda(repeats=args.repeat)
    print(f"GPU: {result['name']}; measured peak {result['f32_flops'] / 1e12:.1f} TFLOP/s f32, "
          f"copy {result['memory_bandwidth'] / 1e9:.0f} GB/s")
    _print_fit(result["fitted"], "kernel")
    return 0


def _calibrate_disk(args, platform) -> int:
    from hetflow.calibrate import calibrate_disk, chunk_name, write_disk_platform
    from hetflow.report import table as _table
    if platform.flash is None:
        raise UsageError(f"--disk-dir: platform {platform.name!r} has no [flash] section to measure "
                         "(laptop-ssd and flash-edge have one)")
    output = Path(args.output or f"{platform.name}-disk.toml")
    if output.exists() and not output.is_file():
        raise UsageError(f"-o {output}: exists and is not a file")
    directory = Path(args.disk_dir or ".")
    print(f"measuring this machine's disk for {platform.name}'s [flash]: random-offset aligned reads of a temporary "
          f"{args.disk_bytes} MiB file in {directory.resolve()}, by chunk size and thread count (about "
          f"{36 * args.disk_seconds + 5:.0f} s)", flush=True)
    result = calibrate_disk(directory, file_bytes=args.disk_bytes * 1024 * 1024, seconds_per_point=args.disk_seconds,
                            progress=lambda line: print(line, flush=True))
    table = result["table"]
    threads = sorted(next(iter(table.values())))
    rows = [[chunk_name(c)] + [f"{table[c][n] / 1e9:.3f}" for n in threads] + [str(result["best_threads"][c])]
            for c in sorted(table)]
    engine = "native AIO" if result.get("engine") == "aio" else "reader threads"
    print(f"measured read throughput, GB/s ({result['mode']}, {engine}; rows: chunk, columns: reads in flight):")
    print(_table(rows, ["chunk"] + [f"{n} in flight" for n in threads] + ["best"]))
    if simulated_devices(platform):
        print(f"  ({platform.name}'s simulated devices are not refitted here: 'hetflow calibrate --platform "
              f"{platform.name}' without --disk-dir does that)")
    write_disk_platform(platform.name, result, output)
    print(f"wrote {output}: [flash] throughput at each chunk's best count of reads in flight, channels = {result['channels']}; "
          f"use it with --platform {output}")
    return 0


def simulated_devices(platform) -> list[str]:
    from hetflow.calibrate import SIM_KINDS
    return [d.name for d in platform.devices.values() if d.kind in SIM_KINDS]


def _calibrate_simulated(args) -> int:
    from hetflow.calibrate import WITHIN, calibrate_simulated, write_calibrated_platform
    from hetflow.platform import load_platform
    platform = load_platform(args.platform)
    output = Path(args.output or f"{platform.name}-sim.toml")
    if output.exists() and not output.is_file():
        raise UsageError(f"-o {output}: exists and is not a file")
    print(f"fitting {platform.name}'s simulated devices to their simulators: each benchmark group emitted, "
          "simulated, and the analytic model's figures fitted (modelled both sides)", flush=True)
    result = calibrate_simulated(args.platform)
    for name, fit in result.items():
        device, before, after = fit["device"], fit["before"], fit["after"]
        peaks = ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in device.peak.items())
        print(f"  {name}: peak {peaks}; bandwidth {device.bandwidth / 1e9:.1f} GB/s; launch {device.launch * 1e6:g} us "
              f"+ {device.op_launch * 1e6:g} us per op" + (f"; stationary penalty {device.stationary_penalty:g}"
                                                          if device.kind == "npu" else ""))
        print(f"    simulator / analytic over {fit['samples']} groups: before median {before['median']:.2f}, "
              f"{before['within']}/{before['of']} within {WITHIN:.0%}; after median {after['median']:.2f}, "
              f"{after['within']}/{after['of']} within {WITHIN:.0%} (worst {after['worst']:.2f})")
    write_calibrated_platform(platform.name, result, output)
    print(f"wrote {output}: use it with --platform {output}")
    return 0


def cmd_memplan(args, rest: list[str]) -> int:
    from hetflow.memplan_cli import cli
    return cli(rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hetflow",
        description="hetflow compiles torch and ONNX models for heterogeneous platforms (CPU, GPU, NPU, PIM, "
                    "flash) and runs the result.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--debug", action="store_true", help="on an error, print the Python traceback too "
                        "(anywhere on the command line; or HETFLOW_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("compile", help="compile a model ahead of time into an artifact directory",
                       description="Compile MODEL into an artifact directory (manifest.json, graph.json, "
                                   "weights.safetensors) that 'hetflow run' and hetflow.runtime.load() execute "
                                   "without torch.",
                       epilog="MODEL is a .onnx file, or 'package.module:function' (or 'file.py:function') whose "
                              "function returns (torch_module, example_inputs).")
    p.add_argument("model", metavar="MODEL", help="a .onnx file or module:function")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="artifact directory to write")
    p.add_argument("--platform", default="host",
                   help="a preset (see 'hetflow platforms') or a platform .toml file (default: host)")
    p.add_argument("--placement", default="roofline", choices=["roofline", "optimal", "split"],
                   help="roofline: each group to its fastest device; optimal: minimum predicted makespan with "
                        "transfer and sync costs (CP-SAT); split: optimal, then MatMuls split across two devices")
    p.add_argument("--devices", metavar="D1,D2", help="place only on these devices of the platform")
    p.add_argument("--time-limit", type=float, default=10.0, metavar="S", help="seconds for each exact solver")
    p.add_argument("--cost-model", choices=["analytic", "sim"], default="analytic",
                   help="how placement times a group on a device: analytic (default: the roofline, with the "
                        "NPU's tile padding and operand order and the PIM's channel use) or sim: a group that "
                        "could go to an NPU or PIM is emitted for it and timed by its simulator (cached per "
                        "distinct group), so placement agrees with what 'hetflow run' models; slower to compile")
    p.add_argument("--dram-budget", metavar="SIZE",
                   help="the DRAM the model may use, e.g. '580 MiB': feed-forward layers that do not fit stream "
                        "from flash while the model runs (needs a platform with [flash]: laptop-ssd, calibrated "
                        "by 'hetflow calibrate --platform laptop-ssd', or flash-edge). Without it, the platform's "
                        "DRAM when the weights exceed it")
    p.add_argument("--flash-predict", action="store_true",
                   help="with a DRAM budget: read only the neurons a low-rank predictor picks, kept in a window "
                        "cache (LLM in a flash); approximate: the report gives the recall on the example inputs")
    p.add_argument("--cpu-backend", choices=["onnxruntime", "tvm"], default="onnxruntime",
                   help="what runs the CPU partitions: ONNX Runtime (default) or a native library TVM compiles "
                        "now for this CPU (untuned LLVM; needs apache-tvm)")
    p.add_argument("--sign", metavar="KEY", help="sign the artifact's manifest with this Ed25519 private key (PEM; "
                   "'hetflow keygen NAME' makes one): users check it with 'hetflow run OUT --verify-key PUB'")
    p.add_argument("--dynamic", metavar="NAME[=MIN..MAX],...",
                   help="sizes that vary between calls: one artifact runs every size in the ranges (placement "
                        "and the memory plan are made for the maximum; a call outside is refused). For a torch "
                        "model, 'batch' is axis 0 and 'seq' axis 1 of every input that has it (another name: "
                        "NAME@AXIS), from 1 up to the example's size unless a range is given; for an ONNX "
                        "model each NAME is an input dim_param and needs its range, e.g. batch=1..8,seq=1..512")
    p.add_argument("--passes", metavar="P1,P2", help="run these passes instead of the default pipeline "
                   "(canonicalize,fuse); '' runs none. HETFLOW_DUMP_IR=DIR writes the IR after each pass")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8: run the MatMul/Gemm placed on an NPU that runs i8 (mobile-soc, flash-edge) in int8: "
                        "per-output-channel weights, activations calibrated on the example inputs (random ones "
                        "for a .onnx file); the report gives the error against float. Default: floats")
    p.add_argument("--timings", action="store_true",
                   help="print the wall time of each compile stage: capture (torch.export, decompositions, import), "
                        "each pass and the verification after it, the plan check, emission, save, the cache")
    p.add_argument("--no-cache", action="store_true",
                   help="compile from nothing and store nothing (default: the compile cache, $HETFLOW_CACHE_DIR or "
                        "~/.cache/hetflow/compile, returns the artifact of an identical earlier compile)")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("cache", help="the compile cache: where it is and what it holds, or empty it",
                       description="The compile cache keeps compiled models under a key of the model's weights, "
                                   "code and configuration, the example inputs' shapes, the options and the platform.")
    p.add_argument("action", choices=["info", "clear"], help="info: directory, entries, size; clear: remove them")
    p.add_argument("--dir", help="the cache directory (default: $HETFLOW_CACHE_DIR or ~/.cache/hetflow/compile)")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("run", help="run a compiled artifact on inputs",
                       description="Run an artifact. Inputs are .npy files (numpy.save) given by name; names, "
                                   "dtypes and shapes are checked against the compiled model's signature.")
    p.add_argument("artifact", metavar="OUT", help="artifact directory written by 'hetflow compile'")
    p.add_argument("--input", action="append", metavar="NAME=FILE.npy", help="an input, repeatable")
    p.add_argument("--random", action="store_true", help="random values for the inputs not given")
    p.add_argument("--sizes", metavar="NAME=N,...", help="with --random, for an artifact compiled with --dynamic: "
                   "the sizes to run at (default: each at its declared maximum), e.g. batch=2,seq=64")
    p.add_argument("--output-dir", metavar="DIR", help="save each output as DIR/NAME.npy")
    _add_trust_options(p)
    p.add_argument("--fallback", choices=["cpu"], help="run partitions built for a device this machine lacks "
                   "(a CUDA GPU) on the CPU instead, and say so")
    p.add_argument("--gpu-kernels", choices=["triton", "torch"], default="triton",
                   help="how partitions placed on a CUDA GPU run: Triton kernels that TorchInductor generates "
                        "at load time (default), or PyTorch's own CUDA kernels (no compile wait); either way "
                        "each partition is one CUDA graph replay")
    p.add_argument("--trace", metavar="FILE.json", help="write a Chrome/Perfetto trace: what ran where and when "
                   "(measured), beside the predicted timeline")
    p.add_argument("--profile", action="store_true", help="run each group on its own and print its measured time "
                   "beside the predicted one")
    p.add_argument("--generate", type=int, metavar="N", help="generate N tokens: OUT a generator directory "
                   "(OUT/decode and OUT/prefill, hetflow.examples.gpt2_generate: the prompt in one prefill call, "
                   "then one decode step per token over a KV cache written in place), or a decode-step model "
                   "(inputs input_ids, position, k_cache, v_cache; outputs logits, new_k, new_v)")
    p.add_argument("--prompt", metavar="IDS", help="with --generate: the prompt's token ids, e.g. 1,2,3 (default 0)")
    p.add_argument("--sample", action="store_true", help="with --generate: sample each token from the softmax "
                   "of the logits instead of taking the argmax")
    p.add_argument("--temperature", type=float, metavar="T", help="with --sample: divide the logits by T (default 1)")
    p.add_argument("--top-k", type=int, metavar="K", help="with --sample: draw from the K most likely tokens only")
    p.add_argument("--seed", type=int, metavar="S", help="with --sample: the seed of the sampler (the same seed, "
                   "the same tokens)")
    p.add_argument("--max-seq", type=int, metavar="N", help="with --generate: the KV cache's capacity in tokens "
                   "(default: the model's context)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("inspect", help="summarise an artifact: signature, op counts, parameters, FLOPs",
                       description="Print what an artifact holds.")
    p.add_argument("artifact", metavar="OUT")
    p.add_argument("--ir", action="store_true", help="also print the textual IR")
    p.add_argument("--device", metavar="NAME", help="disassemble the programs of the partitions on device NAME "
                   "(e.g. --device npu)")
    p.add_argument("--verify-key", metavar="PUB", help="check manifest.sig with this Ed25519 public key (PEM)")
    p.add_argument("--plot", metavar="DIR", help="write roofline.png, timeline.png (Gantt) and trace.json "
                   "(Chrome/Perfetto: open it in ui.perfetto.dev) into DIR")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("platforms", help="list the platform presets, or show one",
                       description="Platform presets: devices, memories, links and flash, each number citing "
                                   "its source.")
    p.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    p.add_argument("name", nargs="?", help="the preset to show")
    p.set_defaults(func=cmd_platforms)

    p = sub.add_parser("calibrate", help="fit the host platform's cost model to measured runs on this machine "
                       "(or a platform's NPU/PIM model to their simulators, or measure the disk for its [flash]: "
                       "--platform)",
                       description="Compile seven models on this CPU, time them in five interleaved rounds, fit the host "
                                   "platform's GEMM FLOP/s, bandwidth and per-call, per-group and per-op costs to "
                                   "the measurements, and save them (the host preset uses them from then on; "
                                   "'hetflow platforms show host' says so). About a minute. With --platform: fit "
                                   "its NPU/PIM devices to their simulators, or, for a platform with [flash] and no "
                                   "NPU/PIM (laptop-ssd) or with --disk-dir, measure this machine's disk read "
                                   "throughput by chunk size and threads (about 20 s). With --platform host+cuda: "
                                   "the same models compiled onto the CUDA GPU alone and timed there, the GPU's "
                                   "achieved GEMM rate, bandwidth and per-kernel costs fitted (needs a GPU).")
    p.add_argument("--repeat", type=int, default=10, help="timed runs per model (median)")
    p.add_argument("--platform", metavar="PRESET",
                   help="instead of the host: fit the analytic cost model of this platform's simulated devices "
                        "(NPU, PIM) to their simulators on benchmark groups (decode steps, a MoE layer, GEMMs), "
                        "and write a platform file over the preset with the fitted figures (seconds); for a platform "
                        "with [flash] and no NPU/PIM, measure the disk instead (see --disk-dir)")
    p.add_argument("-o", "--output", metavar="FILE", help="with --platform: the platform file to write "
                   "(default PRESET-sim.toml; PRESET-disk.toml for a disk measurement)")
    p.add_argument("--disk-dir", metavar="DIR", help="measure this machine's disk instead (the default for a "
                   "platform with [flash] and no NPU/PIM, e.g. laptop-ssd): write a temporary file in DIR (default "
                   "the current directory; put it where the weights will live), time random aligned reads by chunk "
                   "size (4 KiB to 1 MiB) and threads (1 to 32) with O_DIRECT where the file system takes it, and "
                   "write a platform file over the preset with the measured [flash] throughput curve")
    p.add_argument("--disk-bytes", type=int, default=256, metavar="MIB", help="with a disk measurement: the "
                   "temporary file's size in MiB (default 256; it is deleted after)")
    p.add_argument("--disk-seconds", type=float, default=0.5, metavar="S", help="with a disk measurement: seconds "
                   "of reads per (chunk, threads) point, 36 points (default 0.5)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("keygen", help="make an Ed25519 key pair for signing artifacts",
                       description="Write NAME.key (private: 'hetflow compile --sign NAME.key') and NAME.pub "
                                   "(public: 'hetflow run OUT --verify-key NAME.pub').")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_keygen)

    sub.add_parser("memplan", help="solve a static memory allocation problem (MiniMalloc CSV)", add_help=False)

    from hetflow.sweep_cli import add_sweep_parser
    add_sweep_parser(sub)
    return parser


def _add_trust_options(p) -> None:
    p.add_argument("--verify-key", metavar="PUB", help="refuse the artifact unless its manifest.sig verifies with "
                   "this Ed25519 public key (PEM); the manifest hashes every other file")
    p.add_argument("--trust-native-code", action="store_true",
                   help="load native libraries (TVM partitions, .so), which run their author's code; off by default")
    p.add_argument("--trust-manifest", metavar="SHA256", help="like --trust-native-code, for the artifact whose "
                   "manifest has this digest only ('hetflow inspect' prints it)")


def _version() -> str:
    from hetflow import __version__
    return f"hetflow {__version__}"


# errors a bad input or a full disk gives that are not hetflow's own: one line too, the traceback with --debug
ONE_LINE_ERRORS = (OSError, EOFError, MemoryError, OverflowError, UnicodeDecodeError)


def main(argv: list[str] | None = None) -> int:
    import os
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("HETFLOW_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    try:
        if argv and argv[0] == "memplan":
            return cmd_memplan(None, argv[1:])
        if argv[:2] == ["sweep", "plot"]:
            from hetflow.sweep_cli import cmd_sweep_plot
            return cmd_sweep_plot(argv[2:])
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return args.func(args)
    except HetflowError as exc:
        _report(exc, debug, str(exc))
        return 1
    except BrokenPipeError:  # the reader went away (| head): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except ONE_LINE_ERRORS as exc:
        _report(exc, debug, _describe(exc))
        return 1
    except KeyboardInterrupt:
        print("hetflow: interrupted", file=sys.stderr)
        return 130


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}"
    if isinstance(exc, MemoryError):
        return "out of memory" + (f" ({exc})" if str(exc) else "")
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text ({exc.reason} at byte {exc.start})"
    return f"{type(exc).__name__}: {exc}"


def _report(exc: BaseException, debug: bool, message: str) -> None:
    """hetflow's own errors as they are written (one line, some with the IR around a node); any other error as
    its first line, with a pointer to --debug."""
    if debug:
        import traceback
        traceback.print_exception(exc, file=sys.stderr)
    elif not isinstance(exc, HetflowError):
        message = " ".join((message.splitlines() or [""])[0].split())[:400] + "  (--debug shows the traceback)"
    print(f"hetflow: error: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
