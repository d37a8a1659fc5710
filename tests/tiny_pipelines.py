"""Whole diffusers pipelines of the five families, built from tiny seeded components, with no hub access.

Each ``build_<family>()`` assembles the real pipeline class (DiTPipeline, PixArtSigmaPipeline,
StableDiffusion3Pipeline, FluxPipeline, HunyuanDiTPipeline; the video pipelines LattePipeline and WanPipeline
take ``prompt_embeds``, with no tokenizer or text encoder, and Wan no VAE) from:

- the transformer in its family's tiny configuration (``Family.configs["tiny"]``, the one source of truth;
  HunyuanDiT's text lengths are overridden with the pipeline's hard-coded 77 / 256 tokens: its transformer's
  padding table must match; SD3.5 adds its variant's options);
- text encoders from small transformers configs whose widths are wired to the transformer
  (T5 ``d_model`` = ``caption_channels`` / ``joint_attention_dim`` / ``cross_attention_dim_t5``, CLIP
  hidden / projection sizes summing to SD3's ``pooled_projection_dim``, ...);
- tokenizers built in memory from a dozen-word vocabulary (transformers 5 tokenizers take the vocabulary
  directly: CLIP BPE whose merges spell the words; Bert WordPiece; T5 Unigram), so nothing is read from
  disk or the network;
- a tiny AutoencoderKL (2 blocks of 8 channels, 4 for HunyuanDiT whose pipeline assumes a factor of 8)
  whose latent channels match the transformer (FLUX packs 2x2 latent patches:
  ``in_channels = 4 * latent_channels``; SD3 and FLUX get their shift/scaling factors);
- a scheduler built from keyword arguments (the family's own scheduler class; HunyuanDiT gets DDIM
  instead of its DDPM, whose steps add noise drawn in the model dtype: ``torch.randn`` in bf16 does not
  draw the fp32 numbers rounded, so bf16 and fp32 runs would diverge by more than rounding).

``build(family, dtype)`` caches one pipeline per (family, dtype); components are seeded so the bf16
pipeline holds the fp32 one's weights rounded. Callers must leave a cached pipeline unpatched.
"""

from __future__ import annotations

import functools

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    HunyuanDiTPipeline,
    LattePipeline,
    PixArtSigmaPipeline,
    StableDiffusion3Pipeline,
    WanPipeline,
)
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from dit_kernels.models import family_named

FAMILIES = ("dit", "pixart", "sd3", "sd35", "flux", "hunyuan", "latte", "wan", "wan_a14b", "wan_ti2v")

WORDS = "a photo of an astronaut riding horse on the moon cat dog red blue small".split()
LATENT_CHANNELS = 4


def seeded(make):
    """Build ``make()`` right after seeding, so each component's weights depend on nothing built before."""
    torch.manual_seed(0)
    return make().eval()


def tiny_transformer(family: str, **overrides):
    """The family's tiny transformer (its registry config with ``overrides``), seeded."""
    return seeded(lambda: family_named(family).build("tiny", **overrides))


# ----------------------------------------------------------------------------------------- tokenizers


def clip_tokenizer(max_length: int = 8) -> CLIPTokenizer:
    """CLIP BPE whose merges spell each of WORDS left to right (other text falls back to characters):
    start/end tokens 0/1, padding with the end token."""
    chars = sorted(set("".join(WORDS)))
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    merges = []
    for word in WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        for symbol in symbols[1:]:
            merges.append((symbols[0], symbol))
            symbols[0] += symbol
            tokens.append(symbols[0])
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), model_max_length=max_length)


def bert_tokenizer() -> BertTokenizer:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    return BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, model_max_length=77)


def t5_tokenizer() -> T5Tokenizer:
    """T5 Unigram: whole words, single characters as the fallback; pad 0, eos 1, unk 2, no extra ids."""
    chars = sorted(set("".join(WORDS)))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in WORDS]
    return T5Tokenizer(vocab=pieces + [("▁", -3.0)] + [(c, -5.0) for c in chars], extra_ids=0)


# ----------------------------------------------------------------------------------------- text encoders


def t5_encoder(tokenizer, d_model: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0,
    )  # fmt: skip
    return seeded(lambda: T5EncoderModel(config))


def clip_config(tokenizer, hidden: int, projection: int = 8) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length, projection_dim=projection,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip


def bert_encoder(tokenizer, hidden: int) -> BertModel:
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=tokenizer.model_max_length,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return seeded(lambda: BertModel(config, add_pooling_layer=False))


# ----------------------------------------------------------------------------------------- VAE


def tiny_vae(latent_channels: int = LATENT_CHANNELS, downsamples: int = 1, **factors) -> AutoencoderKL:
    """AutoencoderKL with ``downsamples + 1`` blocks of 8 channels: image = latent * 2**downsamples."""
    blocks = downsamples + 1
    return seeded(
        lambda: AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8,) * blocks,
            down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
            layers_per_block=1, norm_num_groups=4, sample_size=16, **factors,
        )  # fmt: skip
    )


# ----------------------------------------------------------------------------------------- pipelines


def build_dit() -> DiTPipeline:
    """DiT-XL/2 shaped: learned sigma (``out_channels = 2 * in_channels``, which the pipeline reads)."""
    transformer = tiny_transformer("dit")
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    return DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=scheduler)


def build_pixart() -> PixArtSigmaPipeline:
    tokenizer = t5_tokenizer()
    transformer = tiny_transformer("pixart")
    scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    return PixArtSigmaPipeline(
        tokenizer=tokenizer, text_encoder=t5_encoder(tokenizer, 32), vae=tiny_vae(), transformer=transformer,
        scheduler=scheduler,
    )  # fmt: skip


def build_sd3(version: str = "3") -> StableDiffusion3Pipeline:
    """SD3 (2 layers, the last ``context_pre_only``) or SD3.5 (3 layers, qk RMSNorm, dual attention in
    layers 0 and 1). Text: two CLIPs of width 8 (+8 padded up to T5's 32 = ``joint_attention_dim``), each
    projecting to 12 (12 + 12 = ``pooled_projection_dim``)."""
    extra = {"num_layers": 3, "qk_norm": "rms_norm", "dual_attention_layers": (0, 1)} if version == "3.5" else {}
    transformer = tiny_transformer("sd3", **extra)
    clip_1, clip_2, t5 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(1)  # the two CLIPs differ
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(clip_2, hidden=8, projection=12)).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=seeded(lambda: CLIPTextModelWithProjection(clip_config(clip_1, hidden=8, projection=12))),
        tokenizer=clip_1, text_encoder_2=text_encoder_2, tokenizer_2=clip_2,
        text_encoder_3=t5_encoder(t5, 32), tokenizer_3=t5,
    )  # fmt: skip


def build_flux() -> FluxPipeline:
    """FLUX.1-dev shaped (guidance embedding); CLIP width 24 = ``pooled_projection_dim`` (its pooled output
    is used), T5 width 32 = ``joint_attention_dim``; 16 = 4 x 4 packed latent channels."""
    transformer = tiny_transformer("flux")
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )  # fmt: skip
    clip, t5 = clip_tokenizer(), t5_tokenizer()
    return FluxPipeline(
        scheduler=scheduler, vae=tiny_vae(shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=seeded(lambda: CLIPTextModel(clip_config(clip, hidden=24))), tokenizer=clip,
        text_encoder_2=t5_encoder(t5, 32), tokenizer_2=t5, transformer=transformer,
    )  # fmt: skip


def build_hunyuan() -> HunyuanDiTPipeline:
    """The pipeline hard-codes a VAE factor of 8 (its RoPE grid is ``height // 8 // patch_size``) and text
    lengths 77 (Bert) / 256 (T5), so the VAE downsamples 3 times and the transformer takes those lengths."""
    transformer = tiny_transformer("hunyuan", text_len=77, text_len_t5=256)
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.03, prediction_type="v_prediction",
        clip_sample=False, steps_offset=1,
    )  # fmt: skip
    bert, t5 = bert_tokenizer(), t5_tokenizer()
    return HunyuanDiTPipeline(
        vae=tiny_vae(downsamples=3), text_encoder=bert_encoder(bert, 16), tokenizer=bert, transformer=transformer,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        text_encoder_2=t5_encoder(t5, 16), tokenizer_2=t5,
    )  # fmt: skip


def build_latte() -> LattePipeline:
    """Latte-1 shaped (spatial + temporal blocks, 3 frames), called with ``prompt_embeds`` (no tokenizer or
    text encoder: the T5 is not what is patched); the 2D VAE decodes frame by frame."""
    scheduler = DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False)
    return LattePipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=tiny_transformer("latte"),
                         scheduler=scheduler)  # fmt: skip


def build_wan(variant: str = "t2v") -> WanPipeline:
    """Wan 2.1 T2V shaped, called with ``prompt_embeds`` (no tokenizer or text encoder) and no VAE (latents
    out; the pipeline then takes Wan's VAE factors 4 / 8). ``"a14b"``: Wan 2.2 A14B's two transformers,
    ``transformer_2`` (other weights) denoising below ``boundary_ratio``; ``"ti2v"``: Wan 2.2 TI2V's
    per-token timesteps (``expand_timesteps``)."""
    second = None
    if variant == "a14b":
        torch.manual_seed(1)
        second = family_named("wan").build("tiny")
    return WanPipeline(
        tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=tiny_transformer("wan"), transformer_2=second,
        boundary_ratio=0.7 if variant == "a14b" else None, expand_timesteps=variant == "ti2v",
    )  # fmt: skip


BUILDERS = {
    "dit": build_dit,
    "pixart": build_pixart,
    "sd3": build_sd3,
    "sd35": functools.partial(build_sd3, "3.5"),
    "flux": build_flux,
    "hunyuan": build_hunyuan,
    "latte": build_latte,
    "wan": build_wan,
    "wan_a14b": functools.partial(build_wan, "a14b"),
    "wan_ti2v": functools.partial(build_wan, "ti2v"),
}


@functools.cache
def build(family: str, dtype: torch.dtype = torch.float32):
    """The cached tiny pipeline of ``family`` (one of FAMILIES) with every component cast to ``dtype``."""
    pipe = BUILDERS[family]().to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe
