"""Benchmark: attribution patching against exhaustive activation patching (lib/kernels/attribution.py), on this CPU.

Not a test. One random organism-shaped LLaVA (world tokenizer and prompts, 48 px images, 36 image tokens; language
model d_model 128, 4 heads of 32, 5 decoder layers) and one batch of 16 statement questions (~55 tokens each). The
feature is a random direction at `blocks.4.hook_resid_post`, so the 4 layers x 4 heads below it are scored.

Three ways to get the same table of per-head effects, timed in one run:
- attribution: `attribute` (one clean forward with a graph, one corrupted forward, one backward). It yields the
  per-head AND the per-head-and-position effects at once.
- exhaustive per head: `activation_patching` (a clean and a corrupted forward, then one forward per head).
- exhaustive per head and position: `activation_patching(per_position=True)` (additionally one forward per head and
  post-image position; the call also does the per-head forwards, which the timing includes).
Ideal speed-ups count forward-pass equivalents, a backward taken as two forwards: attribution costs 4, the
exhaustive runs cost one per patched head (n_heads / 4) or per patched head and position (n_heads x P / 4).
The three methods alternate in rounds, so load from other processes on the shared cores hits all alike; times are
medians over rounds. A last section times several features: one backward each against one vmapped backward.

Run: nice -n 10 .venv/bin/python bench/bench_attribution.py   (well under 2 minutes on the 2-core CI machine)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from lib.kernels import adapter as A
from lib.kernels import attribution as T
from lib.sources import world


def build_vlm(n_layers: int, d_model: int, n_heads: int, seed: int = 0) -> A.VLM:
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from lib.sources.tokenizer import IMAGE, build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(seed)
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=d_model,
        intermediate_size=4 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_heads,
        head_dim=d_model // n_heads,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=48, patch_size=8
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

    def preprocess(images):
        x_byxc = torch.as_tensor(np.stack([np.asarray(im) for im in images]), dtype=torch.float32)
        return (x_byxc / 255.0 - 0.5).permute(0, 3, 1, 2) / 0.25

    return A.VLM(
        model=model,
        tokenizer=tok,
        preprocess=preprocess,
        prompt=lambda q: "<bos> " + world.vlm_prompt(q),
        image_placeholder=IMAGE,
    )


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=5, help="decoder layers; the feature sits at the last one")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--features", type=int, default=8, help="features for the one-vs-stacked backward section")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the CI machine's 2 cores are shared)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    vlm = build_vlm(args.layers, args.d_model, args.heads)
    samples = world.make_samples(0, "bench", args.batch, qtypes=("statement",))
    batch = A.prepare(vlm, [s.scene.render() for s in samples], [s.question for s in samples])
    reference = world.make_samples(0, "reference", 32, qtypes=("statement",))
    mean_d = T.mean_image_embedding(vlm, [s.scene.render() for s in reference])
    gen = torch.Generator().manual_seed(0)
    layer = args.layers - 1
    feature = T.Feature(layer, torch.randn(args.d_model, generator=gen), "random")
    n_heads_total = layer * args.heads
    n_positions = int(batch.post_image_bs.any(0).sum())  # distinct post-image position indices patched one by one
    print(
        f"model: {args.layers} layers x {args.heads} heads, d_model {args.d_model}; batch {args.batch} x "
        f"{batch.input_ids_bs.shape[1]} tokens (lengths {int(batch.lengths_b.min())}-{int(batch.lengths_b.max())}, "
        f"{vlm.n_image_tokens} image tokens); feature at layer {layer}: {n_heads_total} heads scored, "
        f"{n_positions} post-image positions; torch threads {args.threads}"
    )

    times: dict[str, list[float]] = {"attribution": [], "per head": [], "per head and position": []}
    for r in range(args.rounds):
        t, (attr,) = timed(lambda: T.attribute(vlm, batch, [feature], mean_d))
        times["attribution"].append(t)
        t, (per_head,) = timed(lambda: T.activation_patching(vlm, batch, [feature], mean_d))
        times["per head"].append(t)
        if r == args.rounds // 2:  # ~20 s a run: once, in the middle round, keeps the benchmark under 2 minutes
            t, (per_pos,) = timed(lambda: T.activation_patching(vlm, batch, [feature], mean_d, per_position=True))
            times["per head and position"].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}

    print(f"\n{'method':<36}{'median s':>10}{'speed-up of attribution':>26}{'ideal':>9}")
    print(f"{'attribution (clean gradient)':<36}{med['attribution']:>10.3f}{'':>26}{'':>9}")
    ideal = T.ideal_speedups(n_heads_total, n_positions)
    for k in ("per head", "per head and position"):
        print(f"{'exhaustive ' + k:<36}{med[k]:>10.3f}{med[k] / med['attribution']:>25.1f}x{ideal[k]:>8.1f}x")
    print(
        "(the exhaustive runs also do a clean and a corrupted forward, and the per-position run the per-head "
        "forwards too: 2 + n_heads and 2 + n_heads x (P + 1) forwards)"
    )

    # How close the first-order estimate is on this random (strongly non-linear) model: information, not a check.
    sl = slice(0, layer)
    a, b = attr.total_blh[:, sl].flatten().numpy(), per_head.total_blh[:, sl].flatten().numpy()
    post = batch.post_image_bs
    a_t = attr.effect_bslh[:, :, sl][post].flatten().numpy()
    b_t = per_pos.effect_bslh[:, :, sl][post].flatten().numpy()
    sa, sb = attr.score_blh[:, sl].mean(0).flatten().numpy(), per_pos.score_blh[:, sl].mean(0).flatten().numpy()
    r_head, r_pos, r_score = np.corrcoef(a, b)[0, 1], np.corrcoef(a_t, b_t)[0, 1], np.corrcoef(sa, sb)[0, 1]
    print(
        f"\nattribution vs exhaustive (Pearson r): per head and sample {r_head:.3f}, per head, position and "
        f"sample {r_pos:.3f}, head score (mean |effect|) {r_score:.3f}"
    )

    features = [
        T.Feature(layer - (i % 2), torch.randn(args.d_model, generator=gen), f"f{i}") for i in range(args.features)
    ]
    loop_t, stacked_t = [], []
    for _ in range(args.rounds):
        loop_t.append(timed(lambda: T.attribute(vlm, batch, features, mean_d))[0])
        stacked_t.append(timed(lambda: T.attribute(vlm, batch, features, mean_d, stacked=True))[0])
    print(
        f"\n{args.features} features (layers {layer - 1} and {layer}): one backward each "
        f"{statistics.median(loop_t):.3f} s, one vmapped backward {statistics.median(stacked_t):.3f} s "
        f"(single feature: {med['attribution']:.3f} s)"
    )


if __name__ == "__main__":
    main()
