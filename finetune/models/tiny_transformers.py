"""Tiny flow-matching transformer pipelines built from configs (no downloads), for tests and quick tries: the
same diffusers and transformers classes as the released models, a few hundred thousand random weights.
`python -m finetune.models.tiny DIR --family sd3` writes one."""
from __future__ import annotations

import re
from typing import Any

import torch

from finetune.models.tiny_clip import build_tokenizer, clip_text_model


def build_t5_tokenizer(max_length: int = 32):
    """A character-level T5 tokenizer (Unigram, built in memory): <pad>=0, </s>=1, <unk>=2 as T5 has them."""
    from transformers import T5Tokenizer

    chars = [chr(c) for c in range(ord(" ") + 1, ord("~") + 1)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("\u2581" + c, -2.5) for c in chars]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    tokenizer.model_max_length = max_length
    return tokenizer


def _t5(tokenizer, width: int):
    from transformers import T5Config, T5EncoderModel

    # dropout 0: T5's default 0.1 would make "frozen" encodings random in train mode
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=2 * width, num_layers=2,
                                   num_heads=2, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                                   decoder_start_token_id=0, dropout_rate=0.0))


def _vae(shift_factor: float, scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         layers_per_block=1, norm_num_groups=8, sample_size=32, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=shift_factor, scaling_factor=scaling_factor)


def build_tiny_sd3_pipeline(seed: int = 0):
    """A StableDiffusion3Pipeline in miniature: CLIP-L and CLIP-G 16 wide with projections, T5 32 wide, an
    MMDiT of two joint blocks (the CLIPs' 16 + 16 are zero-padded to T5's 32, as the pipeline does); 32 px."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    tokenizer, tokenizer_2, tokenizer_3 = build_tokenizer(), build_tokenizer(pad_token="!"), build_t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=16)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=clip_text_model(tokenizer, 16, with_projection=True), tokenizer=tokenizer,
        text_encoder_2=clip_text_model(tokenizer_2, 16, with_projection=True), tokenizer_2=tokenizer_2,
        text_encoder_3=_t5(tokenizer_3, 32), tokenizer_3=tokenizer_3)


def build_tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """A FluxPipeline in miniature: CLIP-L 32 wide (its pooled output; 77 tokens, as the pipeline tokenizes), T5
    32 wide, one double- and one single-stream block (2 heads of 16, RoPE axes 4 + 4 + 8) on 4-channel latents
    packed 2x2 into 16 per token; `guidance_embeds`: dev's guidance input (False: schnell's build); 32 px."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_tokenizer(max_length=77), build_t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds,
        axes_dims_rope=[4, 4, 8])
    # Flux.1's scheduler config: shifted by the image's token count at sampling time
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=_vae(shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=clip_text_model(tokenizer, 32), tokenizer=tokenizer, text_encoder_2=_t5(tokenizer_2, 32),
        tokenizer_2=tokenizer_2)


# Qwen3's chat template as ZImagePipeline.encode_prompt applies it (add_generation_prompt, enable_thinking=True):
# "<|im_start|>user\n{caption}<|im_end|>\n<|im_start|>assistant\n"
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def build_qwen_tokenizer(max_length: int = 512):
    """A character-level BPE tokenizer (built with `tokenizers`, no merges) with Qwen's special tokens, padding
    (<|endoftext|>, on the right) and chat template, as a transformers fast tokenizer."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    core = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(chars)}, merges=[], unk_token=None))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")  # one token per character
    core.add_special_tokens([AddedToken(t, special=True) for t in specials])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                        model_max_length=max_length, padding_side="right")
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


# the vision tokens a Qwen-VL config names by id (its processor's image / video slots)
QWEN_VL_TOKENS = {"vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
                  "image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>"}


def build_qwen_vl_tokenizer(template: str, max_length: int = 1024):
    """`build_qwen_tokenizer` with the words of a pipeline's prompt `template` added as tokens (so that its system
    prefix tokenizes to as many tokens as the real tokenizer's: the pipelines drop a fixed count) and the VL
    special tokens."""
    tokenizer = build_qwen_tokenizer(max_length=max_length)
    tokenizer.add_tokens(sorted({w for w in re.findall(r" ?\w+", template) if len(w) > 1}))
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_VL_TOKENS.values())})
    return tokenizer


def qwen_vl_config(tokenizer, config_class: Any, text: dict[str, Any], vision: dict[str, Any]) -> Any:
    """A Qwen-VL config (`Qwen2_5_VLConfig`, `Qwen3VLConfig`) for `tokenizer`: a text model 16 wide (2 heads, 1 kv
    head; bos/eos/pad inside the tiny vocab, whose real ids are not) updated with `text` (layers, rope), a 1-block
    vision tower 16 wide updated with `vision`, and the VL token ids."""
    ids = {key: tokenizer.convert_tokens_to_ids(token) for key, token in QWEN_VL_TOKENS.items()}
    text_config = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_attention_heads=2,
                       num_key_value_heads=1, max_position_embeddings=2048, bos_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **text)
    vision_config = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16, **vision)
    return config_class(text_config=text_config, vision_config=vision_config, **ids)


def build_tiny_zimage_pipeline(seed: int = 0):
    """A ZImagePipeline in miniature: a Qwen3 of two layers 32 wide (the pipeline reads its second-to-last hidden
    states, so cap_feat_dim 32), a single-stream transformer 32 wide (2 heads of 16, RoPE axes 4 + 6 + 6; one
    noise- and one context-refiner layer, one main layer) on 4-channel latents in 2x2 patches, and the Flux-type
    VAE Z-Image uses (shift 0.1159, scale 0.3611); Z-Image-Turbo's scheduler config (shift 3.0, static); 32 px."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    tokenizer = build_qwen_tokenizer()
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=tokenizer.model_max_length,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, attention_dropout=0.0))
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, cap_feat_dim=32, axes_dims=[4, 6, 6], axes_lens=[1024, 64, 64])
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False),
        vae=_vae(shift_factor=0.1159, scaling_factor=0.3611), text_encoder=text_encoder, tokenizer=tokenizer,
        transformer=transformer)
    for part in (text_encoder, transformer, pipe.vae):
        part.eval()
    return pipe


MISTRAL_CHAT = (  # Mistral-Small-3.1's layout ([SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST]), text contents
    "<s>{% for m in messages %}{% set t = m['content'] if m['content'] is string else m['content'][0]['text'] %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ t }}[/SYSTEM_PROMPT]{% else %}[INST]{{ t }}[/INST]{% endif %}"
    "{% endfor %}")


def build_mistral_tokenizer(max_length: int = 512):
    """A character-level fast tokenizer with Mistral's special tokens and chat template (the real `tokenizer` is
    a PixtralProcessor, which needs torchvision; the pipeline only calls its apply_chat_template on text)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    core = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(chars)}, merges=[], unk_token=None))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.add_special_tokens([AddedToken(t, special=True) for t in
                             ("<pad>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                              "[IMG]")])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        model_max_length=max_length, padding_side="right")
    tokenizer.chat_template = MISTRAL_CHAT
    return tokenizer
