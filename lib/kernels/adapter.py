"""One adapter between the book and a Hugging Face VLM: the organism, the paper's LLaVA-MORE, any HF LLaVA and
Qwen2-VL alike.

Every later chapter reads a vision-language model through this module and nothing else. It speaks TransformerLens'
names over a plain `transformers.LlavaForConditionalGeneration` or `Qwen2VLForConditionalGeneration` (where each
keeps its decoder, image encoder and projector: lib/kernels/architectures.py), using forward hooks instead of a
converted copy of the model:

- `blocks.{L}.hook_resid_post`: the residual stream after decoder block L (before the final norm, which is what the
  Llama Scope SAEs read). For L < n_layers - 1 this is HF's `hidden_states[L + 1]`; HF's last hidden state is taken
  after the final RMSNorm, so for the last block `hidden_states[-1] == norm(resid_post)` instead.
- `blocks.{L}.attn.hook_z`: the per-head input of the attention output projection `o_proj`, batch x pos x head x
  d_head, with gradients on request (attribution patching) and replaceable per head (activation patching, ablation).

Interventions are context managers that install hooks for the duration of a `with` block, so they compose:
`patch_heads`, `project_out` (a direction removed from the residual stream) and `replace_image_embeddings` (the
corrupted run of the attribution step: every image embedding replaced by one vector).

Padding is on the right with an attention mask, so a sequence's real tokens keep positions 0..len-1 and never see
padding (it comes after them under the causal mask). Qwen2-VL's images each become their own number of tokens (from
their size), and its M-RoPE positions are computed once per batch by the model's own `get_rope_index`; every forward
of the batch then passes the same position ids, whatever the class. BOS is not removed from the forward pass: the
model needs it. It is exposed as `Batch.bos_bs`, and `Batch.keep_bs` (real, non-BOS tokens) is the mask downstream
statistics use.

Shape key (suffixes of tensor names):
    b  sequences in a batch        s  token positions (padded)      d  residual width (d_model)
    h  attention heads             k  head width (d_head)           n  image tokens (of one image, or of all)
    v  vocabulary
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lib.kernels import architectures as arch
from lib.kernels.architectures import Pixels, as_pixels, decoder
from lib.names import resid_name, z_name


@dataclass
class VLM:
    """A VLM (LLaVA or Qwen2-VL) and everything needed to feed it: the bundle every chapter passes around.

    `preprocess(images)` returns the model's pixel input: a tensor (LLaVA) or a (pixel_values, image_grid_thw) pair
    (Qwen2-VL). `prompt(question)` must return text holding `image_placeholder` exactly once; the adapter replaces
    it by the tokenizer's string for `image_token_id` and expands that single token to one copy per image token
    (`n_image_tokens` for LLaVA; each image's own count for Qwen2-VL, where `n_image_tokens` stays None), as the HF
    processor does. `add_special_tokens` is handed to the tokenizer: set it False when the prompt text already
    starts with BOS (a chat template does), otherwise BOS appears twice.
    The text-only reference stream runs `base_lm` (a causal LM, e.g. `LlamaForCausalLM`) on
    `lm_prompt(caption, question)`, tokenized by `lm_tokenizer` (default: `tokenizer`).
    """

    model: nn.Module
    tokenizer: Any
    preprocess: Callable[[Sequence[Any]], Any]  # images -> pixel_values, or (pixel_values, image_grid_thw)
    prompt: Callable[[str], str]
    image_placeholder: str = "<image>"
    image_token_id: int | None = None  # default: model.config.image_token_id
    n_image_tokens: int | None = None  # LLaVA: from the vision config; Qwen2-VL: None (one count per image)
    add_special_tokens: bool = True
    base_lm: nn.Module | None = None
    lm_tokenizer: Any = None
    lm_prompt: Callable[[str, str], str] | None = None
    lm_add_special_tokens: bool = True

    def __post_init__(self):
        config = self.model.config
        self.kind = arch.kind(self.model)
        if self.image_token_id is None:
            self.image_token_id = int(config.image_token_id)
        if self.n_image_tokens is None and self.kind == arch.LLAVA:
            vision = config.vision_config
            side = vision.image_size // vision.patch_size
            self.n_image_tokens = side * side + (1 if config.vision_feature_select_strategy == "full" else 0)
        if self.lm_tokenizer is None:
            self.lm_tokenizer = self.tokenizer
        # Analysis never trains the model: dropout off (a later .train() by the caller is not prevented).
        self.model.eval()
        if self.base_lm is not None:
            self.base_lm.eval()

    @property
    def text_config(self):
        return self.model.config.text_config

    @property
    def n_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def n_heads(self) -> int:
        return self.text_config.num_attention_heads

    @property
    def d_head(self) -> int:
        return getattr(self.text_config, "head_dim", None) or self.text_config.hidden_size // self.n_heads

    @property
    def d_model(self) -> int:
        return self.text_config.hidden_size


class Batch(NamedTuple):
    """A right-padded batch and its position masks (all bool masks are False on padding)."""

    input_ids_bs: Tensor
    attention_mask_bs: Tensor  # real tokens (BOS included)
    position_ids: Tensor  # (b, s); (3, b, s) under Qwen2-VL's M-RoPE (temporal, row, column)
    image_mask_bs: Tensor  # image-token positions
    post_image_bs: Tensor  # text tokens after the last image token; all False in a text-only batch
    bos_bs: Tensor  # the leading BOS, where the tokenizer put one
    lengths_b: Tensor
    pixels: Pixels | None  # None: a text-only batch, run through the base LM
    image_grid_b2: Tensor | None = None  # per sequence, the (rows, columns) its image tokens cover (CLS not counted)

    @property
    def keep_bs(self) -> Tensor:
        """The positions statistics and SAEs use: real tokens without BOS."""
        return self.attention_mask_bs & ~self.bos_bs

    @property
    def text_bs(self) -> Tensor:
        """Non-image tokens, BOS excluded."""
        return self.keep_bs & ~self.image_mask_bs

    def to(self, device) -> Batch:
        return Batch(*(t.to(device) if isinstance(t, (Tensor, Pixels)) else t for t in self))


# ---------------------------------------------------------------------------------------------------------------
# Tokenization and batching


def _pad_id(tokenizer) -> int:
    for pad in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if pad is not None:
            return int(pad if isinstance(pad, int) else pad[0])
    return 0


def _collate(rows: list[list[int]], tokenizer, image_token_id: int | None, pixels: Pixels | None) -> Batch:
    lengths_b = torch.tensor([len(r) for r in rows])
    n_b, n_s = len(rows), int(lengths_b.max())
    input_ids_bs = torch.full((n_b, n_s), _pad_id(tokenizer), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids_bs[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    pos_s = torch.arange(n_s)
    attention_mask_bs = pos_s[None, :] < lengths_b[:, None]
    # Right padding: a sequence's real tokens sit at 0..len-1 whatever the batch, which is what HF assumes when it
    # is given no position ids; padding positions only ever attend to earlier real tokens and are never read.
    position_ids_bs = pos_s.expand(n_b, n_s).clone()
    if image_token_id is None:
        image_mask_bs = torch.zeros_like(attention_mask_bs)
    else:
        image_mask_bs = (input_ids_bs == image_token_id) & attention_mask_bs
    has_image_b = image_mask_bs.any(1)
    last_image_b = torch.where(has_image_b, (image_mask_bs * pos_s).amax(1), n_s)
    post_image_bs = attention_mask_bs & (pos_s[None, :] > last_image_b[:, None])
    bos_bs = torch.zeros_like(attention_mask_bs)
    if tokenizer.bos_token_id is not None:
        bos_bs[:, 0] = input_ids_bs[:, 0] == tokenizer.bos_token_id
    return Batch(
        input_ids_bs, attention_mask_bs, position_ids_bs, image_mask_bs, post_image_bs, bos_bs, lengths_b, pixels
    )


def encode_vlm_prompt(vlm: VLM, text: str, n_tokens: int | None = None) -> list[int]:
    """Token ids of one VLM prompt, with its single image placeholder expanded to `n_tokens` image ids (default
    `vlm.n_image_tokens`)."""
    if text.count(vlm.image_placeholder) != 1:
        raise ValueError(
            f"a VLM prompt must hold the image placeholder {vlm.image_placeholder!r} exactly once; "
            f"got {text.count(vlm.image_placeholder)} in {text!r}"
        )
    token = vlm.tokenizer.convert_ids_to_tokens(vlm.image_token_id)
    ids = vlm.tokenizer(text.replace(vlm.image_placeholder, token), add_special_tokens=vlm.add_special_tokens)
    ids = list(ids["input_ids"])
    where = [i for i, t in enumerate(ids) if t == vlm.image_token_id]
    if len(where) != 1:
        raise ValueError(
            f"the tokenizer turned the image token {token!r} (id {vlm.image_token_id}) into "
            f"{len(where)} image ids; it must be a single token of the vocabulary"
        )
    i = where[0]
    n_tokens = vlm.n_image_tokens if n_tokens is None else n_tokens
    assert n_tokens is not None, "this model's image-token count depends on the image: pass n_tokens"
    return ids[:i] + [vlm.image_token_id] * n_tokens + ids[i + 1 :]


def prepare(vlm: VLM, images: Sequence[Any], questions: Sequence[str], device=None) -> Batch:
    """A VLM batch: each image through `vlm.preprocess`, each question through `vlm.prompt` with as many image
    tokens as its image becomes."""
    assert len(images) == len(questions), f"{len(images)} images for {len(questions)} questions"
    pixels = as_pixels(vlm.preprocess(list(images)))
    n_b, grid_b2 = arch.image_token_grids(vlm.model, pixels)
    assert len(n_b) == len(questions), f"preprocess returned {len(n_b)} images for {len(questions)} inputs"
    rows = [encode_vlm_prompt(vlm, vlm.prompt(q), n) for q, n in zip(questions, n_b, strict=True)]
    batch = _collate(rows, vlm.tokenizer, vlm.image_token_id, pixels)
    rope = arch.rope_positions(vlm.model, batch.input_ids_bs, batch.image_mask_bs, batch.attention_mask_bs, pixels)
    batch = batch._replace(image_grid_b2=grid_b2, position_ids=batch.position_ids if rope is None else rope)
    return batch.to(_device(vlm.model) if device is None else device)


def prepare_text(vlm: VLM, captions: Sequence[str], questions: Sequence[str], device=None) -> Batch:
    """A text-only batch for the reference stream: `vlm.lm_prompt(caption, question)` for the base LM."""
    assert vlm.lm_prompt is not None, "VLM.lm_prompt is not set; the text-only stream needs it"
    assert len(captions) == len(questions), f"{len(captions)} captions for {len(questions)} questions"
    rows = [
        list(vlm.lm_tokenizer(vlm.lm_prompt(c, q), add_special_tokens=vlm.lm_add_special_tokens)["input_ids"])
        for c, q in zip(captions, questions, strict=True)
    ]
    model = vlm.base_lm if vlm.base_lm is not None else vlm.model
    return _collate(rows, vlm.lm_tokenizer, None, None).to(_device(model) if device is None else device)


def iter_batches(
    vlm: VLM, images: Sequence[Any], questions: Sequence[str], batch_size: int, device=None
) -> Iterator[Batch]:
    """Batches of `batch_size` in order, prepared lazily (images may be a lazy sequence such as a dataset column)."""
    for start in range(0, len(questions), batch_size):
        stop = min(start + batch_size, len(questions))
        yield prepare(vlm, [images[i] for i in range(start, stop)], list(questions[start:stop]), device)


# ---------------------------------------------------------------------------------------------------------------
# Module lookup


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _hf(model_or_vlm) -> nn.Module:
    return model_or_vlm.model if isinstance(model_or_vlm, VLM) else model_or_vlm


def _model_for(vlm: VLM, batch: Batch) -> nn.Module:
    if batch.pixels is not None:
        return vlm.model
    if vlm.base_lm is None:
        raise ValueError("a text-only batch runs through VLM.base_lm, which is not set")
    return vlm.base_lm


def _forward_trunk(model: nn.Module, batch: Batch):
    """Run the model up to its final norm (no vocabulary projection: 128k logits per token are never needed)."""
    kwargs = dict(
        input_ids=batch.input_ids_bs,
        attention_mask=batch.attention_mask_bs.long(),
        position_ids=batch.position_ids,
        use_cache=False,
    )
    if batch.pixels is not None:
        kwargs.update(arch.forward_kwargs(model, batch.pixels))
    return model.model(**kwargs)


class _Stop(Exception):
    """Raised by a hook once the last layer a caller needs has run: later layers are skipped."""


# ---------------------------------------------------------------------------------------------------------------
# Reading activations


class Capture(NamedTuple):
    resid: dict[str, Tensor]  # resid_name(L) -> x_bsd
    z: dict[str, Tensor]  # z_name(L) -> z_bshk


def capture(
    vlm: VLM,
    batch: Batch,
    resid_layers: Sequence[int] = (),
    z_layers: Sequence[int] = (),
    *,
    on_resid: Callable[[str, Tensor], None] | None = None,
    grad: bool = False,
) -> Capture:
    """One forward pass that records the residual stream and/or hook_z at the given layers, and stops after the
    deepest one. With `on_resid`, each residual is handed to the callback as soon as its block has run and is not
    kept, so a caller can stream 32 layers x 4096 dims without holding them together.

    With `grad=True` the recorded tensors stay in the autograd graph: compute a metric from `resid` and call
    `torch.autograd.grad(metric, list(z.values()))` for the gradients attribution patching needs. Gradients flow
    through every later layer; upstream of the first hooked layer nothing needs a graph, so that hook_z is made a
    leaf there (the model's own weights are never differentiated).
    """
    resid_layers, z_layers = [int(x) for x in resid_layers], [int(x) for x in z_layers]
    assert resid_layers or z_layers, "nothing to capture: give resid_layers and/or z_layers"
    model = _model_for(vlm, batch)
    layers = decoder(model).layers
    bad = [x for x in resid_layers + z_layers if not 0 <= x < len(layers)]
    assert not bad, f"layers {bad} out of range for a model with {len(layers)} layers"
    n_heads = model.config.get_text_config().num_attention_heads
    last = max(resid_layers + z_layers)
    resid: dict[str, Tensor] = {}
    z: dict[str, Tensor] = {}

    def resid_hook(layer: int):
        def hook(_module, _args, output):
            x_bsd = output[0] if isinstance(output, tuple) else output
            if layer in resid_layers:
                if on_resid is not None:
                    on_resid(resid_name(layer), x_bsd if grad else x_bsd.detach())
                else:
                    resid[resid_name(layer)] = x_bsd
            if layer == last:
                raise _Stop

        return hook

    def z_hook(layer: int):
        def pre_hook(_module, args):
            x_bsf = args[0]
            if grad and not x_bsf.requires_grad:
                x_bsf = x_bsf.detach().requires_grad_(True)
            z_bshk = x_bsf.unflatten(-1, (n_heads, x_bsf.shape[-1] // n_heads))
            z[z_name(layer)] = z_bshk
            # Hand the module the tensor derived from z, so the graph runs through the recorded tensor.
            return (z_bshk.flatten(-2), *args[1:])

        return pre_hook

    handles = []
    try:
        for layer in sorted(set(z_layers)):
            handles.append(layers[layer].self_attn.o_proj.register_forward_pre_hook(z_hook(layer)))
        for layer in sorted(set(resid_layers) | {last}):
            handles.append(layers[layer].register_forward_hook(resid_hook(layer)))
        with torch.set_grad_enabled(grad):
            try:
                _forward_trunk(model, batch)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return Capture(resid, z)


def resid_stream(
    vlm: VLM, batch: Batch, layers: Sequence[int] | None = None, on_layer: Callable[[str, Tensor], None] | None = None
) -> dict[str, Tensor]:
    """`blocks.{L}.hook_resid_post` for `layers` (default all), without gradients. With `on_layer(name, x_bsd)`
    nothing is kept and an empty dict is returned (streaming)."""
    layers = range(len(decoder(_model_for(vlm, batch)).layers)) if layers is None else layers
    return capture(vlm, batch, resid_layers=layers, on_resid=on_layer).resid


@torch.no_grad()
def next_token_logits(vlm: VLM, batch: Batch) -> Tensor:
    """logits_bv of the token after each sequence's last real token (yes/no benchmarks)."""
    model = _model_for(vlm, batch)
    h_bsd = _forward_trunk(model, batch).last_hidden_state
    last_b = batch.lengths_b.to(h_bsd.device) - 1
    h_bd = h_bsd[torch.arange(h_bsd.shape[0], device=h_bsd.device), last_b]
    return model.lm_head(h_bd).float()


def image_embeddings(vlm: VLM, pixels) -> Tensor:
    """e_nd: the projected image tokens the language model receives (image encoder -> projector), every image's
    tokens concatenated in order; `pixels` as `vlm.preprocess` returns them."""
    return arch.image_features(vlm.model, as_pixels(pixels))


# ---------------------------------------------------------------------------------------------------------------
# Interventions (context managers; they compose and undo themselves)


@dataclass(frozen=True)
class HeadPatch:
    """Replace head `head`'s hook_z at `layer` by `value` (broadcastable to z_bsk): `torch.zeros(d_head)`
    zero-ablates, a mean z (d_head,) mean-ablates, a z_bsk from another run patches. `positions_bs` limits the
    replacement to some positions (default: all)."""

    layer: int
    head: int
    value: Tensor
    positions_bs: Tensor | None = None


@contextmanager
def patch_heads(model_or_vlm, patches: Sequence[HeadPatch]):
    """Install `patches` as forward pre-hooks on the o_proj of their layers for the duration of the block."""
    model = _hf(model_or_vlm)
    layers = decoder(model).layers
    n_heads = model.config.get_text_config().num_attention_heads
    by_layer: dict[int, list[HeadPatch]] = {}
    for p in patches:
        assert 0 <= p.layer < len(layers) and 0 <= p.head < n_heads, f"no head L{p.layer}H{p.head} in this model"
        by_layer.setdefault(p.layer, []).append(p)

    def make_hook(layer_patches: list[HeadPatch]):
        def pre_hook(_module, args):
            z_bshk = args[0].unflatten(-1, (n_heads, args[0].shape[-1] // n_heads)).clone()
            for p in layer_patches:
                value = p.value.to(z_bshk.device, z_bshk.dtype).expand_as(z_bshk[:, :, p.head])
                if p.positions_bs is not None:
                    value = torch.where(p.positions_bs.to(z_bshk.device)[..., None], value, z_bshk[:, :, p.head])
                z_bshk[:, :, p.head] = value
            return (z_bshk.flatten(-2), *args[1:])

        return pre_hook

    o_projs = {layer: layers[layer].self_attn.o_proj for layer in by_layer}
    handles = [o_projs[layer].register_forward_pre_hook(make_hook(ps)) for layer, ps in by_layer.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def project_out(model_or_vlm, layer: int, directions: Tensor, positions_bs: Tensor | None = None):
    """Remove the span of `directions` (d,) or (m, d) from the residual stream after block `layer` (feature
    ablation: a decoder direction projected out), at all positions or at `positions_bs`."""
    model = _hf(model_or_vlm)
    dirs_md = directions.reshape(-1, directions.shape[-1]).float()
    # An orthonormal basis of the span, so several directions are removed exactly once each.
    basis_dm = torch.linalg.qr(dirs_md.T).Q

    def hook(_module, _args, output):
        x_bsd = output[0] if isinstance(output, tuple) else output
        u_dm = basis_dm.to(x_bsd.device)
        removed_bsd = ((x_bsd.float() @ u_dm) @ u_dm.T).to(x_bsd.dtype)
        if positions_bs is not None:
            removed_bsd = removed_bsd * positions_bs.to(x_bsd.device)[..., None]
        new = x_bsd - removed_bsd
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = decoder(model).layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def replace_image_embeddings(model_or_vlm, embedding_d: Tensor):
    """Every image token enters the language model as `embedding_d` (e.g. the mean image-token embedding of other
    samples: the corrupted run of attribution patching), or, given every image token's embedding (e_nd as
    `image_embeddings` returns them, or e_bnd), each token as its own: a per-sample corrupted run. Text embeddings
    are untouched."""
    model = _hf(model_or_vlm)

    def hook(_module, _args, out_bnd):
        e = embedding_d.to(out_bnd.device, out_bnd.dtype)
        return e.reshape(out_bnd.shape) if e.dim() > 1 and e.numel() == out_bnd.numel() else e.expand_as(out_bnd)

    handle = arch.projector(model).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
