"""Token generation: hetflow's Generator against transformers' own generate (eager torch, its KV cache) and
ONNX Runtime running the same prefill and decode-step graphs in a Python loop with the cache fed back.

    python benchmarks/generate.py                         # GPT-2 small, random weights, 512-token prompt, 128 new
    python benchmarks/generate.py --layers 2 --width 128 --heads 2 --vocab 1000 --prompt 32 --new 16 --rounds 1

The model is ``hetflow.examples.gpt2_generate.gpt2_model`` (a GPT2LMHeadModel from a config, random weights
after ``torch.manual_seed(0)``, nothing downloaded). Every peer generates greedily from the same prompt:

  eager    ``model.generate(ids, do_sample=False, use_cache=True, max_new_tokens=N)`` under torch.no_grad()
  hetflow  ``Generator`` over the compiled prefill and decode step (``compile_generator``): the prompt in one
           prefill call, then one decode step per token reading the preallocated cache in place
  ort      the same two torch modules exported with torch.onnx.export, each an ONNX Runtime session (threads
           as the others', all graph optimisations); the prompt in one prefill run, then a Python loop of
           decode-step runs fed views of one preallocated cache, each step's new keys and values written
           back into slot ``position`` (the cache fed back without a copy of it)

Each round runs every peer once (the order rotating; half a second of idle cores before each, since the
threads of the peer before may spin on after its call, ONNX Runtime's and OpenMP's alike, and take a core
from the next) and times the whole call, prefill included: tokens per
second is new tokens / that time, and the ratios are medians of per-round ratios. Decode-only tokens per
second is printed too (eager's: (N - 1) / (t(N) - t(1)), from one extra call of one token per round). The
generated tokens of hetflow and ort are checked against eager's. Targets (issue 17): hetflow >= 1.5x eager
and >= 1.0x the ONNX Runtime loop, tokens identical to eager's. The machine may be shared: say so with the
numbers.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGET_EAGER, TARGET_ORT = 1.5, 1.0
PAUSE = 0.5   # seconds of idle cores before each timed call: the threads of the call before may spin on after it


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens (the prefill graph's length)")
    p.add_argument("--new", type=int, default=128, help="tokens to generate")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0")) or os.cpu_count())
    p.add_argument("--work-dir", help="where the compiled artifacts and ONNX exports go (default: a temp dir)")
    return p.parse_args(argv)


def prepare_eager(model, prompt, new):
    import torch
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)

    def run(count=new):
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, do_sample=False, use_cache=True, max_new_tokens=count,
                                 pad_token_id=0)
        return out[0, len(prompt):].tolist()
    return run


def prepare_hetflow(args, work: Path, new):
    from hetflow.examples.gpt2_generate import compile_generator
    from hetflow.runtime.generate import Generator
    start = time.perf_counter()
    if not (work / "hetflow" / "decode").is_dir():
        compile_generator(work / "hetflow", args.layers, args.width, args.heads, args.vocab,
                          prompt_len=args.prompt, max_seq=args.prompt + args.new)
    compile_s = time.perf_counter() - start
    generator = Generator.load(work / "hetflow", threads=args.threads)   # ONNX Runtime's intra-op threads
    last = {}

    def run(prompt, count=new):
        last["generation"] = generator.generate(prompt, count)
        return list(last["generation"])
    return run, last, compile_s


class OrtLoop:
    """The prefill and decode-step ONNX exports in ONNX Runtime; the cache one buffer fed back in place."""

    def __init__(self, prefill_path: Path, decode_path: Path, threads: int, shape):
        import numpy as np
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.prefill = ort.InferenceSession(str(prefill_path), options, providers=["CPUExecutionProvider"])
        self.decode = ort.InferenceSession(str(decode_path), options, providers=["CPUExecutionProvider"])
        self.kv = np.zeros(shape, np.float32)                 # [n_layer, 2, 1, n_head, max_seq, head_dim]
        names = [i.name for i in self.decode.get_inputs()]    # input_ids, position, then each layer's k and v
        self.ids, self.position = np.zeros((1, 1), np.int64), np.zeros((1,), np.int64)
        self.feeds = {names[0]: self.ids, names[1]: self.position}
        for j, name in enumerate(names[2:]):
            self.feeds[name] = self.kv[j // 2, j % 2]
        self.prefill_names = [i.name for i in self.prefill.get_inputs()]
        self.prompt_len = self.prefill.get_inputs()[0].shape[1]
        self.decode_seconds = []

    def generate(self, prompt, count):
        import numpy as np
        ids = np.zeros((1, self.prompt_len), np.int64)
        ids[0, :len(prompt)] = prompt
        logits, kv = self.prefill.run(None, {self.prefill_names[0]: ids,
                                             self.prefill_names[1]: np.array([len(prompt) - 1], np.int64)})
        self.kv[:, :, :, :, :len(prompt)] = kv[:, :, :, :, :len(prompt)]
        tokens = [int(np.argmax(logits))]
        self.decode_seconds = []
        for position in range(len(prompt), len(prompt) + count - 1):
            start = time.perf_counter()
            self.ids[0, 0], self.position[0] = tokens[-1], position
            logits, new = self.decode.run(None, self.feeds)
            self.kv[:, :, :, :, position] = new[:, :, :, :, 0]
            tokens.append(int(np.argmax(logits)))
            self.decode_seconds.append(time.perf_counter() - start)
        return tokens


def prepare_ort(args, work: Path, threads: int):
    import peers
    from hetflow.examples.gpt2_generate import build_decode, build_prefill
    info = {}
    paths = {"prefill": work / "ort_prefill.onnx", "decode": work / "ort_decode.onnx"}
    for name, build in (("prefill", lambda: build_prefill(args.layers, args.width, args.heads, args.vocab,
                                                          args.prompt)),
                        ("decode", lambda: build_decode(args.layers, args.width, args.heads, args.vocab,
                                                        args.prompt + args.new))):
        if not paths[name].exists():
            module, inputs = build()
            info[name] = peers.export_onnx(module, inputs, paths[name])["exporter"]
            del module
    head_dim = args.width // args.heads
    loop = OrtLoop(paths["prefill"], paths["decode"], threads,
                   (args.layers, 2, 1, args.heads, args.prompt + args.new, head_dim))
    return loop, info


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import numpy as np
    import torch
    torch.set_num_threads(args.threads)
    from hetflow.examples.gpt2_generate import gpt2_model

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="hetflow_generate_"))
    work.mkdir(parents=True, exist_ok=True)
    prompt = np.random.default_rng(0).integers(0, args.vocab, args.prompt).tolist()
    new = args.new
    print(f"GPT-2 {args.layers} layers x {args.width} wide, {args.heads} heads, vocab {args.vocab}, random weights; "
          f"prompt {args.prompt} tokens, {new} new, greedy; {args.threads} threads for every peer "
          f"(torch.set_num_threads, ONNX Runtime intra-op for the ORT loop and hetflow's partitions); {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.2f} at start", flush=True)

    model = gpt2_model(args.layers, args.width, args.heads, args.vocab)
    model.generation_config.eos_token_id = None   # never stop early: every peer makes exactly N tokens
    eager = prepare_eager(model, prompt, new)
    het, het_last, compile_s = prepare_hetflow(args, work, new)
    ort_loop, ort_info = prepare_ort(args, work, args.threads)
    print(f"hetflow compile (prefill + decode) {compile_s:.1f} s; ONNX export {ort_info or 'cached'}", flush=True)

    warm = min(4, new)   # a short warm-up each: first-touch of the weights, thread pools
    eager(warm), het(prompt, warm), ort_loop.generate(prompt, warm)

    runs = {"eager": lambda: eager(new), "hetflow": lambda: het(prompt, new),
            "ort": lambda: ort_loop.generate(prompt, new)}
    order = list(runs)
    seconds = {k: [] for k in runs}
    decode_tps = {k: [] for k in runs}
    tokens = {}
    for r in range(args.rounds):
        for key in order[r % 3:] + order[:r % 3]:
            time.sleep(PAUSE)
            start = time.perf_counter()
            tokens[key] = runs[key]()
            seconds[key].append(time.perf_counter() - start)
        time.sleep(PAUSE)
        start = time.perf_counter()
        eager(1)
        eager_first = time.perf_counter() - start
        decode_tps["eager"].append((new - 1) / max(seconds["eager"][-1] - eager_first, 1e-9))
        decode_tps["hetflow"].append(het_last["generation"].decode_tokens_per_second)
        decode_tps["ort"].append((new - 1) / sum(ort_loop.decode_seconds) if ort_loop.decode_seconds else 0.0)
        print(f"round {r + 1}: " + ", ".join(f"{k} {new / seconds[k][-1]:.2f} tok/s ({seconds[k][-1]:.2f} s)"
                                            for k in order), flush=True)

    tps = {k: statistics.median(new / s for s in seconds[k]) for k in runs}
    ratio_eager = statistics.median(e / h for e, h in zip(seconds["eager"], seconds["hetflow"]))
    ratio_ort = statistics.median(o / h for o, h in zip(seconds["ort"], seconds["hetflow"]))
    generation = het_last["generation"]
    for key in order:
        print(f"{key:8s} {tps[key]:7.2f} tok/s end to end (median of {args.rounds}), decode only "
              f"{statistics.median(decode_tps[key]):7.2f} tok/s")
    print(f"hetflow prefill {generation.prefill_seconds * 1e3:.0f} ms for {args.prompt} tokens; median decode step "
          f"{statistics.median(generation.decode_seconds) * 1e3:.2f} ms")
    same = {k: tokens[k] == tokens["eager"] for k in ("hetflow", "ort")}
    for key, ok in same.items():
        if not ok:
            first = next(i for i, (a, b) in enumerate(zip(tokens[key], tokens["eager"])) if a != b)
            print(f"{key} tokens differ from eager's from token {first}: {tokens[key][first:first + 8]} vs "
                  f"{tokens['eager'][first:first + 8]}")
    print(f"summary: hetflow/eager {ratio_eager:.2f}x (target >= {TARGET_EAGER}x: "
          f"{'met' if ratio_eager >= TARGET_EAGER else 'NOT met'}), hetflow/ort-loop {ratio_ort:.2f}x (target >= "
          f"{TARGET_ORT}x: {'met' if ratio_ort >= TARGET_ORT else 'NOT met'}), greedy tokens identical to eager: "
          f"hetflow {'yes' if same['hetflow'] else 'NO'}, ort {'yes' if same['ort'] else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
