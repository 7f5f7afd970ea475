"""Where the organism's training time goes: per stage, the share spent making data, in the model's forward and
backward, and in held-out evaluation, and the model's arithmetic rate against this CPU's measured matmul peak.

    nice -n 10 .venv/bin/python bench/bench_organism.py [--profiles default v2] [--steps 40] [--threads 1]

For each profile it runs `--steps` training steps of the base LM and of VLM stage 2 with the profile's shapes and
batch sizes (the trainers' own batch builders and models, lib/sources/organism*.py), timing separately:
- data: drawing the scenes and tokenising them (`world.make_samples`, `lm_batch` / `encode` + `image_features`),
- step: forward, loss, backward, clip, AdamW,
- eval: one held-out evaluation of `n_eval` samples (the trainers run one every `eval_every` steps),
and prints tokens per second and GFLOP/s, the FLOPs counted coarsely as 6 x trained parameters x tokens (attention's
QK^T and AV, under a tenth at these lengths, left out; the tied embedding counted as the unembedding matmul). The
peak is a 512 x 512 fp32 matmul (best of 20), timed in the same process with the same thread
count. Training a stage takes about steps x (data + step) + (steps / eval_every) x eval: the last column says so for
the profile's step count.
"""

from __future__ import annotations

import argparse
import time

import torch

from lib.io.profiles import load_profile
from lib.sources import organism as O
from lib.sources import organism_training as T
from lib.sources.tokenizer import build_tokenizer


def matmul_peak(n: int = 512, repeats: int = 20) -> float:
    """GFLOP/s of an n x n fp32 matmul on this process's threads (best of `repeats`)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench_lm(P, steps: int) -> dict:
    cfg, seed = P.lm, P.seed
    tok = build_tokenizer()
    torch.manual_seed(seed)
    model = O.make_lm(cfg, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    data_s = step_s = 0.0
    tokens = seq = 0
    for step in range(steps):
        batch, dt = _timed(
            lambda step=step: O.lm_batch(
                tok, T._mix(seed, "lm-train", cfg.batch_size, cfg.single_object_frac, start=step * cfg.batch_size)
            )
        )
        data_s += dt
        t0 = time.perf_counter()
        logits = model(input_ids=batch.input_ids_bs, attention_mask=batch.attention_mask_bs).logits
        loss = T._weighted_ce(logits, batch, cfg.context_weight, cfg.answer_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), opt.zero_grad(set_to_none=True)
        step_s += time.perf_counter() - t0
        tokens += int(batch.attention_mask_bs.sum())
        seq = max(seq, batch.input_ids_bs.shape[1])
    test = O.eval_samples(seed + 1, cfg.n_eval)
    _, eval_s = _timed(lambda: O.evaluate_lm(model, tok, test))
    n_params = sum(p.numel() for p in model.parameters())
    flops = 6 * n_params * tokens  # a coarse count: every weight once per token, x3 for the backward
    return dict(
        stage="base LM", steps=steps, data_ms=1e3 * data_s / steps, step_ms=1e3 * step_s / steps,
        eval_s=eval_s, tokens_per_s=tokens / step_s, gflops=flops / step_s / 1e9, params=n_params,
        total_steps=cfg.steps, evals=cfg.steps // cfg.eval_every,
    )  # fmt: skip


def bench_vlm(P, steps: int) -> dict:
    """Stage 2 on a freshly made LM and tower (speed does not depend on their weights)."""
    cfg, seed = P.vlm, P.seed
    tok = build_tokenizer()
    torch.manual_seed(seed)
    vlm = O.make_vlm(O.make_lm(P.lm, tok), O.make_tower(P.tower), tok, P.tower, seed)
    vlm.model.vision_tower.requires_grad_(False).eval()
    projector = vlm.model.multi_modal_projector
    params = [p for p in vlm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lm_lr, weight_decay=0.0)
    n_img = vlm.config.image_seq_length
    data_s = step_s = 0.0
    tokens = 0
    for step in range(steps):
        t0 = time.perf_counter()
        samples = T.world.make_samples(seed, "vlm-train", cfg.batch_size, start=step * cfg.batch_size)
        batch = O.encode(tok, [O.vlm_text(s.question, n_img) for s in samples], [s.answer for s in samples])
        with torch.no_grad():
            feats = O.image_features(vlm, samples)
        data_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        vlm.train(), vlm.model.vision_tower.eval()
        logits = O.vlm_forward(vlm, batch, projector(feats)).logits
        loss = T._weighted_ce(logits, batch, 0.0, 1.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(), opt.zero_grad(set_to_none=True)
        step_s += time.perf_counter() - t0
        tokens += int(batch.attention_mask_bs.sum())
    test = O.eval_samples(seed + 1, cfg.n_eval)
    _, eval_s = _timed(lambda: O.evaluate_vlm(vlm, tok, test))
    n_params = sum(p.numel() for p in params)
    return dict(
        stage="VLM stage 2", steps=steps, data_ms=1e3 * data_s / steps, step_ms=1e3 * step_s / steps,
        eval_s=eval_s, tokens_per_s=tokens / step_s, gflops=6 * n_params * tokens / step_s / 1e9, params=n_params,
        total_steps=cfg.stage2_steps, evals=cfg.stage2_steps // cfg.eval_every,
    )  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profiles", nargs="+", default=["default"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    peak = matmul_peak()
    print(f"threads {args.threads}; fp32 matmul peak (512^3, best of 20): {peak:.1f} GFLOP/s")
    header = (
        f"{'profile':<14}{'stage':<13}{'params':>9}{'data ms':>9}{'step ms':>9}{'eval s':>8}{'tok/s':>9}"
        f"{'GFLOP/s':>9}{'of peak':>8}{'est. stage s':>13}"
    )
    print(header)
    for name in args.profiles:
        P = load_profile(name)
        for fn in (bench_lm, bench_vlm):
            fn(P, 3)  # warm-up: first calls allocate and build tokenizers
            r = fn(P, args.steps)
            est = r["total_steps"] * (r["data_ms"] + r["step_ms"]) / 1e3 + r["evals"] * r["eval_s"]
            print(
                f"{name:<14}{r['stage']:<13}{r['params']:>9,}{r['data_ms']:>9.1f}{r['step_ms']:>9.1f}"
                f"{r['eval_s']:>8.1f}{r['tokens_per_s']:>9,.0f}{r['gflops']:>9.1f}{r['gflops'] / peak:>8.0%}"
                f"{est:>13,.0f}"
            )


if __name__ == "__main__":
    main()
