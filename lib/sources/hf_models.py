"""Your own VLM: any Hugging Face `LlavaForConditionalGeneration` checkpoint (llava-1.5 and the like) or
`Qwen2VLForConditionalGeneration` one, with the causal LM it was fine-tuned from (the `paper` profile's
`format = "hf-llava"` or `"qwen2-vl"`; `"llava-more"` is lib/sources/paper_models.py).

`hf_vlm_parts` returns the fields of the adapter's `VLM` bundle (lib/kernels/adapter.py; the `models` step assembles
it, as sources come before kernels):

- the model, loaded with `from_pretrained`; its `config.json` must name the class's `model_type` (`llava`,
  `qwen2_vl`), else one `CheckpointError` names the file and the field;
- its tokenizer, whose token for `config.image_token_id` is the image placeholder of the prompts;
- image preprocessing by the checkpoint's own image processor (`preprocessor_config.json`), always its PIL backend
  (no torchvision): a tensor of pixel values for LLaVA, (pixel values, `image_grid_thw`) for Qwen2-VL, whose images
  keep their aspect ratio and become as many tokens as their size gives;
- the prompt: `"chat"` renders the checkpoint's chat template (the tokenizer's, else `chat_template.jinja` or the
  processor's `chat_template.json`) over one user turn holding the image and the question, with the generation
  prompt, so the statement benchmark reads the answer at the last position; any other value is a format string with
  `{image}` and `{question}` (llava-1.5's own: `"USER: {image}\\n{question} ASSISTANT:"`);
- the base LLM (`AutoModelForCausalLM`) with its tokenizer and the text-only prompt: `"chat"` (its chat template
  over `Caption: {caption}\\nInstruction: {question}`, as for the paper) or a format string with `{caption}` and
  `{question}`. Its width and depth must equal the VLM's language model's.

BOS: a prompt is tokenized with the tokenizer's special tokens unless the rendered text already starts with BOS (a
chat template that writes it), so BOS is never doubled; Qwen's tokenizers have no BOS at all.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from lib.sources.paper_models import CheckpointError, _default_device_dtype, local_dir, read_json

CHAT = "chat"
HF_FORMATS = {"hf-llava": "llava", "qwen2-vl": "qwen2_vl"}  # profile format -> config.json model_type
LM_USER_TURN = "Caption: {caption}\nInstruction: {question}"


def chat_template(directory: Path, tokenizer) -> str | None:
    """The checkpoint's chat template: the tokenizer's, else `chat_template.jinja`, else the processor's
    `chat_template.json` (where llava-hf checkpoints keep it); None if it has none."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    if (directory / "chat_template.jinja").exists():
        return (directory / "chat_template.jinja").read_text()
    if (directory / "chat_template.json").exists():
        return read_json(directory / "chat_template.json").get("chat_template")
    return None


def _vlm_chat(tokenizer, template: str, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)


def _lm_chat(tokenizer, template: str, caption: str, question: str) -> str:
    messages = [{"role": "user", "content": LM_USER_TURN.format(caption=caption, question=question)}]
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)


def _vlm_format(spec: str, image: str, question: str) -> str:
    return spec.replace("{image}", image).replace("{question}", question)


def _lm_format(spec: str, caption: str, question: str) -> str:
    return spec.replace("{caption}", caption).replace("{question}", question)


def _starts_with_bos(text: str, tokenizer) -> bool:
    return bool(tokenizer.bos_token) and text.startswith(tokenizer.bos_token)


def vlm_prompt(spec: str, directory: Path, tokenizer, image_token: str, field: str = "paper.prompt") -> tuple:
    """(prompt(question), add_special_tokens) for a VLM prompt spec: "chat" or a format string (module docstring)."""
    if spec == CHAT:
        template = chat_template(directory, tokenizer)
        if template is None:
            raise CheckpointError(
                f"{directory}: no chat template (tokenizer, chat_template.jinja or chat_template.json) for "
                f"`{field}` = 'chat'; write the prompt as a format string with {{image}} and {{question}}"
            )
        fn = partial(_vlm_chat, tokenizer, template)
    else:
        fn = partial(_vlm_format, spec, image_token)
    sample = fn("?")
    if sample.count(image_token) != 1:
        raise CheckpointError(
            f"`{field}` = {spec!r}: the rendered prompt holds the image token {image_token!r} "
            f"{sample.count(image_token)} times; expected once"
        )
    return fn, not _starts_with_bos(sample, tokenizer)


def lm_prompt(spec: str, directory: Path, tokenizer, field: str = "paper.lm_prompt") -> tuple:
    """(lm_prompt(caption, question), add_special_tokens) for the text-only stream's prompt spec."""
    if spec == CHAT:
        template = chat_template(directory, tokenizer)
        if template is None:
            raise CheckpointError(
                f"{directory}: the base LLM has no chat template for `{field}` = 'chat'; write the prompt as a "
                "format string with {caption} and {question}"
            )
        fn = partial(_lm_chat, tokenizer, template)
    else:
        fn = partial(_lm_format, spec)
    return fn, not _starts_with_bos(fn("c", "q"), tokenizer)


def _rgb(image: Any):
    import numpy as np
    from PIL import Image

    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    return img.convert("RGB")


def hf_preprocess(processor, images):
    """The checkpoint's image processor on a list of images: pixel values, or (pixel values, image_grid_thw)."""
    out = processor([_rgb(im) for im in images], return_tensors="pt")
    if "image_grid_thw" in out:
        return out["pixel_values"], out["image_grid_thw"]
    return out["pixel_values"]


def _check_model_type(checkpoint: Path, fmt: str) -> None:
    path = checkpoint / "config.json"
    found = read_json(path).get("model_type")
    if found != HF_FORMATS[fmt]:
        raise CheckpointError(
            f"{path}: field `model_type` = {found!r}; format {fmt!r} expects {HF_FORMATS[fmt]!r} "
            f"(profile field `paper.format`: one of 'llava-more', {', '.join(repr(f) for f in HF_FORMATS)})"
        )


def hf_vlm_parts(
    fmt: str,
    vlm: str | Path,
    llm: str | Path | None,
    prompt: str = CHAT,
    text_prompt: str = CHAT,
    *,
    device=None,
    dtype=None,
) -> dict:
    """The parts of a VLM bundle for a Hugging Face checkpoint of format `fmt` ("hf-llava" or "qwen2-vl") and, unless
    `llm` is None, its base LLM (module docstring). bf16 on GPU, fp32 on CPU unless `dtype` says otherwise."""
    import transformers
    from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer

    if fmt not in HF_FORMATS:
        raise CheckpointError(f"format {fmt!r}: expected one of {list(HF_FORMATS)}")
    device, dtype = _default_device_dtype(device, dtype)
    checkpoint = local_dir(vlm, f"{fmt} checkpoint")
    _check_model_type(checkpoint, fmt)
    cls = {
        "hf-llava": transformers.LlavaForConditionalGeneration,
        "qwen2-vl": transformers.Qwen2VLForConditionalGeneration,
    }
    model = cls[fmt].from_pretrained(checkpoint, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    if not (checkpoint / "preprocessor_config.json").exists():
        raise CheckpointError(f"{checkpoint}: missing preprocessor_config.json (the image processor's settings)")
    processor = AutoImageProcessor.from_pretrained(checkpoint, backend="pil")
    image_token = tokenizer.convert_ids_to_tokens(int(model.config.image_token_id))
    if image_token is None or tokenizer.convert_tokens_to_ids(image_token) != model.config.image_token_id:
        raise CheckpointError(
            f"{checkpoint / 'config.json'}: field `image_token_id` = {model.config.image_token_id} is no token of "
            "the checkpoint's tokenizer"
        )
    prompt_fn, add_special = vlm_prompt(prompt, checkpoint, tokenizer, image_token)
    bundle = dict(
        model=model,
        tokenizer=tokenizer,
        preprocess=partial(hf_preprocess, processor),
        prompt=prompt_fn,
        image_placeholder=image_token,
        add_special_tokens=add_special,
    )
    if llm is None:
        return bundle
    llm_dir = local_dir(llm, "base LLM")
    lm_tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    base_lm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=dtype).to(device).eval()
    text, base = model.config.get_text_config(), base_lm.config
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
        if getattr(text, field) != getattr(base, field):
            raise CheckpointError(
                f"{llm_dir / 'config.json'}: field `{field}` = {getattr(base, field)}, but the VLM's language model "
                f"has {getattr(text, field)}; `paper.llm` must be the LLM the VLM was fine-tuned from"
            )
    lm_fn, lm_add_special = lm_prompt(text_prompt, llm_dir, lm_tokenizer)
    bundle.update(base_lm=base_lm, lm_tokenizer=lm_tokenizer, lm_prompt=lm_fn, lm_add_special_tokens=lm_add_special)
    return bundle
