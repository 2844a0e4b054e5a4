"""flash-edge: modelled decode tokens/s of OPT-6.7B, Llama2-7B and Llama2-70B beside Cambricon-LLM's published
36.34, 34.0 and 3.44 tok/s (issue 16).

    python benchmarks/flash_edge.py

Every time here is MODELLED by ``hetflow.runtime.runners.nand.decode_token_seconds`` from the flash-edge
preset's figures (REFERENCE.md: 16 KiB pages, tR 30 us, 1 GB/s per channel, 2 TOPS int8 NPU, 40 GB/s DRAM),
never measured. The small configuration (8 channels) is the preset; medium (16) and large (32) change only
the channel count. REFERENCE.md does not say which configuration the published numbers used, so all three
are printed. Weights int8 (Cambricon-LLM runs int8), KV cache int8 (unconfirmed), context 512 (unconfirmed:
the paper's decode context is not in REFERENCE.md).
"""
from __future__ import annotations

from hetflow.platform import load_platform
from hetflow.runtime.runners.nand import DecoderConfig, decode_token_seconds, with_channels

CONTEXT = 512  # unconfirmed: the paper's context length is not in REFERENCE.md
MODELS = [  # standard configurations (the models' published configs); published tok/s from REFERENCE.md
    (DecoderConfig("OPT-6.7B", layers=32, hidden=4096, ffn=16384, heads=32, kv_heads=32, vocab=50272,
                   context=CONTEXT, gated_ffn=False), 36.34),
    (DecoderConfig("Llama2-7B", layers=32, hidden=4096, ffn=11008, heads=32, kv_heads=32, vocab=32000,
                   context=CONTEXT), 34.0),
    (DecoderConfig("Llama2-70B", layers=80, hidden=8192, ffn=28672, heads=64, kv_heads=8, vocab=32000,
                   context=CONTEXT), 3.44),
]
CONFIGURATIONS = [("small", 8), ("medium", 16), ("large", 32)]  # channels (REFERENCE.md)


def main() -> None:
    platform = load_platform("flash-edge")
    flash = platform.flash
    print("flash-edge (Cambricon-LLM): decode tok/s, every number of ours MODELLED, beside the paper's published")
    print(f"{'model':<11} {'config':<7} {'ch':>3} {'tile':>10} {'modelled tok/s':>15} {'published':>10} "
          f"{'modelled/pub':>13} {'alpha(up)':>10} {'gemv ms':>8} {'attn ms':>8} {'launch ms':>9}")
    small = []
    for config, published in MODELS:
        for label, channels in CONFIGURATIONS:
            seconds, parts = decode_token_seconds(config, platform, with_channels(flash, channels))
            tok_s = 1 / seconds
            if label == "small":
                small.append((config, published, tok_s, parts))
            tile = "x".join(map(str, parts["tile"]))
            print(f"{config.name:<11} {label:<7} {channels:>3} {tile:>10} {tok_s:>15.2f} {published:>10.2f} "
                  f"{tok_s / published:>13.3f} {parts['alpha']['up']:>10.2f} {parts['gemv'] * 1e3:>8.1f} "
                  f"{parts['attention'] * 1e3:>8.2f} {parts['launch'] * 1e3:>9.2f}")
    print("\nWhat the published numbers imply (derived: published tok/s x weight bytes per token):")
    page_per_tr = flash.page_size / flash.read_latency
    for config, published, _, parts in small:
        need = published * parts["weight_bytes"]
        for label, channels in CONFIGURATIONS:
            pages = need / channels / page_per_tr
            print(f"  {config.name:<11} {need / 1e9:6.1f} GB/s of weights; {label:<6} ({channels:>2} ch): "
                  f"{pages:5.1f} pages sensed per tR per channel (this model: {flash.cores_per_channel})")
    ratios = ", ".join(f"{c.name} {t:.2f} vs {p} ({t / p:.2f}x)" for c, p, t, _ in small)
    print(f"\nSummary: modelled tok/s on flash-edge small (8 ch) vs Cambricon-LLM published: {ratios}; "
          f"the gap is the dies' parallelism (cores_per_channel = {flash.cores_per_channel}, unconfirmed).")


if __name__ == "__main__":
    main()
