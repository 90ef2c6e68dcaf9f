"""FLUX.2 [dev] (32B): Flux2Pipeline. FLUX.2 [klein]'s transformer and VAE classes, latents and position ids
(flux2.py), with two differences. The guidance scale is distilled into the transformer (guidance_embeds), as in
FLUX.1-dev: one pass per step, no negative prompt. And the text encoder is Mistral Small 3.1
(Mistral3ForConditionalGeneration, with a PixtralProcessor as its tokenizer): the prompt is a chat of the pipeline's
system message and the caption, and the hidden states of layers 10, 20 and 30 are stacked side by side."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lookalike.models.families.flux2 import FLUX2_COMMON, Flux2, TinyFlux2Sizes, tiny_flux2_transformer_and_vae
from lookalike.models.families.interface import BaseModelInfo
from lookalike.models.tiny import ensure_built, spec_folder_name

TINY_FORMAT = 1  # bump when the tiny model's architecture or tokenizer changes, so old folders are not reused

# The published transformer of FLUX.2 [dev] (Flux2Transformer2DModel's defaults): joint_attention_dim is three
# stacked layers of Mistral Small 3.1's 5120 hidden units.
DEV_TRANSFORMER = dict(FLUX2_COMMON, num_layers=8, num_single_layers=48, num_attention_heads=48,
                       joint_attention_dim=15360, guidance_embeds=True)

# Mistral's special tokens as its tokenizer names them, and a chat template with the layout of Mistral Small 3.1's
# for what the pipeline sends: the system message, then the user's text.
MISTRAL_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                          "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}[SYSTEM_PROMPT]"
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}[/SYSTEM_PROMPT]"
    "{% else %}[INST]{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% else %}[IMG]{% endif %}{% endfor %}[/INST]{% endif %}{% endfor %}")


@dataclass(frozen=True)
class TinyFlux2DevSpec(TinyFlux2Sizes):
    """A tiny FLUX.2 [dev]."""

    @property
    def folder_name(self) -> str:
        return spec_folder_name(f"tiny-flux2-dev-v{TINY_FORMAT}", self)


def tiny_mistral_processor():
    """A PixtralProcessor around a byte-level BPE tokenizer with no merges (every byte is a token), Mistral's special
    tokens and a chat template of its layout. The pipeline's system message is one token of the vocabulary, so that
    a tiny model's short prompt length still holds the caption after it (Mistral's own vocabulary makes it about 35
    tokens of 512)."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PixtralImageProcessor, PixtralProcessor, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {token: index for index, token in enumerate(MISTRAL_SPECIAL_TOKENS)}
    for symbol in bytes_to_unicode().values():
        vocab[symbol] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=512)
    fast.add_special_tokens({"additional_special_tokens": MISTRAL_SPECIAL_TOKENS[4:]})
    fast.add_tokens([SYSTEM_MESSAGE])
    return PixtralProcessor(image_processor=PixtralImageProcessor(), tokenizer=fast, patch_size=16,
                            spatial_merge_size=1, chat_template=MISTRAL_CHAT_TEMPLATE)


def build_tiny_flux2_dev(spec: TinyFlux2DevSpec = TinyFlux2DevSpec()):
    """The tiny Flux2Pipeline, built in memory deterministically from spec.seed."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    processor = tiny_mistral_processor()
    tokenizer = processor.tokenizer
    with torch.random.fork_rng(devices=[]):
        transformer, vae = tiny_flux2_transformer_and_vae(spec, len(Flux2Dev.text_layers), guidance_embeds=True)
        torch.manual_seed(spec.seed + 2)
        text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
            text_config=MistralConfig(
                hidden_size=spec.text_hidden, intermediate_size=spec.text_hidden * 2,
                num_hidden_layers=max(Flux2Dev.text_layers) + 1, num_attention_heads=2, num_key_value_heads=2,
                head_dim=spec.text_hidden // 2, vocab_size=len(tokenizer), max_position_embeddings=512,
                pad_token_id=tokenizer.pad_token_id),
            # The vision tower reads images a prompt never carries here; one tiny layer keeps the class whole.
            vision_config=PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, head_dim=8, image_size=64, patch_size=16),
            image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=1))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    return Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=processor,
                         transformer=transformer)


class Flux2Dev(Flux2):
    name = "flux2-dev"
    pipeline_class_name = "Flux2Pipeline"
    title = "FLUX.2 [dev]"
    pipeline_guidance = 4.0  # train_dreambooth_lora_flux2.py trains on the posterior's mode too, as [klein]'s
    distilled_guidance = True
    text_layers = (10, 20, 30)  # the pipeline's text_encoder_out_layers, and train_dreambooth_lora_flux2.py's
    components = dict(Flux2.components, text_encoder=("transformers", "Mistral3ForConditionalGeneration"),
                      tokenizer=("transformers", "PixtralProcessor"))
    bases = {
        # Guidance-distilled: 50 steps at guidance 4 by default, one transformer pass per step.
        "flux2-dev": BaseModelInfo("flux2-dev", "black-forest-labs/FLUX.2-dev", 512, 50, architecture=DEV_TRANSFORMER,
                                   licence="non-commercial (FLUX.2 [dev] licence)", gated=True),
        "tiny-flux2-dev": BaseModelInfo("flux2-dev", None, 32, 28),
    }
    # The presets are FLUX.2 [klein]'s: train_dreambooth_lora_flux2.py adapts the same layers as its script.
    negative_prompt = None  # the guidance is distilled: no classifier-free guidance, so no negative prompt

    def owns(self, denoiser_config) -> bool:
        return bool(denoiser_config.get("guidance_embeds"))

    def local_info(self, folder: Path) -> BaseModelInfo:
        return BaseModelInfo("flux2-dev", None, 512, 50)

    def ensure_tiny(self, name: str) -> Path:
        return ensure_built(TinyFlux2DevSpec().folder_name, build_tiny_flux2_dev)

    def pipeline_embeddings(self, text, negative, device, dtype) -> dict:
        return {"prompt_embeds": text["prompt_embeds"][None].to(device, dtype)}
