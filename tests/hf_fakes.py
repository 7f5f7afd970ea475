"""Tiny random "your own VLM" checkpoints in the Hugging Face layouts, built by the tests (no hub, no network).

- `write_hf_llava`: a `LlavaForConditionalGeneration` saved with `save_pretrained` the way llava-hf publishes
  llava-1.5: CLIP vision tower, Llama language model with grouped-query attention (4 query heads, 2 KV heads), a
  tokenizer with an `<image>` token, a `CLIPImageProcessor` preprocessor_config.json and llava-1.5's chat template in
  the processor's `chat_template.json` (not in the tokenizer). Its base LLM is a Llama of the same shape with no chat
  template (like Vicuna), so its text prompt is a format string.
- `write_hf_qwen2_vl`: a `Qwen2VLForConditionalGeneration` with a Qwen2-VL-style tokenizer (`<|im_start|>`,
  `<|vision_start|><|image_pad|><|vision_end|>`, no BOS) and chat template, a `Qwen2VLImageProcessor` config whose
  pixel limits keep the images near their own size (8 px merged patches: a 40 x 30 image becomes 5 x 4 = 20 image
  tokens, a 32 x 32 one 16), grouped-query attention and M-RoPE; its base LLM is a `Qwen2ForCausalLM` of the same
  shape with the same tokenizer.

Weights are random with a large init range (fakes.INIT) so that every component visibly moves the output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch
from fakes import INIT

TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
CORPUS = [
    "What is to the left of the dog? Is the cat on top of the laptop? How many people are there?",
    "Caption: A man riding a horse next to a red bus.\nInstruction: What color is the bus?",
    "Is the following statement correct? Answer only with 'Yes' or 'No'.\nStatement: The cat is under the table.\n"
    "Answer: Yes No",
    "USER: ASSISTANT: system You are a helpful assistant. user assistant caption of image",
]
# llava-1.5's template as llava-hf ships it (images first, then the text; "ASSISTANT:" as the generation prompt).
LLAVA15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# Qwen2-VL's template, without its video and tool branches.
QWEN2VL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


class FakeHF(NamedTuple):
    vlm: Path
    llm: Path
    n_layers: int
    d_model: int


def _bpe(specials: tuple[str, ...], bos: str | None, eos: str, pad: str, vocab_size: int = 500):
    """A byte-level BPE tokenizer trained on CORPUS with `specials`; BOS prepended on encode when given. The
    vocabulary is as large as the corpus allows, so that "Yes" and "No" are single tokens and prompts short."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(CORPUS, trainer)
    if bos is not None:
        core.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, core.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos, pad_token=pad)


def write_hf_llava(directory: Path, n_layers: int = 3, seed: int = 0) -> FakeHF:
    """A tiny llava-1.5 in the llava-hf layout and its base LLM (module docstring)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

    directory = Path(directory)
    vlm_dir, llm_dir = directory / "llava-hf", directory / "vicuna"
    tok = _bpe(("<unk>", "<s>", "</s>", "<image>", "<pad>"), bos="<s>", eos="</s>", pad="<pad>")
    text = LlamaConfig(
        vocab_size=len(tok),
        **TEXT,
        num_hidden_layers=n_layers,
        max_position_embeddings=256,
        initializer_range=INIT,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=7,
        initializer_range=INIT,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).save_pretrained(vlm_dir)
    tok.save_pretrained(vlm_dir)
    (vlm_dir / "chat_template.json").write_text(json.dumps({"chat_template": LLAVA15_TEMPLATE}))
    (vlm_dir / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "CLIPImageProcessor",
                "crop_size": {"height": 28, "width": 28},
                "do_center_crop": True,
                "do_normalize": True,
                "do_resize": True,
                "do_convert_rgb": True,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "resample": 3,
                "size": {"shortest_edge": 28},
            }
        )
    )
    torch.manual_seed(seed + 1)
    LlamaForCausalLM(text).save_pretrained(llm_dir)
    tok.save_pretrained(llm_dir)
    return FakeHF(vlm_dir, llm_dir, n_layers, TEXT["hidden_size"])


def write_hf_qwen2_vl(directory: Path, n_layers: int = 3, seed: int = 0) -> FakeHF:
    """A tiny Qwen2-VL and its base Qwen2 LLM (module docstring)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    directory = Path(directory)
    vlm_dir, llm_dir = directory / "qwen2-vl", directory / "qwen2"
    tok = _bpe(QWEN_SPECIALS, bos=None, eos="<|im_end|>", pad="<|endoftext|>")
    tok.chat_template = QWEN2VL_TEMPLATE
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = dict(
        vocab_size=len(tok),
        **TEXT,
        num_hidden_layers=n_layers,
        max_position_embeddings=512,
        initializer_range=INIT,
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    # head_dim 8: rotary pairs 4 = temporal 2 + row 1 + column 1 (M-RoPE sections).
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
    config = Qwen2VLConfig(
        text_config={**text, "rope_parameters": rope},
        vision_config=dict(
            depth=2,
            embed_dim=16,
            hidden_size=TEXT["hidden_size"],
            num_heads=2,
            mlp_ratio=2,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            initializer_range=INIT,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    Qwen2VLForConditionalGeneration(config).save_pretrained(vlm_dir)
    tok.save_pretrained(vlm_dir)
    (vlm_dir / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "Qwen2VLImageProcessor",
                "do_resize": True,
                "do_rescale": True,
                "do_normalize": True,
                "do_convert_rgb": True,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "min_pixels": 16 * 16,
                "max_pixels": 64 * 64,
                "patch_size": 4,
                "merge_size": 2,
                "temporal_patch_size": 2,
            }
        )
    )
    torch.manual_seed(seed + 1)
    Qwen2ForCausalLM(
        Qwen2Config(**text, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    ).save_pretrained(llm_dir)
    tok.save_pretrained(llm_dir)
    return FakeHF(vlm_dir, llm_dir, n_layers, TEXT["hidden_size"])
