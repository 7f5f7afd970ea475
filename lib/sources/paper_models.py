"""The `paper` profile's real models: LLaVA-MORE, Llama-3.1-8B-Instruct and the Llama Scope SAEs (its data, VQAv2,
VSR and COCO captions, is lib/sources/paper_data.py).

LLaVA-MORE (`aimagelab/LLaVA_MORE-llama_3_1-8B-finetuning`) is published in the original LLaVA layout
(`LlavaLlamaForCausalLM`, `model_type: llava_llama`), which `transformers` cannot load. `convert_llava_more` maps it
onto `transformers.LlavaForConditionalGeneration`, so the paper's model runs through the same adapter
(lib/kernels/adapter.py) as the organism:

    original key                                            LlavaForConditionalGeneration key
    model.embed_tokens.* / model.layers.* / model.norm.*    model.language_model.{embed_tokens,layers,norm}.*
    lm_head.*                                               lm_head.*
    model.mm_projector.0.* / model.mm_projector.2.*         model.multi_modal_projector.linear_1.* / linear_2.*
    model.vision_tower.vision_tower.vision_model.*          model.vision_tower.*   (when the checkpoint has them)

`mlp2x_gelu` is Linear -> GELU (exact) -> Linear, the same as HF's projector with `projector_hidden_act="gelu"`;
`mm_vision_select_layer -2` is `vision_feature_layer=-2`; `mm_vision_select_feature "patch"` (CLS dropped) is the
"default" select strategy. When the checkpoint carries no tower weights, the tower is the CLIP model named by
`mm_vision_tower` (`openai/clip-vit-large-patch14-336`), loaded from `clip=` (a local directory or a hub id). The CLIP
directory is needed in both cases for the tower's config. When the checkpoint carries tower weights too, the converter
says which tower it uses and checks that the two agree (lib/sources/llava_tower.py: LLaVA-MORE's own loader reloads
`mm_vision_tower` and ignores the checkpoint's copy). Original-LLaVA options the conversion does not implement
(`mm_use_im_start_end: true`, an `mm_patch_merge_type` other than `flat`) are refused, naming the field.

Prompts follow LLaVA-MORE's `llama_3_1` conversation: the Llama-3.1 chat template over
[system: LLaVA-MORE's system prompt, user: "<image>\\n{question}"], with `add_generation_prompt=False` as in
LLaVA-MORE's `Conversation.get_prompt` (the authors' activation code used the same call). LLaVA-MORE's tokenizer adds
BOS and the template writes one too; LLaVA-MORE's evaluation strips the duplicate, and so do we (the prompt is
tokenized with `add_special_tokens=False`). The authors' caching code (`vlm_scope`) kept both BOS tokens and dropped
only the first; the book drops the single BOS (see `Batch.bos_bs`).

Image preprocessing is LLaVA's `image_aspect_ratio: pad`: pad to a square with the CLIP mean colour (mean * 255,
truncated to int), then CLIP's resize (shortest edge, bicubic) / centre crop / rescale / normalise, with PIL and numpy.

Shape key: b batch, c channels, y/x image rows/columns, d model width, f SAE features.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lib.sources.llava_tower import choose_tower, first_disagreement

LLAVA_MORE_ID = "aimagelab/LLaVA_MORE-llama_3_1-8B-finetuning"
LLM_ID = "meta-llama/Llama-3.1-8B-Instruct"
CLIP_ID = "openai/clip-vit-large-patch14-336"
LLAMA_SCOPE_RELEASE = "llama_scope_lxr_8x"

# LLaVA-MORE's `conv_llava_llama_3_1` system prompt (src/llava/conversation.py).
LLAVA_MORE_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)
# HF LlavaForConditionalGeneration looks the image token up in the embedding before replacing it, so it must be an id
# inside Llama-3.1's vocabulary; original LLaVA used the out-of-vocabulary id -200. A reserved special token is unused
# by the model and is never produced by ordinary text.
IMAGE_TOKEN = "<|reserved_special_token_0|>"

# OpenAI CLIP normalisation, used when the CLIP directory has no preprocessor_config.json.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message names the file or key and what was expected."""


# ---------------------------------------------------------------------------------------------------------------
# Locating files


def local_dir(source: str | Path, what: str) -> Path:
    """A local directory for `source`: itself if it exists, else the hub snapshot (the local cache when
    HF_HUB_OFFLINE=1). Tests always pass local paths."""
    path = Path(source)
    if path.exists():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(source)))
    except Exception as e:  # the hub client raises several types; the user needs one message
        raise CheckpointError(
            f"{what}: {source!r} is neither a local directory nor a hub id available here ({e})"
        ) from e


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _shards(checkpoint: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards its index names, or a single model.safetensors."""
    index = checkpoint / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: expected a `weight_map` object")
        files = [checkpoint / name for name in dict.fromkeys(weight_map.values())]
    else:
        files = [checkpoint / "model.safetensors"]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"{checkpoint}: missing weight file {missing[0]}")
    return files


# ---------------------------------------------------------------------------------------------------------------
# LLaVA-MORE: config, weights, preprocessing, prompt

# The Llama fields an original-layout config carries next to the LLaVA ones (transformers 4.43 names).
_LLAMA_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "attention_bias",
    "attention_dropout",
    "mlp_bias",
    "pretraining_tp",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "tie_word_embeddings",
)
_REQUIRED_LLAMA = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}
# Original-LLaVA options with another value than LLaVA-MORE's change the image tokens; none is implemented here.
# field -> (the only value converted, which is LLaVA's default when the field is absent; what the others would need)
_UNSUPPORTED = {
    "mm_use_im_start_end": (False, "<im_start>/<im_end> tokens around the image tokens are not implemented"),
    "mm_patch_merge_type": ("flat", "LLaVA-NeXT's merged patch grids ('spatial', 'spatial_unpad') are not implemented"),
}


def llava_config(checkpoint: Path, vision_config, image_token_id: int):
    """HF `LlavaConfig` from an original-layout `config.json` and the tower's `CLIPVisionConfig`."""
    from transformers import LlamaConfig, LlavaConfig

    path = checkpoint / "config.json"
    cfg = read_json(path)
    if cfg.get("model_type") != "llava_llama":
        raise CheckpointError(
            f"{path}: field `model_type` = {cfg.get('model_type')!r}; expected 'llava_llama' "
            "(an original-LLaVA-layout checkpoint such as LLaVA-MORE)"
        )
    for field in (*_REQUIRED_LLAMA, "mm_hidden_size", "mm_vision_select_layer"):
        if field not in cfg:
            raise CheckpointError(f"{path}: missing field `{field}`")
    checks = {
        "mm_projector_type": ("mlp2x_gelu",),
        "mm_vision_select_feature": tuple(_SELECT_FEATURE),
        "image_aspect_ratio": ("pad",),
    }
    for field, allowed in checks.items():
        if cfg.get(field) not in allowed:
            raise CheckpointError(f"{path}: field `{field}` = {cfg.get(field)!r}; expected one of {list(allowed)}")
    for field, (converted, why) in _UNSUPPORTED.items():
        if cfg.get(field, converted) != converted:
            raise CheckpointError(f"{path}: field `{field}` = {cfg[field]!r}; expected {converted!r} ({why})")
    if cfg["mm_hidden_size"] != vision_config.hidden_size:
        raise CheckpointError(
            f"{path}: field `mm_hidden_size` = {cfg['mm_hidden_size']} but the vision tower's "
            f"hidden_size is {vision_config.hidden_size}"
        )
    text_config = LlamaConfig(**{k: cfg[k] for k in _LLAMA_FIELDS if k in cfg})
    side = vision_config.image_size // vision_config.patch_size
    strategy = _SELECT_FEATURE[cfg["mm_vision_select_feature"]]
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=side * side + (strategy == "full"),
        projector_hidden_act="gelu",
        vision_feature_select_strategy=strategy,
        vision_feature_layer=int(cfg["mm_vision_select_layer"]),
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


_TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."
_RENAMES = (  # first matching prefix wins
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    (_TOWER_PREFIX, "model.vision_tower."),
    ("model.", "model.language_model."),
    ("lm_head.", "lm_head."),
)


def hf_key(original_key: str) -> str | None:
    """The LlavaForConditionalGeneration name of an original-layout key; None for keys that hold no weights the
    model needs (rotary caches some older checkpoints saved)."""
    if original_key.endswith("rotary_emb.inv_freq"):
        return None
    for old, new in _RENAMES:
        if original_key.startswith(old):
            return new + original_key[len(old) :]
    return "?" + original_key  # unmapped: reported as unexpected


def _default_device_dtype(device, dtype) -> tuple[torch.device, torch.dtype]:
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype


def _clip_tower_state(clip_dir: Path, dtype) -> dict[str, torch.Tensor]:
    """The vision tower of the CLIP model in `clip_dir` (a full CLIPModel or a CLIPVisionModel), as a state dict of
    LlavaForConditionalGeneration's `model.vision_tower`."""
    from transformers import CLIPVisionModel
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a full CLIPModel's text tower is 'unexpected' here, by design
    try:
        tower, info = CLIPVisionModel.from_pretrained(clip_dir, output_loading_info=True, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    if info["missing_keys"]:
        raise CheckpointError(f"{clip_dir}: missing vision-tower key `{sorted(info['missing_keys'])[0]}`")
    return tower.state_dict()


@torch.no_grad()
def convert_llava_more(
    checkpoint: str | Path,
    clip: str | Path | None = None,
    *,
    image_token_id: int,
    device=None,
    dtype=None,
    tower: str | None = None,
):
    """An HF `LlavaForConditionalGeneration` holding an original-layout LLaVA checkpoint's weights.

    The vision tower is chosen as lib/sources/llava_tower.py says, and the choice printed; `tower="clip"` or
    `tower="checkpoint"` overrides it.

    Every parameter of the HF model must come from the checkpoint (or, for the tower, from `clip`), with the right
    shape; the first missing or misshapen key raises one `CheckpointError` naming it. Unmapped checkpoint keys are
    an error too, so no weight is silently dropped. Shards are read one tensor at a time into the model, so peak
    memory is the model plus one tensor.
    """
    from safetensors import safe_open
    from transformers import CLIPVisionConfig, LlavaForConditionalGeneration

    checkpoint = local_dir(checkpoint, "LLaVA checkpoint")
    device, dtype = _default_device_dtype(device, dtype)
    cfg = read_json(checkpoint / "config.json")
    named = cfg.get("mm_vision_tower", CLIP_ID)
    clip_source = clip if clip is not None else named
    clip_dir = local_dir(clip_source, "CLIP vision tower")
    vision_config = CLIPVisionConfig.from_pretrained(clip_dir)
    config = llava_config(checkpoint, vision_config, image_token_id)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    params = dict(model.named_parameters())
    filled: set[str] = set()
    stored: dict[str, torch.dtype] = {}  # the dtype each tensor had in the checkpoint
    unexpected: list[str] = []
    for shard in _shards(checkpoint):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                name = hf_key(key)
                if name is None:
                    continue
                if name not in params:
                    unexpected.append(key)
                    continue
                tensor = f.get_tensor(key)
                if tuple(tensor.shape) != tuple(params[name].shape):
                    raise CheckpointError(
                        f"{shard.name}: key `{key}` has shape {tuple(tensor.shape)}; expected "
                        f"{tuple(params[name].shape)} (for `{name}`)"
                    )
                params[name].copy_(tensor)
                filled.add(name)
                stored[name] = tensor.dtype
    if unexpected:
        raise CheckpointError(
            f"{checkpoint}: key `{unexpected[0]}` has no place in LlavaForConditionalGeneration "
            f"({len(unexpected)} such keys)"
        )
    ours = {n[len("model.vision_tower.") :]: p for n, p in params.items() if n.startswith("model.vision_tower.")}
    tower_params, unfrozen = {f"model.vision_tower.{n}" for n in ours}, bool(cfg.get("unfreeze_mm_vision_tower"))
    in_checkpoint = bool(tower_params & filled)
    need_clip = not in_checkpoint or (tower or ("clip", "checkpoint")[unfrozen]) == "clip"  # to use or to compare
    clip_state = _clip_tower_state(clip_dir, dtype) if need_clip else None
    if not in_checkpoint or not tower_params - filled:  # a partial tower fails below, naming its first gap
        compare = in_checkpoint and tower is None and clip_state is not None
        stored_dtypes = {n[len("model.vision_tower.") :]: d for n, d in stored.items() if n in tower_params}
        choice = choose_tower(
            in_checkpoint=in_checkpoint,
            unfrozen=unfrozen,
            requested=tower,
            checkpoint=str(checkpoint),
            clip=str(clip_source),
            named=str(named),
            disagreement=first_disagreement(ours, stored_dtypes, clip_state) if compare else None,
        )
        if choice.source is None:
            raise CheckpointError(choice.message)
        print(choice.message)
        if choice.source == "clip":
            model.model.vision_tower.load_state_dict(clip_state)
            filled |= tower_params
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = sorted(set(params) - filled - tied)
    if missing:
        original = next((o + missing[0][len(n) :] for o, n in reversed(_RENAMES) if missing[0].startswith(n)), "")
        raise CheckpointError(
            f"{checkpoint}: missing key `{original or missing[0]}` (for `{missing[0]}`; "
            f"{len(missing)} parameters missing in all)"
        )
    return model.eval()


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's `expand2square`: the image centred on a square canvas of `fill` (offset rounded down)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


@dataclass(frozen=True)
class PadPreprocess:
    """images -> pixel_values_bcyx as LLaVA-MORE prepares them (`image_aspect_ratio: pad` + CLIP processing)."""

    size: int
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    @classmethod
    def from_clip(cls, clip_dir: str | Path, image_size: int) -> PadPreprocess:
        cfg_path = Path(clip_dir) / "preprocessor_config.json"
        if not cfg_path.exists():
            return cls(image_size)
        cfg = read_json(cfg_path)
        crop = cfg.get("crop_size", image_size)
        crop = crop.get("height", image_size) if isinstance(crop, dict) else crop
        if crop != image_size:
            raise CheckpointError(f"{cfg_path}: crop size {crop} differs from the tower's image_size {image_size}")
        mean, std = tuple(cfg.get("image_mean", OPENAI_CLIP_MEAN)), tuple(cfg.get("image_std", OPENAI_CLIP_STD))
        return cls(image_size, mean, std)

    def one(self, image: Any) -> np.ndarray:
        img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
        img = expand_to_square(img.convert("RGB"), tuple(int(m * 255) for m in self.image_mean))
        w, h = img.size
        # CLIP: shortest edge to `size` (bicubic), then a centred `size` x `size` crop.
        short, long = min(w, h), max(w, h)
        new_long = int(self.size * long / short)
        new_w, new_h = (self.size, new_long) if w <= h else (new_long, self.size)
        img = img.resize((new_w, new_h), Image.BICUBIC)
        top, left = (new_h - self.size) // 2, (new_w - self.size) // 2
        img = img.crop((left, top, left + self.size, top + self.size))
        x_yxc = np.asarray(img, dtype=np.float32) / 255.0
        x_yxc = (x_yxc - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return x_yxc.transpose(2, 0, 1)

    def __call__(self, images: Sequence[Any]) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.one(im) for im in images]))


def llava_more_prompt(tokenizer, question: str, *, add_generation_prompt: bool = False) -> str:
    """LLaVA-MORE's `llama_3_1` prompt for `<image>\\n{question}` (module docstring)."""
    messages = [{"role": "system", "content": LLAVA_MORE_SYSTEM}, {"role": "user", "content": f"<image>\n{question}"}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def text_stream_prompt(tokenizer, caption: str, question: str) -> str:
    """The text-only reference prompt: `Caption: {caption}\\nInstruction: {question}` as the user turn of the
    Llama-3.1-Instruct chat template, ending with the assistant header (the authors' `apply_chat_template` call)."""
    messages = [{"role": "user", "content": f"Caption: {caption}\nInstruction: {question}"}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def image_token_id_of(tokenizer, token: str = IMAGE_TOKEN) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(token_id) != token:
        raise CheckpointError(f"the tokenizer has no token {token!r} to stand for image patches")
    return int(token_id)


def paper_vlm_parts(
    vlm: str | Path = LLAVA_MORE_ID,
    llm: str | Path | None = LLM_ID,
    clip: str | Path | None = None,
    *,
    device=None,
    dtype=None,
    add_generation_prompt: bool = False,
) -> dict:
    """The parts of the paper's VLM bundle (the fields of lib.kernels.adapter.VLM, which a step assembles: sources
    come before kernels): converted LLaVA-MORE, its tokenizer, pad preprocessing and prompt, and (unless `llm=None`)
    Llama-3.1-8B-Instruct with its tokenizer and the text-only prompt. bf16 on GPU, fp32 on CPU."""
    from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

    device, dtype = _default_device_dtype(device, dtype)
    checkpoint = local_dir(vlm, "LLaVA-MORE checkpoint")
    # Not AutoTokenizer: it reads config.json first, and transformers has no `llava_llama` model type.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(checkpoint)
    model = convert_llava_more(
        checkpoint, clip, image_token_id=image_token_id_of(tokenizer), device=device, dtype=dtype
    )
    clip_dir = local_dir(
        clip if clip is not None else read_json(checkpoint / "config.json")["mm_vision_tower"], "CLIP vision tower"
    )
    bundle = dict(
        model=model,
        tokenizer=tokenizer,
        preprocess=PadPreprocess.from_clip(clip_dir, model.config.vision_config.image_size),
        prompt=partial(llava_more_prompt, tokenizer, add_generation_prompt=add_generation_prompt),
        image_placeholder="<image>",
        add_special_tokens=False,  # the chat template writes BOS
    )
    if llm is not None:
        llm_dir = local_dir(llm, "Llama-3.1-8B-Instruct")
        lm_tokenizer = AutoTokenizer.from_pretrained(llm_dir)
        base_lm = LlamaForCausalLM.from_pretrained(llm_dir, dtype=dtype).to(device)
        bundle.update(
            base_lm=base_lm,
            lm_tokenizer=lm_tokenizer,
            lm_prompt=partial(text_stream_prompt, lm_tokenizer),
            lm_add_special_tokens=False,
        )
    return bundle


# ---------------------------------------------------------------------------------------------------------------
# Base SAEs: Llama Scope rebuilt as TopK


def jumprelu_to_topk(sae, k: int):
    """A SAELens `TopKSAE` with `sae`'s W_enc, b_enc, W_dec, b_dec (copies) and config, keeping the top `k`
    pre-activations instead of thresholding (the authors' rebuild of Llama Scope; the threshold is dropped)."""
    from sae_lens import TopKSAE, TopKSAEConfig

    arch = sae.cfg.architecture()
    if arch != "jumprelu":
        raise ValueError(f"jumprelu_to_topk expects a JumpReLU SAE, got architecture {arch!r}")
    if not 0 < k <= sae.cfg.d_sae:
        raise ValueError(f"k = {k}: expected 1 <= k <= d_sae = {sae.cfg.d_sae}")
    cfg = TopKSAEConfig.from_dict({**sae.cfg.to_dict(), "architecture": "topk", "k": int(k)})
    topk = TopKSAE(cfg)
    state = sae.state_dict()
    topk.load_state_dict({name: state[name].detach().clone() for name in ("W_enc", "b_enc", "W_dec", "b_dec")})
    return topk


def load_llama_scope_topk(
    layer: int,
    k: int = 50,
    device: str = "cpu",
    release: str | Path = LLAMA_SCOPE_RELEASE,
    sae_id: str = "l{layer}r_8x",
    dtype: str = "float32",
):
    """Llama Scope's residual SAE for `layer` (SAELens release `llama_scope_lxr_8x`, id `l{layer}r_8x`; SAELens
    folds the dataset norm scaling into the weights) rebuilt as a TopK SAE with `k` active features. `release` may
    also be a local directory holding one folder per `sae_id` in SAELens' on-disk format (a copy made offline)."""
    from sae_lens import SAE

    sid = sae_id.format(layer=layer)
    if Path(release).is_dir():
        sae = SAE.load_from_disk(Path(release) / sid, device=device, dtype=dtype)
    else:
        sae = SAE.from_pretrained(str(release), sid, device=device, dtype=dtype)
    return jumprelu_to_topk(sae, k)
