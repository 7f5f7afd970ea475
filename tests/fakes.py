"""Tiny stand-ins for the real models and data, built by the tests themselves (no hub, no network).

- `world_vlm`: an organism-shaped LLaVA (48 x 48 images, 8 px patches, 36 image tokens, the world's word-level
  tokenizer from lib/sources/tokenizer.py, prompts from lib/sources/world.py) plus a base LM for the text-only stream.
- `write_llava_more`: a checkpoint in the original LLaVA layout with LLaVA-MORE's key names and config fields, sharded
  with an index, with or without the vision tower's weights, next to a CLIP directory laid out like
  `openai/clip-vit-large-patch14-336` (a full CLIPModel and its preprocessor_config.json).
- `write_llama`: a tiny Llama-3.1-Instruct-shaped checkpoint with a chat template.
- `write_jumprelu_sae`: a JumpReLU SAE in SAELens' on-disk format.
- `write_vqav2`, `write_vsr`, `write_coco_captions`: tiny datasets with the hub's column names and types.

Weights are random with a large init range, so that every component visibly moves the output (a converter that
dropped one would change the logits).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

INIT = 0.2  # initializer_range: large enough that every layer matters in the tiny models

# ---------------------------------------------------------------------------------------------------------------
# The organism's shape


def world_vlm(seed: int = 0, n_layers: int = 3, with_base_lm: bool = True):
    """A random LLaVA the way the organism is built (lib.sources.world prompts, lib.sources.tokenizer vocabulary)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

    from lib.kernels.adapter import VLM
    from lib.sources import world
    from lib.sources.tokenizer import IMAGE, build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(seed)
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
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
        image_size=48,
        patch_size=8,
        initializer_range=INIT,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids(IMAGE),
        image_seq_length=36,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(config).eval()
    base_lm = LlamaForCausalLM(text).eval() if with_base_lm else None

    def preprocess(images):
        x_byxc = torch.as_tensor(np.stack([np.asarray(im) for im in images]), dtype=torch.float32)
        return (x_byxc / 255.0 - 0.5).permute(0, 3, 1, 2) / 0.25

    return VLM(
        model=model,
        tokenizer=tok,
        preprocess=preprocess,
        prompt=lambda q: "<bos> " + world.vlm_prompt(q),
        image_placeholder=IMAGE,
        base_lm=base_lm,
        lm_prompt=lambda c, q: "<bos> " + world.lm_prompt(c, q),
    )


# ---------------------------------------------------------------------------------------------------------------
# A Llama-3-like tokenizer

LLAMA3_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)
# The shape of Llama-3.1's template (header, trimmed content, eot), without its date lines.
LLAMA31_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
_CORPUS = [
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language.",
    "What is to the left of the dog? Is the cat on top of the laptop? How many people are there?",
    "Caption: A man riding a horse next to a red bus.\nInstruction: What color is the bus?",
    "Is the following statement correct? Answer only with 'Yes' or 'No'.\nStatement: The cat is under the table.\n"
    "Answer: Yes No",
]


def llama3_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer with Llama-3's special tokens, BOS added on encode, and a Llama-3.1-style chat
    template (the real one is a 9 MB download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(LLAMA3_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_CORPUS, trainer)
    bos = LLAMA3_SPECIALS[0]
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, core.token_to_id(bos))]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token="<|eot_id|>")
    tok.chat_template = LLAMA31_TEMPLATE
    return tok


def _text_config_dict(vocab_size: int, tok) -> dict:
    """Llama fields as transformers 4.43 wrote them in LLaVA-MORE's config.json (rope_theta + llama3 rope_scaling)."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 1024,
        "initializer_range": INIT,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        # A short original context, so the llama3 frequency rescaling changes some of the tiny model's frequencies.
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_type": "llama3",
        },
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": False,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": [tok.eos_token_id],
    }


# ---------------------------------------------------------------------------------------------------------------
# LLaVA-MORE in the original layout


class FakeLlavaMore(NamedTuple):
    path: Path
    clip_path: Path
    text_config: dict  # Llama fields of config.json
    with_tower: bool
    n_image_tokens: int


def write_safetensors_sharded(state: dict[str, torch.Tensor], directory: Path, n_shards: int = 2) -> None:
    """`model-0000i-of-0000n.safetensors` files and the `model.safetensors.index.json` that maps keys to them."""
    from safetensors.torch import save_file

    keys = list(state)
    weight_map = {}
    for i, chunk in enumerate(np.array_split(np.arange(len(keys)), n_shards)):
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(
            {keys[j]: state[keys[j]].contiguous().clone() for j in chunk},
            str(directory / name),
            metadata={"format": "pt"},
        )
        weight_map.update({keys[j]: name for j in chunk})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )


def write_clip(directory: Path, seed: int = 1, image_size: int = 28, patch_size: int = 7) -> Path:
    """A full CLIPModel (text and vision towers) like the hub's `openai/clip-vit-large-patch14-336`."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=64,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch_size,
            initializer_range=INIT,
        ),
        projection_dim=8,
    )
    CLIPModel(cfg).save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "crop_size": {"height": image_size, "width": image_size},
                "do_center_crop": True,
                "do_normalize": True,
                "do_resize": True,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "resample": 3,
                "size": {"shortest_edge": image_size},
            }
        )
    )
    return directory


def write_llava_more(
    directory: Path, with_tower: bool, seed: int = 0, tower_noise: float = 0.0, config: dict | None = None
) -> FakeLlavaMore:
    """A tiny LLaVA-MORE in the original LLaVA layout. With `with_tower`, the checkpoint carries a copy of the CLIP
    directory's vision tower, as a checkpoint saved with its frozen tower does; `tower_noise` > 0 makes the copy
    differ from the CLIP directory's, so a test can tell which of the two the converter used. `config` overrides
    fields of config.json."""
    from transformers import CLIPModel, LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    clip_path = write_clip(directory / "clip")
    ckpt = directory / "llava_more"
    ckpt.mkdir(parents=True, exist_ok=True)
    tok = llama3_tokenizer()
    tok.save_pretrained(ckpt)
    text = _text_config_dict(len(tok), tok)
    torch.manual_seed(seed)
    llama = LlamaForCausalLM(LlamaConfig(**text))
    state = dict(llama.state_dict())  # model.embed_tokens / model.layers / model.norm / lm_head: the original names
    clip = CLIPModel.from_pretrained(clip_path)
    d_vision, d_model = clip.config.vision_config.hidden_size, text["hidden_size"]
    projector = torch.nn.Sequential(
        torch.nn.Linear(d_vision, d_model), torch.nn.GELU(), torch.nn.Linear(d_model, d_model)
    )
    for p in projector.parameters():
        torch.nn.init.normal_(p, std=0.3)
    state.update({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()})
    if with_tower:
        for k, v in clip.state_dict().items():
            if k.startswith("vision_model."):  # original LLaVA: CLIPVisionTower wraps CLIPVisionModel
                noise = tower_noise * torch.randn_like(v.float()).to(v.dtype)
                state[f"model.vision_tower.vision_tower.{k}"] = v + noise
    write_safetensors_sharded(state, ckpt)
    config = {
        "_name_or_path": "LLaVA_MORE-llama_3_1-8B-finetuning",
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        **text,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_hidden_size": d_vision,
        "mm_patch_merge_type": "flat",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "image_aspect_ratio": "pad",
        "freeze_mm_mlp_adapter": False,
        "tune_mm_mlp_adapter": False,
        "tokenizer_model_max_length": 4096,
        "tokenizer_padding_side": "right",
        "torch_dtype": "float32",
        "transformers_version": "4.43.1",
        "use_cache": True,
        **(config or {}),
    }
    (ckpt / "config.json").write_text(json.dumps(config, indent=1))
    vision = clip.config.vision_config
    return FakeLlavaMore(ckpt, clip_path, text, with_tower, (vision.image_size // vision.patch_size) ** 2)


def write_llama(directory: Path, seed: int = 2) -> Path:
    """A tiny Llama-3.1-Instruct stand-in (HF layout, chat template in its tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    tok = llama3_tokenizer()
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**_text_config_dict(len(tok), tok))).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


# ---------------------------------------------------------------------------------------------------------------
# SAEs


def write_jumprelu_sae(
    directory: Path,
    d_in: int = 32,
    d_sae: int = 128,
    seed: int = 3,
    apply_b_dec_to_input: bool = True,
    layer: int = 1,
) -> Path:
    """A random JumpReLU SAE saved with SAELens' `save_model` (cfg.json + sae_weights.safetensors)."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    from lib.names import resid_name

    torch.manual_seed(seed)
    cfg = JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=apply_b_dec_to_input)
    cfg.metadata.hook_name = resid_name(layer)
    cfg.metadata.model_name = "tiny-llama"
    sae = JumpReLUSAE(cfg)
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            getattr(sae, name).normal_(std=0.3)
        sae.threshold.fill_(0.2)
    sae.save_model(directory)
    return Path(directory)


def write_llama_scope(directory: Path, n_layers: int, d_in: int, d_sae: int = 128) -> Path:
    """A local stand-in for the `llama_scope_lxr_8x` release: one folder per sae_id `l{L}r_8x` in SAELens' format,
    JumpReLU, b_dec not applied to the input (as Llama Scope's are)."""
    for layer in range(n_layers):
        write_jumprelu_sae(Path(directory) / f"l{layer}r_8x", d_in, d_sae, 10 + layer, False, layer)
    return Path(directory)


# ---------------------------------------------------------------------------------------------------------------
# Datasets with the hub's column names


def _images(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(40, 30), (30, 40), (32, 32)]
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % 3][::-1], 3), dtype=np.uint8)) for i in range(n)]


def vqav2_dataset(n: int = 12, seed: int = 4, drop: str | None = None):
    """Rows shaped like `lmms-lab/VQAv2` validation (same names and feature types)."""
    from datasets import Dataset, Features, List, Value
    from datasets import Image as ImageFeature

    questions = [
        "What is left of the dog?",
        "What color is the bus?",
        "Is the cat above the table?",
        "How many people are there?",
    ]
    features = Features(
        {
            "question_type": Value("string"),
            "multiple_choice_answer": Value("string"),
            "answers": List(
                {"answer": Value("string"), "answer_confidence": Value("string"), "answer_id": Value("int64")}
            ),
            "image_id": Value("int64"),
            "answer_type": Value("string"),
            "question_id": Value("int64"),
            "question": Value("string"),
            "image": ImageFeature(),
        }
    )
    rows = {
        "question_type": ["what is"] * n,
        "multiple_choice_answer": ["yes"] * n,
        "answers": [[{"answer": "yes", "answer_confidence": "yes", "answer_id": 1}]] * n,
        "image_id": [100 + i // 2 for i in range(n)],
        "answer_type": ["other"] * n,
        "question_id": [1000 + i for i in range(n)],
        "question": [questions[i % 4] for i in range(n)],
        "image": _images(n, seed),
    }
    if drop is not None:
        rows.pop(drop)
        del features[drop]
    return Dataset.from_dict(rows, features=features)


def write_vqav2(directory: Path, n: int = 12, fmt: str = "parquet", drop: str | None = None) -> Path:
    """`fmt="parquet"`: the hub's layout (`data/validation-00000-of-00001.parquet`); `fmt="disk"`: save_to_disk."""
    ds = vqav2_dataset(n, drop=drop)
    directory = Path(directory)
    if fmt == "disk":
        ds.save_to_disk(str(directory))
    else:
        (directory / "data").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(directory / "data" / "validation-00000-of-00001.parquet"))
    return directory


def write_vsr(directory: Path, image_root: Path, n: int = 6, drop: str | None = None) -> Path:
    """`cambridgeltl/vsr_random`'s layout: {train,dev,test}.jsonl whose `image` is a COCO file name, plus the
    COCO images under `image_root/train2017/`."""
    directory, image_root = Path(directory), Path(image_root)
    directory.mkdir(parents=True, exist_ok=True)
    (image_root / "train2017").mkdir(parents=True, exist_ok=True)
    relations = ["left of", "above", "on top of"]
    for split in ("train", "dev", "test"):
        lines = []
        for i, img in enumerate(_images(n, seed={"train": 0, "dev": 1, "test": 2}[split])):
            name = f"{split}{i:09d}.jpg"
            img.save(image_root / "train2017" / name)
            row = {
                "image": name,
                "image_link": f"http://images.cocodataset.org/train2017/{name}",
                "caption": f"The cat is {relations[i % 3]} the dog.",
                "label": i % 2,
                "relation": relations[i % 3],
                "annotator_id": 1,
                "vote_true_validator_id": "[2]",
                "vote_false_validator_id": "[]",
            }
            if drop is not None:
                row.pop(drop)
            lines.append(json.dumps(row))
        (directory / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return directory


def write_coco_captions(path: Path, image_ids: list[int]) -> Path:
    """A COCO captions annotation file (`captions_val2014.json` format), two captions per image."""
    anns = [
        {"id": 2 * k + j, "image_id": int(i), "caption": f"caption {j} of image {i}. "}
        for k, i in enumerate(image_ids)
        for j in range(2)
    ]
    images = [{"id": int(i), "file_name": f"COCO_val2014_{int(i):012d}.jpg"} for i in image_ids]
    Path(path).write_text(json.dumps({"images": images, "annotations": anns}))
    return Path(path)


# ---------------------------------------------------------------------------------------------------------------
# Profiles


def toml_text(sections: dict) -> str:
    """A profile file's text from {key: value or {field: value}} (the subset of TOML profiles use)."""

    def value(v):
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines = []
    for key, v in sections.items():
        if not isinstance(v, dict):
            lines.append(f"{key} = {value(v)}")
    for key, v in sections.items():
        if isinstance(v, dict):
            lines.append(f"[{key}]")
            lines += [f"{k} = {value(x)}" for k, x in v.items()]
    return "\n".join(lines) + "\n"
