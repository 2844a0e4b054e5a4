"""A decoder whose weights are twice a DRAM budget, generating tokens with its FFN weights streamed from this
machine's disk: LLM in a flash's ladder, measured.

    python benchmarks/flash.py                      # about 5 minutes; needs ~2 GiB free in --dir
    python benchmarks/flash.py --tokens 4 --budget-mib 580 --dir /var/tmp/hetflow-flash

The model: an OPT-style decoder (transformers' OPT: pre-LayerNorm, ReLU FFN) of 24 layers, 1024 wide, FFN
4096, vocabulary 8192, random weights (seeded; nothing downloaded), f32: 1.16 GiB of weights against a
580 MiB budget. Two things random weights lack and trained ones have are put in, stated here, not learnt:

* sparsity: random weights fire half of a ReLU FFN's neurons, a trained OPT a few percent (LLM in a flash:
  about 97% sparsity in OPT-6.7B). Each fc1 bias is set, layer by layer, to the 99.5th percentile of its
  neuron's pre-activation over sixteen random calibration sequences;
* a falling spectrum: a Gaussian matrix's singular values are flat, a trained projection's fall fast, and
  a low-rank predictor works only on the latter. Each fc1 weight is rebuilt as U diag(k^-1) V^T (random
  orthogonal U, V; its Frobenius norm kept).

Steps (each rung in a fresh process, so its peak RSS is its own):

1. the disk: ``hetflow.calibrate.calibrate_disk`` measures this machine's read throughput by chunk size
   (O_DIRECT where the file system takes it; native AIO, 32 reads in flight, where the kernel allows it)
   -> the throughput curve the plan uses. A cloud disk's rate moves 2x within minutes, so each rung's
   achieved throughput is set against the disk measured again just before and just after that rung
   (``hetflow.calibrate.read_curve``: random reads of each chunk size from the flash image itself), the
   mean of the two at the rung's mean read size. A rung whose reads are sequential runs (naive: whole
   layers) or sorted neighbours reads faster than random reads of the same size: it shows above 100%;
2. prepare: the model is built, its FFN inputs recorded on calibration sequences (active, window and new
   neuron fractions measured), ``hetflow.passes.flash_plan.plan_flash`` decides what stays in DRAM under
   the budget, the predictors are built (truncated SVD, margin for 95% recall), the FFN weights written as
   flash images (bundled and unbundled), the rest saved as the resident weights, and the fully resident
   model's greedy generation kept as the reference;
3. the ladder, per token (decode steps after a 16-token prompt), every rung under the same budget. Each
   decode step is fed the next token of a fixed random continuation, the same for every rung (teacher
   forcing): a random model's greedy output repeats one token, which is no text's distribution; each
   step's argmax is still compared with the fully resident run's:
   naive (every FFN weight read from flash each token), resident (as many FFN layers kept in DRAM as the
   budget allows, the others streamed whole with the next layer prefetched), + prediction (only predicted-
   active neurons read, unbundled: two reads per neuron chunk), + windowing (neurons active in the last 5
   tokens kept (4, as the paper; beyond the cache's room the least recently used go); only the difference read), + bundling (up column and down row of a neuron in one read): the paper's
   scheme; then hetflow's: caches kept full (a neuron past the window stays until its room is needed, least
   recently used out first: the room is preallocated and counted in the budget anyway) and sharing their
   room (every 8 tokens each layer gets room for the neurons its last tokens used: ``rebalance_caches``).
   ``--rungs ...,speculate``: hetflow's plus speculative reads (each layer starts reading the neurons the
   next layer's predictor picks from its input), not in the default ladder: it measured slower (141.9
   against 129.9 ms/token in one run with native AIO): the next layer's predictor on this layer's input
   picks poorly, one speculative chunk in five was used, and the wasted reads cost more than the overlap saved.

Everything printed is measured on this machine. The last line reads ``full scheme vs naive: N.Nx per token``.
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

HIDDEN, FFN, LAYERS, HEADS, VOCAB, POSITIONS = 1024, 4096, 24, 16, 8192, 512
CALIBRATION_SEQUENCES, CALIBRATION_LENGTH = 16, 32
PROMPT = 16
WINDOW = 4
SPARSITY_QUANTILE = 0.995
SPECTRUM_ALPHA = 1.0          # fc1's singular values fall as k^-alpha (see the module doc)
RANKS = (128, 64, 32)
THREADS = 32
RUNGS = ["naive", "resident", "predict", "window", "bundle", "hetflow"]
EXACT_RTOL = 1e-4
MiB = 1 << 20


def opt_config():
    from transformers import OPTConfig
    return OPTConfig(hidden_size=HIDDEN, ffn_dim=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     vocab_size=VOCAB, max_position_embeddings=POSITIONS, word_embed_proj_dim=HIDDEN,
                     do_layer_norm_before=True, activation_function="relu")


def _ffn_inputs(model, ids) -> dict[int, np.ndarray]:
    """Each layer's FFN input (after its LayerNorm) for ``ids`` [sequences, length]: {layer: [s, l, hidden]}."""
    import torch
    seen: dict[int, np.ndarray] = {}
    hooks = [layer.fc1.register_forward_pre_hook(
        lambda mod, args, i=i: seen.__setitem__(i, args[0].detach().numpy().reshape(ids.shape[0], ids.shape[1], -1)))
        for i, layer in enumerate(model.model.decoder.layers)]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return seen


def build_model(seed: int = 0):
    """The random OPT-style model with OPT-like FFN sparsity (see the module doc)."""
    import torch
    from transformers import OPTForCausalLM
    torch.manual_seed(seed)
    model = OPTForCausalLM(opt_config()).eval()
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            w = layer.fc1.weight                                   # [neurons, hidden]
            u, _ = torch.linalg.qr(torch.randn(w.shape[0], w.shape[1], generator=g))
            v, _ = torch.linalg.qr(torch.randn(w.shape[1], w.shape[1], generator=g))
            sv = torch.arange(1, w.shape[1] + 1, dtype=torch.float32) ** -SPECTRUM_ALPHA
            w.copy_(u @ torch.diag(sv * (w.norm() / sv.norm())) @ v.T)
    ids = torch.randint(0, VOCAB, (CALIBRATION_SEQUENCES, CALIBRATION_LENGTH), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for i, layer in enumerate(model.model.decoder.layers):   # in order: a layer's bias changes the next's inputs
            x = _ffn_inputs(model, ids)[i].reshape(-1, HIDDEN)
            z = x @ layer.fc1.weight.detach().numpy().T
            layer.fc1.bias.copy_(torch.from_numpy(-np.quantile(z, SPARSITY_QUANTILE, axis=0).astype(np.float32)))
    return model


def greedy(model, prompt, tokens: int, step_hook=None, forced=None) -> tuple[list[int], np.ndarray, list[float]]:
    """Decoding with the KV cache: (each step's argmax token, each step's logits, each decode step's seconds).
    Each step is fed its own argmax (greedy), or ``forced[step]`` when given."""
    import torch
    out, logits, seconds = [], [], []
    with torch.no_grad():
        result = model(prompt, use_cache=True)
        past = result.past_key_values
        for step in range(tokens):
            token = int(result.logits[0, -1].argmax())
            out.append(token)
            logits.append(result.logits[0, -1].numpy().copy())
            if step == tokens - 1:
                break
            if step_hook:
                step_hook()   # before each decode step (the prompt's step is not counted)
            began = time.perf_counter()
            feed = token if forced is None else int(forced[step])
            result = model(torch.tensor([[feed]]), past_key_values=past, use_cache=True)
            seconds.append(time.perf_counter() - began)
            past = result.past_key_values
        if step_hook and tokens > 1:
            step_hook()
    return out, np.stack(logits), seconds


# --- 2. prepare -------------------------------------------------------------------------------------------------

def prepare(directory: Path, budget: int, curve: list) -> dict:
    import torch
    from safetensors.torch import save_file

    from hetflow.passes.flash_plan import FfnLayer, FlashPlanError, plan_flash
    from hetflow.runtime.flash_stream import build_predictor, layout, write_image
    began = time.perf_counter()
    model = build_model()
    layers = model.model.decoder.layers
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ffn_weight_names = {f"model.decoder.layers.{i}.{fc}.weight" for i in range(LAYERS) for fc in ("fc1", "fc2")}
    state = model.state_dict()
    resident = {k: v.contiguous() for k, v in state.items() if k not in ffn_weight_names and k != "lm_head.weight"}
    resident_bytes = sum(v.numel() * v.element_size() for v in resident.values())
    # what the FFNs see on fresh sequences: the fractions the plan needs, the predictors' samples
    ids = torch.randint(0, VOCAB, (CALIBRATION_SEQUENCES, CALIBRATION_LENGTH), generator=torch.Generator().manual_seed(2))
    inputs = _ffn_inputs(model, ids)
    active, union, new = [], [], []
    for i, layer in enumerate(layers):
        z = inputs[i] @ layer.fc1.weight.detach().numpy().T + layer.fc1.bias.detach().numpy()
        fire = z > 0                                       # [sequences, length, neurons]
        active.append(fire.mean())
        for t in range(WINDOW - 1, CALIBRATION_LENGTH):
            union.append(fire[:, t - WINDOW + 1:t + 1].any(axis=1).mean())
            new.append((fire[:, t] & ~fire[:, t - WINDOW + 1:t].any(axis=1)).mean())
    held = _ffn_inputs(model, torch.randint(0, VOCAB, (4, CALIBRATION_LENGTH), generator=torch.Generator().manual_seed(3)))
    ffn = [FfnLayer(f"layers.{i}", HIDDEN, FFN, 4) for i in range(LAYERS)]
    dense = plan_flash(ffn, resident_bytes, budget, curve, predict=False)
    # the largest predictor rank whose predicted neurons (per token, over a window, new per token: measured on
    # the calibration inputs with the predictors themselves) let every layer stream within the budget
    for rank in RANKS:
        built = [build_predictor(layer.fc1.weight.detach().numpy().T, layer.fc1.bias.detach().numpy(), rank,
                                 inputs[i].reshape(-1, HIDDEN), data_aware=False) for i, layer in enumerate(layers)]
        predicted_now, predicted_window, predicted_new = [], [], []   # per layer, on held-out sequences
        for i, (p, _) in enumerate(built):
            fire = (held[i] @ p.left) @ p.right + p.bias > -p.margin
            predicted_now.append(float(fire.mean()))
            union = [fire[:, t - WINDOW + 1:t + 1].any(axis=1).mean() for t in range(WINDOW - 1, CALIBRATION_LENGTH)]
            new = [(fire[:, t] & ~fire[:, t - WINDOW + 1:t].any(axis=1)).mean() for t in range(WINDOW - 1, CALIBRATION_LENGTH)]
            predicted_window.append(float(np.quantile(union, 0.9)))
            predicted_new.append(float(np.mean(new)))
        fractions = {"active": float(np.mean(active)), "predicted": float(np.mean(predicted_now)),
                     "window": float(np.mean(predicted_window)), "new": float(np.mean(predicted_new)),
                     "window_by_layer": predicted_window, "new_by_layer": predicted_new,
                     "predicted_by_layer": predicted_now}
        try:
            sparse = plan_flash(ffn, resident_bytes, budget, curve, predicted_now, WINDOW, rank=rank,
                                window_fraction=predicted_window, new_fraction=predicted_new)
            break
        except FlashPlanError:
            if rank == RANKS[-1]:
                raise
    predictors, recall = {}, []
    for i, (layer, (p, _)) in enumerate(zip(layers, built)):
        predictors[f"{i}.left"], predictors[f"{i}.right"], predictors[f"{i}.bias"] = p.left, p.right, p.bias
        predictors[f"{i}.margin"] = np.array(p.margin, np.float32)
        x = held[i].reshape(-1, HIDDEN)
        up, bias = layer.fc1.weight.detach().numpy().T, layer.fc1.bias.detach().numpy()
        true = x @ up + bias > 0
        predicted = (x @ p.left) @ p.right + bias > -p.margin
        recall.append(float((true & predicted).sum() / max(true.sum(), 1)))
    np.savez(directory / "predictors.npz", **predictors)
    # the flash images
    chunk = sparse.streamed[0].chunk_neurons if sparse.streamed else 1
    images = {}
    for name, bundled in (("bundled", True), ("unbundled", False)):
        per = HIDDEN * 4 * (2 if bundled else 1)
        entries = [(layout(f"layers.{i}", HIDDEN, FFN, np.float32, False, bundled, chunk * per),
                    {"up": layer.fc1.weight.detach().numpy().T, "down": layer.fc2.weight.detach().numpy().T})
                   for i, layer in enumerate(layers)]
        image = write_image(directory / f"{name}.bin", entries)
        (directory / f"{name}.json").write_text(image.to_json())
        images[name] = image.size
    save_file(resident, str(directory / "resident.safetensors"))
    save_file({k: state[k].contiguous() for k in ffn_weight_names}, str(directory / "ffn.safetensors"))
    prompt = torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(4))
    torch.save(prompt, directory / "prompt.pt")
    torch.save(torch.randint(0, VOCAB, (POSITIONS - PROMPT,), generator=torch.Generator().manual_seed(5)),
               directory / "continuation.pt")
    info = {"weights_bytes": weights_bytes, "resident_bytes": resident_bytes, "budget": budget,
            "fractions": fractions, "rank": rank, "recall": float(np.mean(recall)), "recall_min": float(np.min(recall)),
            "dense_resident": [i for i, l in enumerate(dense.layers) if not l.streamed],
            "sparse_resident": [i for i, l in enumerate(sparse.layers) if not l.streamed],
            "dense_plan": dense.describe(), "sparse_plan": sparse.describe(),
            "capacity": {i: l.capacity for i, l in enumerate(sparse.layers) if l.streamed}, "chunk_neurons": chunk, "images": images,
            "prepare_seconds": time.perf_counter() - began}
    (directory / "prep.json").write_text(json.dumps(info, indent=1))
    return info


def reference(directory: Path, tokens: int) -> None:
    """The fully resident model's greedy generation (the exactness reference), in its own process."""
    import torch
    model = build_model()
    prompt = torch.load(directory / "prompt.pt")
    out, logits, seconds = greedy(model, prompt, tokens, forced=torch.load(directory / "continuation.pt"))
    np.savez(directory / "reference.npz", tokens=np.array(out), logits=logits, seconds=np.array(seconds))


# --- 3. one rung ------------------------------------------------------------------------------------------------

def _flash_mlp(ffn):
    """A module standing in for an OPT layer's fc1 (fc2 and the activation become identities): the whole FFN,
    streamed."""
    import torch

    class FlashMlp(torch.nn.Module):
        def forward(self, x):
            return torch.from_numpy(ffn(x.detach().numpy()))
    return FlashMlp()


def run_rung(directory: Path, rung: str, tokens: int) -> dict:
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import OPTForCausalLM

    from hetflow.runtime.flash_io import ReaderPool, current_rss_bytes, peak_rss_bytes
    from hetflow.runtime.flash_stream import FlashImage, Predictor, ReadBuffers, StreamedFfn
    torch.set_num_threads(2)
    info = json.loads((directory / "prep.json").read_text())
    with torch.device("meta"):
        model = OPTForCausalLM(opt_config()).eval()
    baseline = current_rss_bytes()
    state = load_file(str(directory / "resident.safetensors"))
    resident = [] if rung == "naive" else info["dense_resident"] if rung == "resident" else info["sparse_resident"]
    with safe_open(str(directory / "ffn.safetensors"), "pt") as f:
        for i in resident:
            for fc in ("fc1", "fc2"):
                key = f"model.decoder.layers.{i}.{fc}.weight"
                state[key] = f.get_tensor(key)
    image_name = "bundled" if rung in ("bundle", "hetflow", "speculate") else "unbundled"
    image = FlashImage.from_json((directory / f"{image_name}.json").read_text())
    image.check(directory / f"{image_name}.bin")
    pool = ReaderPool(directory / f"{image_name}.bin", threads=THREADS)
    predictors = np.load(directory / "predictors.npz") if rung in ("predict", "window", "bundle", "hetflow", "speculate") else None
    mode = {"naive": "dense", "resident": "dense", "predict": "predict", "window": "window", "bundle": "window",
            "hetflow": "window", "speculate": "window"}[rung]
    streamed = []
    for i, layer in enumerate(model.model.decoder.layers):
        if i in resident:
            continue
        b_up = state.pop(f"model.decoder.layers.{i}.fc1.bias").numpy()
        b_down = state.pop(f"model.decoder.layers.{i}.fc2.bias").numpy()
        predictor = None
        if predictors is not None:
            predictor = Predictor(predictors[f"{i}.left"], predictors[f"{i}.right"], predictors[f"{i}.bias"],
                                  float(predictors[f"{i}.margin"]))
        ffn = StreamedFfn(image.layer(f"layers.{i}"), pool, b_up, b_down, mode, predictor, WINDOW,
                          info["capacity"].get(str(i)) or None, retain=rung in ("hetflow", "speculate"))
        layer.fc1, layer.fc2, layer.activation_fn = _flash_mlp(ffn), torch.nn.Identity(), torch.nn.Identity()
        streamed.append(ffn)
    buffers = ReadBuffers(2)     # dense layers: the one computing and the next being read (what the plan counts)
    for layer in streamed:
        layer.peers = streamed if rung in ("hetflow", "speculate") else None   # hetflow's caches share their room
        layer.buffers = buffers
    for a, b in zip(streamed, streamed[1:]):
        a.next = b
        a.speculate_ahead = rung == "speculate"   # read b's likely neurons (predicted from a's input) ahead
    state["lm_head.weight"] = state["model.decoder.embed_tokens.weight"]   # tied
    missing = model.load_state_dict(state, strict=False, assign=True)
    left = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise RuntimeError(f"parameters left unloaded: {left[:4]} ({missing})")
    del state
    prompt = torch.load(directory / "prompt.pt")
    marks = []

    def mark():
        marks.append((pool.bytes_read, pool.read_seconds, sum(f.io_seconds for f in streamed),
                      sum(f.compute_seconds for f in streamed), pool.requests,
                      sum(f.neurons_predicted for f in streamed), sum(f.neurons_loaded for f in streamed)))
    began = time.perf_counter()
    out, logits, seconds = greedy(model, prompt, tokens, step_hook=mark,
                                  forced=torch.load(directory / "continuation.pt"))
    wall = time.perf_counter() - began
    deltas = [tuple(b - a for a, b in zip(marks[i], marks[i + 1])) for i in range(len(marks) - 1)]
    pool.close()
    reference_run = np.load(directory / "reference.npz")
    ref_logits = reference_run["logits"][:len(logits)]
    error = float(np.abs(logits - ref_logits).max() / np.abs(ref_logits).max())
    return {"rung": rung, "mode": pool.mode, "tokens": out, "same_tokens": int(sum(a == b for a, b in
                                                                                  zip(out, reference_run["tokens"]))),
            "logits_error": error, "step_seconds": seconds, "bytes": [d[0] for d in deltas],
            "disk_seconds": [d[1] for d in deltas], "io_wait_seconds": [d[2] for d in deltas],
            "ffn_compute_seconds": [d[3] for d in deltas], "requests": [d[4] for d in deltas],
            "predicted": [d[5] for d in deltas], "loaded": [d[6] for d in deltas],
            "peak_rss": peak_rss_bytes(), "baseline_rss": baseline, "streamed_layers": len(streamed),
            "resident_layers": len(resident), "wall": wall,
            "speculated_chunks": sum(f.speculated_chunks for f in streamed),
            "speculated_used": sum(f.speculated_used for f in streamed)}


# --- the driver -------------------------------------------------------------------------------------------------

def _replan(directory: Path, info: dict, curve: list) -> dict:
    """A kept run's plan made again with this hetflow's ``plan_flash`` from the fractions prepare measured (the
    images and predictors stay: the window caches' sizes and the layers kept resident may change)."""
    from hetflow.passes.flash_plan import FfnLayer, plan_flash
    f = info["fractions"]
    ffn = [FfnLayer(f"layers.{i}", HIDDEN, FFN, 4) for i in range(LAYERS)]
    dense = plan_flash(ffn, info["resident_bytes"], info["budget"], curve, predict=False)
    sparse = plan_flash(ffn, info["resident_bytes"], info["budget"], curve, f["predicted_by_layer"], WINDOW,
                        rank=info["rank"], window_fraction=f["window_by_layer"], new_fraction=f["new_by_layer"])
    info.update(dense_resident=[i for i, l in enumerate(dense.layers) if not l.streamed],
                sparse_resident=[i for i, l in enumerate(sparse.layers) if not l.streamed],
                dense_plan=dense.describe(), sparse_plan=sparse.describe(),
                capacity={i: l.capacity for i, l in enumerate(sparse.layers) if l.streamed})
    (directory / "prep.json").write_text(json.dumps(info, indent=1))
    return info


def _child(args: list[str]) -> dict | None:
    # NumPy's BLAS on one thread: the FFN's GEMVs are memory-bound, and two BLAS thread pools (NumPy's and
    # torch's) spinning on two cores cost a decode step three times over
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="2")
    result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{result.stderr[-3000:]}")
    lines = [l for l in result.stdout.splitlines() if l.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", help="where the flash images go (default: a temporary directory on this disk)")
    parser.add_argument("--budget-mib", type=int, default=580, help="the DRAM budget for weights, caches and buffers")
    parser.add_argument("--tokens", type=int, default=16, help="tokens generated per rung (after the prompt); the "
                        f"per-token figures are medians over the decode steps after the first {WINDOW} (warm-up)")
    parser.add_argument("--rungs", default=",".join(RUNGS))
    parser.add_argument("--keep", action="store_true", help="keep the images afterwards")
    parser.add_argument("--reuse", action="store_true", help="reuse the images and plan a --keep run left in --dir")
    parser.add_argument("--worker", choices=["prepare", "reference", "rung"], help=argparse.SUPPRESS)
    parser.add_argument("--rung", help=argparse.SUPPRESS)
    parser.add_argument("--curve", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    directory = Path(args.dir) if args.dir else None
    if args.worker == "prepare":
        print(json.dumps(prepare(directory, args.budget_mib * MiB, json.loads(args.curve))))
        return 0
    if args.worker == "reference":
        reference(directory, args.tokens)
        return 0
    if args.worker == "rung":
        print(json.dumps(run_rung(directory, args.rung, args.tokens)))
        return 0

    from hetflow.calibrate import calibrate_disk, read_curve
    from hetflow.passes.flash_plan import throughput_at
    if directory is None:
        directory = Path(tempfile.mkdtemp(prefix="hetflow-flash-", dir="/var/tmp"))
    directory.mkdir(parents=True, exist_ok=True)
    print(f"flash images in {directory}; budget {args.budget_mib} MiB; {args.tokens} tokens per rung (measured)")
    disk = calibrate_disk(directory, sizes=(4096, 8192, 16384, 32768, 65536, 262144, 1 << 20), threads=(THREADS,),
                          file_bytes=256 * MiB, seconds_per_point=0.4)
    curve = sorted((int(size), float(rate)) for size, rate in disk["best"].items())
    print("disk (" + disk["mode"] + f", {'native AIO' if disk['engine'] == 'aio' else 'reader threads'}, "
          f"{THREADS} reads in flight, random reads): " +
          ", ".join(f"{s // 1024} KiB {r / 1e9:.2f} GB/s" for s, r in curve))
    if args.reuse and (directory / "prep.json").exists() and (directory / "bundled.bin").exists():
        info = _replan(directory, json.loads((directory / "prep.json").read_text()), curve)
    else:
        info = _child(["--worker", "prepare", "--dir", str(directory), "--budget-mib", str(args.budget_mib),
                       "--curve", json.dumps(curve)])
    print(f"model: {LAYERS} layers x {HIDDEN} wide, FFN {FFN}, f32: weights {info['weights_bytes'] / MiB:.0f} MiB "
          f"({info['weights_bytes'] / (args.budget_mib * MiB):.2f}x the budget); resident minimum "
          f"{info['resident_bytes'] / MiB:.0f} MiB")
    f = info["fractions"]
    print(f"FFN neurons active per token {f['active']:.1%}; predicted (rank {info['rank']}) {f['predicted']:.1%}, over "
          f"{WINDOW} tokens {f['window']:.1%} (90th percentile, mean over layers), new per token {f['new']:.2%}; the predictors' recall on "
          f"held-out sequences {info['recall']:.3f} (lowest layer {info['recall_min']:.3f})")
    print(info["dense_plan"])
    print(info["sparse_plan"])
    if not (args.reuse and (directory / "reference.npz").exists()
            and len(np.load(directory / "reference.npz")["tokens"]) >= args.tokens):
        _child(["--worker", "reference", "--dir", str(directory), "--tokens", str(args.tokens)])
    rows = {}
    sizes = (4096, 8192, 16384, 32768, 65536, 262144, 1 << 20)

    def disk_now() -> list:    # the disk's rate beside a rung, read from the image itself (it drifts 2x in minutes)
        return sorted(read_curve(directory / "bundled.bin", sizes, THREADS, 0.25).items())
    for rung in args.rungs.split(","):
        subprocess.run(["sync"], check=False)
        before = disk_now()
        rows[rung] = r = _child(["--worker", "rung", "--rung", rung, "--dir", str(directory), "--tokens",
                                 str(args.tokens)])
        after = disk_now()
        warm = slice(min(WINDOW, max(len(r["step_seconds"]) - 1, 0)), None)   # steady state: after the warm-up
        steps = r["step_seconds"][warm]
        per_token = float(np.median(steps))
        disk = float(np.sum(r["disk_seconds"][warm]))
        waited = float(np.median(r["io_wait_seconds"][warm]))
        read = float(np.median(r["bytes"][warm]))
        r["per_token"] = per_token
        achieved = float(np.sum(r["bytes"][warm])) / disk if disk > 0 else 0.0
        requests = float(np.sum(r["requests"][warm]))
        chunk = int(np.sum(r["bytes"][warm]) / requests) if requests else 1 << 20   # the mean read, as issued
        beside = [throughput_at(c, min(chunk, 1 << 20)) for c in (before, after)]
        calibrated = float(np.mean(beside))
        used = r["peak_rss"] - r["baseline_rss"]
        print(f"  {rung:9s} {per_token * 1e3:8.1f} ms/token  read {read / MiB:7.1f} MiB/token, waited {waited * 1e3:7.1f} ms "
              f"(disk {achieved / 1e9:5.2f} GB/s = {achieved / calibrated:4.0%} of the calibrated {calibrated / 1e9:.2f} for "
              f"its {chunk // 1024} KiB mean read: {beside[0] / 1e9:.2f} just before the rung, {beside[1] / 1e9:.2f} "
              f"just after)  FFN compute {np.median(r['ffn_compute_seconds']) * 1e3:6.1f} ms  "
              f"{r['resident_layers']:2d} FFN layers resident  peak RSS {r['peak_rss'] / MiB:.0f} MiB "
              f"(+{used / MiB:.0f} over the {r['baseline_rss'] / MiB:.0f} MiB before loading: "
              f"{'within' if used <= args.budget_mib * MiB else 'OVER'} the budget)  argmax equal to the "
              f"resident run's {r['same_tokens']}/{len(r['tokens'])}, logits error {r['logits_error']:.1e}"
              + (f"  speculative chunks read {r['speculated_chunks']}, used {r['speculated_used']}"
                 if r.get("speculated_chunks") else ""))
    if not args.keep:
        for name in ("bundled.bin", "unbundled.bin", "ffn.safetensors", "resident.safetensors"):
            (directory / name).unlink(missing_ok=True)
    if "naive" in rows and "bundle" in rows and "hetflow" in rows:
        print(f"the paper's scheme (bundle) vs naive: {rows['naive']['per_token'] / rows['bundle']['per_token']:.1f}x "
              "per token; hetflow's (bundled, its caches kept full and sharing their room):")
    full = "hetflow" if "hetflow" in rows else "bundle"
    if "naive" in rows and full in rows:
        print(f"full scheme vs naive: {rows['naive']['per_token'] / rows[full]['per_token']:.1f}x per token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
