"""A zoo of tiny models for differential testing (``benchmarks/differential.py``).

Every model is built from a transformers (or diffusers) config with random weights
after ``torch.manual_seed``, at toy sizes (hidden 32-128, 1-2 layers, sequences of
8-16 tokens, 32x32 images); nothing is downloaded. Hugging Face models are wrapped
so ``forward`` returns one plain tensor (logits or the last hidden state).

``ZOO`` maps a name to a ``ZooModel``: ``build()`` returns ``(torch_module,
example_inputs)`` for torch models, or ``(Graph, feeds)`` for the decode-step graphs
built directly in the IR (``kind == "ir"``), whose weights are re-drawn at random
here (``decode_graphs`` builds them as zeros).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

SEQ = 12
VOCAB = 128
IMAGE = 32


@dataclass(frozen=True)
class ZooModel:
    name: str
    build: Callable[[], tuple]
    family: str = ""                 # encoder, decoder, moe, encdec, audio, unet, cnn, vit, example, ir
    kind: str = "torch"              # "torch": (module, inputs); "ir": (Graph, {input name: array})
    rtol: float = 1e-4               # tolerance relative to the output's largest magnitude
    tags: tuple = field(default=())  # "small": cheap enough for the fast test subset


def _torch():
    import torch
    return torch


def _wrap(model, call=None, output: str = "auto"):
    """A module returning one tensor: ``call(model, *inputs)`` (default ``model(*inputs)``), then the
    named output field (``auto``: logits if present, else last_hidden_state, else sample)."""
    torch = _torch()

    class HFWrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *inputs):
            out = call(self.model, *inputs) if call is not None else self.model(*inputs)
            if isinstance(out, torch.Tensor):
                return out
            if output != "auto":
                return getattr(out, output)
            for name in ("logits", "last_hidden_state", "sample"):
                value = getattr(out, name, None)
                if value is not None:
                    return value
            raise TypeError(f"no tensor output in {type(out).__name__}")

    HFWrapper.__name__ = type(model).__name__
    return HFWrapper().eval()


def _ids(batch: int = 1, seq: int = SEQ, vocab: int = VOCAB):
    torch = _torch()
    return torch.randint(0, vocab, (batch, seq))


def _image(channels: int = 3, size: int = IMAGE, batch: int = 1):
    return _torch().randn(batch, channels, size, size)


def _seeded(fn):
    def build():
        _torch().manual_seed(0)
        np.random.seed(0)
        return fn()
    build.__name__ = fn.__name__
    build.__doc__ = fn.__doc__
    return build


def _hf(model_cls, config, attn: str | None = None):
    """The model with random weights; ``attn`` picks the attention implementation (eager, sdpa)."""
    if attn is not None:
        config._attn_implementation = attn
    return model_cls(config).eval()


# --- encoders ------------------------------------------------------------------------------------

ENC = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
           vocab_size=VOCAB, max_position_embeddings=64)


@_seeded
def bert():
    from transformers import BertConfig, BertModel
    return _wrap(_hf(BertModel, BertConfig(**ENC))), (_ids(),)


@_seeded
def roberta():
    from transformers import RobertaConfig, RobertaModel
    return _wrap(_hf(RobertaModel, RobertaConfig(**ENC, pad_token_id=1))), (_ids(),)


@_seeded
def distilbert():
    from transformers import DistilBertConfig, DistilBertModel
    config = DistilBertConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                              max_position_embeddings=64)
    return _wrap(_hf(DistilBertModel, config)), (_ids(),)


@_seeded
def albert():
    from transformers import AlbertConfig, AlbertModel
    config = AlbertConfig(**ENC, embedding_size=32)
    return _wrap(_hf(AlbertModel, config)), (_ids(),)


@_seeded
def electra():
    from transformers import ElectraConfig, ElectraModel
    config = ElectraConfig(**ENC, embedding_size=32)
    return _wrap(_hf(ElectraModel, config)), (_ids(),)


@_seeded
def deberta_v2():
    from transformers import DebertaV2Config, DebertaV2Model
    config = DebertaV2Config(**ENC, relative_attention=True, position_buckets=16, max_relative_positions=32,
                             pos_att_type=["p2c", "c2p"])
    return _wrap(_hf(DebertaV2Model, config, attn="eager")), (_ids(),)


# --- decoders (logits) ---------------------------------------------------------------------------

DEC = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)


def _causal(model):
    return _wrap(model, call=lambda m, ids: m(input_ids=ids, use_cache=False))


@_seeded
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    return _causal(_hf(LlamaForCausalLM, LlamaConfig(**DEC))), (_ids(),)


@_seeded
def mistral():
    from transformers import MistralConfig, MistralForCausalLM
    return _causal(_hf(MistralForCausalLM, MistralConfig(**DEC, sliding_window=8))), (_ids(),)


@_seeded
def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    return _causal(_hf(Qwen2ForCausalLM, Qwen2Config(**DEC))), (_ids(),)


@_seeded
def phi():
    from transformers import PhiConfig, PhiForCausalLM
    return _causal(_hf(PhiForCausalLM, PhiConfig(**DEC, partial_rotary_factor=0.5))), (_ids(),)


@_seeded
def gemma():
    from transformers import GemmaConfig, GemmaForCausalLM
    return _causal(_hf(GemmaForCausalLM, GemmaConfig(**DEC, head_dim=16))), (_ids(),)


@_seeded
def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=VOCAB, n_positions=64)
    return _causal(_hf(GPT2LMHeadModel, config)), (_ids(),)


@_seeded
def gpt_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    config = GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           vocab_size=VOCAB, max_position_embeddings=64, rotary_pct=0.5)
    return _causal(_hf(GPTNeoXForCausalLM, config)), (_ids(),)


@_seeded
def opt():
    from transformers import OPTConfig, OPTForCausalLM
    config = OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                       vocab_size=VOCAB, max_position_embeddings=64, word_embed_proj_dim=64)
    return _causal(_hf(OPTForCausalLM, config)), (_ids(),)


@_seeded
def bloom():
    from transformers import BloomConfig, BloomForCausalLM
    config = BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=VOCAB)
    return _causal(_hf(BloomForCausalLM, config, attn="eager")), (_ids(),)


@_seeded
def falcon():
    from transformers import FalconConfig, FalconForCausalLM
    config = FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
                          new_decoder_architecture=True, vocab_size=VOCAB, max_position_embeddings=64)
    return _causal(_hf(FalconForCausalLM, config)), (_ids(),)


# --- mixture of experts --------------------------------------------------------------------------

@_seeded
def mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM
    config = MixtralConfig(**DEC, num_local_experts=4, num_experts_per_tok=2)
    config._experts_implementation = "batched_mm"  # static shapes (the eager loop is data-dependent)
    return _causal(_hf(MixtralForCausalLM, config)), (_ids(),)


@_seeded
def qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
    config = Qwen2MoeConfig(**DEC, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                            shared_expert_intermediate_size=64)
    config._experts_implementation = "batched_mm"
    return _causal(_hf(Qwen2MoeForCausalLM, config)), (_ids(),)


# --- encoder-decoder -----------------------------------------------------------------------------

def _seq2seq(model):
    return _wrap(model, call=lambda m, ids, dec: m(input_ids=ids, decoder_input_ids=dec, use_cache=False))


@_seeded
def t5():
    from transformers import T5Config, T5Model
    config = T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                      num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0)
    return _seq2seq(_hf(T5Model, config)), (_ids(), _ids(seq=8))


@_seeded
def bart():
    from transformers import BartConfig, BartModel
    config = BartConfig(vocab_size=VOCAB, d_model=64, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                        decoder_ffn_dim=128, max_position_embeddings=64)
    return _seq2seq(_hf(BartModel, config)), (_ids(), _ids(seq=8))


# --- audio ---------------------------------------------------------------------------------------

@_seeded
def wav2vec2():
    from transformers import Wav2Vec2Config, Wav2Vec2Model
    config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=8,
                            num_conv_pos_embedding_groups=2, vocab_size=VOCAB, apply_spec_augment=False,
                            mask_time_prob=0.0)
    return _wrap(_hf(Wav2Vec2Model, config)), (_torch().randn(1, 400),)


@_seeded
def whisper_encoder():
    from transformers import WhisperConfig, WhisperModel
    config = WhisperConfig(vocab_size=VOCAB, num_mel_bins=16, d_model=32, encoder_layers=2, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                           decoder_ffn_dim=64, max_source_positions=8, max_target_positions=16, pad_token_id=0,
                           bos_token_id=0, eos_token_id=0, decoder_start_token_id=0)
    model = _hf(WhisperModel, config)
    return _wrap(model.get_encoder()), (_torch().randn(1, 16, 16),)


# --- UNet (diffusers) ----------------------------------------------------------------------------

@_seeded
def unet2d():
    from diffusers import UNet2DModel
    model = UNet2DModel(sample_size=IMAGE, in_channels=3, out_channels=3, layers_per_block=1,
                        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                        attention_head_dim=8).eval()
    return _wrap(model), (_image(), _torch().tensor([10.0]))


# --- CNNs ----------------------------------------------------------------------------------------

def _lively(model):
    """Re-draw a CNN's weights so activations keep their scale through the depth (He-normal convolutions and
    linears, batch-norm statistics and affine terms away from identity, so folding them is exercised):
    transformers' small-std init makes a tiny MobileNet's logits 1e-30 or exactly zero."""
    torch = _torch()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.normal_(0.0, 0.1)
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
    return model

@_seeded
def resnet():
    from transformers import ResNetConfig, ResNetForImageClassification
    config = ResNetConfig(layer_type="bottleneck", depths=[1, 1], hidden_sizes=[32, 64], embedding_size=16,
                          num_labels=10)
    return _wrap(_lively(_hf(ResNetForImageClassification, config))), (_image(),)


@_seeded
def convnext():
    from transformers import ConvNextConfig, ConvNextForImageClassification
    config = ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10, image_size=IMAGE)
    return _wrap(_lively(_hf(ConvNextForImageClassification, config))), (_image(),)


@_seeded
def mobilenet_v2():
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification
    config = MobileNetV2Config(depth_multiplier=0.25, image_size=IMAGE, num_labels=10)
    return _wrap(_lively(_hf(MobileNetV2ForImageClassification, config))), (_image(),)


@_seeded
def mobilenet_v1():
    from transformers import MobileNetV1Config, MobileNetV1ForImageClassification
    config = MobileNetV1Config(depth_multiplier=0.25, image_size=IMAGE, num_labels=10)
    return _wrap(_lively(_hf(MobileNetV1ForImageClassification, config))), (_image(),)


@_seeded
def regnet():
    from transformers import RegNetConfig, RegNetForImageClassification
    config = RegNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8, num_labels=10)
    return _wrap(_lively(_hf(RegNetForImageClassification, config))), (_image(),)


@_seeded
def efficientnet():
    from transformers import EfficientNetConfig, EfficientNetForImageClassification
    config = EfficientNetConfig(image_size=IMAGE, width_coefficient=0.25, depth_coefficient=0.25,
                                hidden_dim=320, num_labels=10)
    return _wrap(_lively(_hf(EfficientNetForImageClassification, config))), (_image(),)


# --- vision transformers -------------------------------------------------------------------------

VIT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=IMAGE,
           patch_size=8, num_labels=10)


@_seeded
def vit():
    from transformers import ViTConfig, ViTForImageClassification
    return _wrap(_hf(ViTForImageClassification, ViTConfig(**VIT))), (_image(),)


@_seeded
def deit():
    from transformers import DeiTConfig, DeiTForImageClassification
    return _wrap(_hf(DeiTForImageClassification, DeiTConfig(**VIT))), (_image(),)


@_seeded
def beit():
    from transformers import BeitConfig, BeitForImageClassification
    config = BeitConfig(**VIT, use_relative_position_bias=True)
    return _wrap(_hf(BeitForImageClassification, config)), (_image(),)


@_seeded
def swin():
    from transformers import SwinConfig, SwinForImageClassification
    config = SwinConfig(image_size=IMAGE, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                        window_size=4, num_labels=10)
    return _wrap(_hf(SwinForImageClassification, config)), (_image(),)


# --- more architectures (benchmarks/zoo.py's coverage table) ------------------------------------------

@_seeded
def segformer():
    from transformers import SegformerConfig, SegformerForSemanticSegmentation
    config = SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                             patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
                             decoder_hidden_size=32, num_labels=5)
    return _wrap(_lively(_hf(SegformerForSemanticSegmentation, config))), (_image(),)


@_seeded
def mobilevit():
    from transformers import MobileViTConfig, MobileViTForImageClassification
    config = MobileViTConfig(image_size=IMAGE, hidden_sizes=[32, 40, 48], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
                             num_attention_heads=2, num_labels=10)
    return _wrap(_lively(_hf(MobileViTForImageClassification, config))), (_image(),)


@_seeded
def dinov2():
    from transformers import Dinov2Config, Dinov2Model
    config = Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                          image_size=IMAGE, patch_size=8)
    return _wrap(_hf(Dinov2Model, config)), (_image(),)


@_seeded
def mpnet():
    from transformers import MPNetConfig, MPNetModel
    return _wrap(_hf(MPNetModel, MPNetConfig(**ENC))), (_ids(),)


@_seeded
def gpt_neo():
    from transformers import GPTNeoConfig, GPTNeoForCausalLM
    config = GPTNeoConfig(vocab_size=VOCAB, max_position_embeddings=64, hidden_size=64, num_layers=2, num_heads=4,
                          attention_types=[[["global", "local"], 1]], window_size=8, intermediate_size=128)
    return _causal(_hf(GPTNeoForCausalLM, config)), (_ids(),)


@_seeded
def gptj():
    from transformers import GPTJConfig, GPTJForCausalLM
    config = GPTJConfig(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4, rotary_dim=8)
    return _causal(_hf(GPTJForCausalLM, config)), (_ids(),)


@_seeded
def stablelm():
    from transformers import StableLmConfig, StableLmForCausalLM
    return _causal(_hf(StableLmForCausalLM, StableLmConfig(**DEC))), (_ids(),)


@_seeded
def starcoder2():
    from transformers import Starcoder2Config, Starcoder2ForCausalLM
    return _causal(_hf(Starcoder2ForCausalLM, Starcoder2Config(**DEC))), (_ids(),)


@_seeded
def mbart():
    from transformers import MBartConfig, MBartForConditionalGeneration
    config = MBartConfig(vocab_size=VOCAB, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                         decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                         max_position_embeddings=64)
    return _seq2seq(_hf(MBartForConditionalGeneration, config)), (_ids(), _ids())


@_seeded
def hubert():
    from transformers import HubertConfig, HubertModel
    config = HubertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                          num_conv_pos_embedding_groups=4)
    return _wrap(_hf(HubertModel, config)), (_torch().randn(1, 1600),)


# --- the project's own examples ------------------------------------------------------------------

@_seeded
def ex_mlp():
    from hetflow.examples.mlp import build
    return build()


@_seeded
def ex_gpt2():
    from hetflow.examples.models import build_gpt2
    return build_gpt2(n_layer=2, n_embd=64, n_head=2, seq=16, vocab=100)


@_seeded
def ex_resnet18():
    from hetflow.examples.models import build_resnet18
    return build_resnet18(image=IMAGE)


@_seeded
def ex_vit():
    from hetflow.examples.models import build_vit
    return build_vit(hidden=64, layers=1, heads=2, image=IMAGE)


@_seeded
def ex_bert():
    from hetflow.examples.models import build_bert
    return build_bert(hidden=64, layers=1, heads=2, seq=16)


@_seeded
def ex_gpt2_decode():
    from hetflow.examples.models import build_gpt2_decode
    return build_gpt2_decode(n_layer=2, n_embd=64, n_head=2, context=16, vocab=100)


@_seeded
def ex_gpt2_step():
    """The generator's decode step (``gpt2_generate``): it reads each layer's cache in place, which canonicalize
    makes one ``decode_attention`` node per layer."""
    from hetflow.examples.gpt2_generate import build_decode
    return build_decode(n_layer=2, n_embd=64, n_head=2, vocab=100, max_seq=16)


# --- decode-step graphs built in the IR ----------------------------------------------------------

def _randomise_weights(graph, seed: int = 0, scale: float = 0.1):
    """decode_graphs' weights are zero-stride zeros (for planning): draw real ones (float weights of rank >= 1;
    the scalars such as eps and the attention scale keep their values)."""
    rng = np.random.default_rng(seed)
    for value in graph.weights.values():
        data = value.data
        if data.dtype.kind == "f" and data.ndim >= 1:
            value.data = (rng.standard_normal(data.shape) * scale).astype(data.dtype)
    return graph


def _random_feeds(graph, seed: int = 1):
    rng = np.random.default_rng(seed)
    return {v.name: rng.standard_normal(v.type.shape).astype(v.type.dtype.numpy) for v in graph.inputs}


def ir_mixtral_decode():
    from hetflow.examples.decode_graphs import build_mixtral_decode_layer
    graph = build_mixtral_decode_layer(batch=4, hidden=64, heads=4, kv_heads=2, head_dim=16, context=16,
                                       experts=4, top_k=2, ffn=128)
    return _randomise_weights(graph), _random_feeds(graph)


def ir_gpt2_decode():
    from hetflow.examples.decode_graphs import build_gpt2_decode_step
    graph = build_gpt2_decode_step(layers=2, hidden=64, heads=4, context=16, vocab=VOCAB)
    return _randomise_weights(graph), _random_feeds(graph)


def _entry(fn, family, **kw) -> ZooModel:
    return ZooModel(fn.__name__, fn, family, **kw)


MODELS = [
    _entry(bert, "encoder", tags=("small",)), _entry(roberta, "encoder"), _entry(distilbert, "encoder"),
    _entry(albert, "encoder"), _entry(electra, "encoder"), _entry(deberta_v2, "encoder"),
    _entry(llama, "decoder", tags=("small",)), _entry(mistral, "decoder"), _entry(qwen2, "decoder"),
    _entry(phi, "decoder"), _entry(gemma, "decoder"), _entry(gpt2, "decoder"), _entry(gpt_neox, "decoder"),
    _entry(opt, "decoder"), _entry(bloom, "decoder"), _entry(falcon, "decoder"),
    _entry(mixtral, "moe"), _entry(qwen2_moe, "moe"),
    _entry(t5, "encdec"), _entry(bart, "encdec"),
    _entry(wav2vec2, "audio"), _entry(whisper_encoder, "audio"),
    _entry(unet2d, "unet"),
    _entry(resnet, "cnn"), _entry(convnext, "cnn"), _entry(mobilenet_v2, "cnn"), _entry(mobilenet_v1, "cnn"),
    _entry(regnet, "cnn"), _entry(efficientnet, "cnn"),
    _entry(vit, "vit"), _entry(deit, "vit"), _entry(beit, "vit"), _entry(swin, "vit"),
    _entry(segformer, "vit"), _entry(mobilevit, "vit"), _entry(dinov2, "vit"),
    _entry(mpnet, "encoder"), _entry(gpt_neo, "decoder"), _entry(gptj, "decoder"), _entry(stablelm, "decoder"),
    _entry(starcoder2, "decoder"), _entry(mbart, "encdec"), _entry(hubert, "audio"),
    _entry(ex_mlp, "example", tags=("small",)), _entry(ex_gpt2, "example"), _entry(ex_resnet18, "example"),
    _entry(ex_vit, "example"), _entry(ex_bert, "example"), _entry(ex_gpt2_decode, "example"),
    _entry(ex_gpt2_step, "example"),
    _entry(ir_mixtral_decode, "ir", kind="ir", rtol=1e-2), _entry(ir_gpt2_decode, "ir", kind="ir", rtol=1e-2),
]

ZOO: dict[str, ZooModel] = {m.name: m for m in MODELS}
