"""The lexical test that can see words (lib/kernels/counterfactual.py, the post_image reading of
lib/kernels/lexical.py): prompts in the organism's own words, twins whose ground truth is the swapped one, the read-out
against a direct computation, and planted features classed by what they follow."""

import dataclasses

import fakes
import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

from lib.figures import referee_lexical as FL
from lib.kernels import adapter as A
from lib.kernels import counterfactual as CF
from lib.kernels import lexical as LX
from lib.kernels import probing as PR
from lib.sources import world as W

matplotlib.use("Agg")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def words():
    return CF.stream_words(CF.stream_texts(seed=0, n=900))


@pytest.fixture(scope="module")
def relation_samples():
    return W.make_samples(0, "cf-test", 96, ("relation", "statement"), 16, n_objects=(2,))


# ---------------------------------------------------------------------------------------------------------------
# Prompts


def test_in_vocabulary_prompts_use_only_trained_words_and_no_spatial_word(words):
    check = CF.prompt_words(CF.IN_VOCAB_PROMPTS, words)
    assert check.in_vocabulary.all(), check[~check.in_vocabulary]
    assert check.direction_free.all(), check[~check.direction_free]
    assert len(set(CF.IN_VOCAB_PROMPTS)) == len(CF.IN_VOCAB_PROMPTS) >= 5
    # Every word of them is in the tokenizer's vocabulary (no <unk>), and every word occurs in the VLM stream.
    vocab = set(W.VOCAB)
    assert all(w in vocab for p in CF.IN_VOCAB_PROMPTS for w in p.split())
    # The paper-style prompts of lib.sources.world fail the same check: four of five hold words no stream has.
    paper = CF.prompt_words(W.GENERIC_PROMPTS, words)
    assert (~paper.in_vocabulary).sum() == 4
    assert set(" ".join(paper.unseen).split()) == {"do", "you", "see", "in", "arranged", "list", "picture"}


def test_the_streams_carry_the_profiles_caption_instructions():
    """An organism trained with the paper-style prompts as its caption instructions (`vlm.caption_prompts =
    "generic"`, organism v2) has every word of them in its VLM stream, so chapter 7 must not call them unseen."""
    from lib.sources.organism_config import CAPTION_PROMPTS

    generic = CF.stream_words(CF.stream_texts(seed=0, n=900, instructions=CAPTION_PROMPTS["generic"]))
    assert CF.prompt_words(W.GENERIC_PROMPTS, generic).in_vocabulary.all()
    assert CF.stream_texts(seed=0, n=9) == CF.stream_texts(seed=0, n=9, instructions=CAPTION_PROMPTS["describe"])


def test_the_streams_hold_every_template_word_and_the_positional_words_only_before_positions(words):
    seen = set(words.word[words.vlm > 0])
    for w in (*W.SHAPES, *W.COLORS, *W.ROWS, *W.COLS, "statement", "correct", "describe", "many"):
        assert w in seen, w
    # "of", "at" and "on" only ever announce a position: the next two words hold a relation, row or column word.
    positional = set(W.SPATIAL_KEYWORDS) | set(" ".join(W.RELATIONS).split())
    texts = CF.stream_texts(seed=0, n=900)
    n = 0
    for t in texts["lm"] + texts["vlm"]:
        ws = t.split()
        for i, w in enumerate(ws):
            if w in ("of", "at", "on"):
                n += 1
                assert positional & set(ws[i - 1 : i + 3]), f"{w!r} away from a position word in {t!r}"
    assert n > 100
    assert {"of", "at", "on"} <= CF.SPATIAL_WORDS


# ---------------------------------------------------------------------------------------------------------------
# Twins


def test_swapped_scene_has_the_swapped_relations():
    scenes = [W.make_scene(W.rng_for(0, "swap", i), 16, 2 + i % 2) for i in range(60)]
    for scene in scenes:
        a, b = scene.objects[0].shape, scene.objects[-1].shape
        new = CF.swap_cells(scene, a, b)
        sigma = {a: b, b: a}
        assert set(new.relations) == {(sigma.get(x, x), r, sigma.get(y, y)) for x, r, y in scene.relations}
        assert [(o.row, o.col) for o in new.objects] == sorted((o.row, o.col) for o in new.objects)
        for o in new.objects:  # each box inside its new cell, same size as before
            old = scene.by_shape(o.shape)
            x0, y0, x1, y1 = o.box
            assert o.col * 16 <= x0 and x1 < (o.col + 1) * 16 and o.row * 16 <= y0 and y1 < (o.row + 1) * 16
            assert (x1 - x0, y1 - y0) == (old.box[2] - old.box[0], old.box[3] - old.box[1])
        # The image is drawn from the new boxes: every object's colour at its new centre (every shape covers it).
        img = new.render()
        for o in new.objects:
            x0, y0, x1, y1 = o.box
            assert tuple(img[(y0 + y1) // 2, (x0 + x1) // 2]) == W.COLORS[o.color]


def test_twins_flip_the_truth_and_keep_the_rest(relation_samples):
    twins = CF.make_twins(relation_samples)
    n = len(twins.original)
    assert 0 < n < len(relation_samples)
    assert twins.summary.n.sum() == len(relation_samples) and twins.summary.n_flipped.sum() == n
    for s, img, word, d in zip(twins.original, twins.image, twins.word, twins.direction_n, strict=True):
        assert W.check_answer(img) and W.check_answer(word), "twins' answers agree with their scenes"
        assert img.answer == word.answer != s.answer and d == (1 if img.answer == "yes" else -1)
        assert img.question == s.question and img.scene != s.scene
        assert word.scene == s.scene and word.relation == CF.OPPOSITE[s.relation]
        diff = [(x, y) for x, y in zip(s.question.split(), word.question.split(), strict=True) if x != y]
        assert len(diff) == 1 and diff[0][1] in " ".join(word.relation.split())
    # Dropped pairs are exactly those whose two objects share the relation's row or column.
    kept = {(s.index, s.qtype) for s in twins.original}
    for s in relation_samples:
        a, b = s.scene.by_shape(s.subject), s.scene.by_shape(s.obj)
        axis_differs = a.col != b.col if s.relation in ("left of", "right of") else a.row != b.row
        assert ((s.index, s.qtype) in kept) == axis_differs


# ---------------------------------------------------------------------------------------------------------------
# Planted features


def planted_codes(samples):
    """Features of known meaning, computed from each sample's ground truth and words (columns):
    0 follows the image (subject left of object, whatever is asked), 1 follows the word (the question says
    "left of" or "above"), 2 follows the truth, 3 is constant, 4 never fires, 5 follows the image weakly (noise)."""
    rows = []
    for s in samples:
        a, b = s.scene.by_shape(s.subject), s.scene.by_shape(s.obj)
        image = 1.0 + 2.0 * (a.col < b.col) + 1.0 * (a.row < b.row)
        word = 3.0 if s.relation in ("left of", "above") else 0.5
        truth = 2.0 if s.answer == "yes" else 0.0
        rows.append([image, word, truth, 1.5, 0.0, 5.0 + 0.01 * (a.col < b.col)])
    return np.array(rows)


def test_a_feature_that_follows_the_image_is_spatial_and_one_that_follows_the_word_is_lexical(relation_samples):
    twins = CF.make_twins(relation_samples)
    z = {k: planted_codes(getattr(twins, k)) for k in ("original", "image", "word")}
    sens = CF.sensitivity(z["original"], z["image"], z["word"], twins.direction_n)
    out = CF.classify(sens)
    assert out["class"].tolist() == ["spatial", "lexical", "spatial", "insensitive", "silent", "insensitive"]
    assert out.passes.tolist() == [True, False, True, False, False, False]
    assert out.tracks_truth.tolist() == [False, False, True, False, False, False]
    assert sens.s_word[0] == 0 and sens.s_image[1] == 0 and sens.s_image[3] == sens.s_word[3] == 0
    np.testing.assert_allclose(sens.align_image[2], 1.0)  # the truth feature moves with the truth, always
    np.testing.assert_allclose(sens.align_word[2], 1.0)
    assert (sens[["s_image", "s_word"]].fillna(0) <= 3 + 1e-12).all().all()
    # A "no" feature (fires when the relation fails) tracks the truth as well, with alignment -1.
    no = CF.classify(CF.sensitivity(2 - z["original"][:, [2]], 2 - z["image"][:, [2]], 2 - z["word"][:, [2]],
                                    twins.direction_n))  # fmt: skip
    assert no.tracks_truth.item() and no.align_image.item() == pytest.approx(-1.0)
    # The rule's ratio decides a feature that reads both: moved 4x as far by the word is spatial at 10, lexical at 2.
    both = pd.DataFrame(dict(mean_act=[1.0], s_image=[0.3], s_word=[1.2], align_image=[0.0], align_word=[0.0]))
    assert CF.classify(both)["class"].item() == "spatial"
    assert CF.classify(both, CF.LexicalRule(ratio=2.0))["class"].item() == "lexical"


def test_feature_verdict_reads_a_feature_where_it_fires():
    base = dict(s_image=0.0, s_word=1.0, align_image=0.0, align_word=0.0)
    rows = pd.DataFrame(
        [
            dict(position="answer", layer=0, feature=0, mean_act=0.0) | base,
            dict(position="answer", layer=0, feature=1, mean_act=1.0) | base,
            dict(position="post_image", layer=0, feature=0, mean_act=1.0) | base | dict(s_image=1.0),
            dict(position="post_image", layer=0, feature=1, mean_act=1.0) | base | dict(s_image=1.0),
        ]
    )
    v = CF.feature_verdict(CF.classify(rows)).set_index("feature")
    assert v.reading.tolist() == ["post_image", "answer"]
    assert v["class"].tolist() == ["spatial", "lexical"]
    counts = CF.class_counts(CF.classify(rows))
    assert list(counts.columns) == list(CF.CLASSES) and counts.loc["answer", "silent"] == 1


def test_precision_recall_and_selections_against_the_reference():
    pr = CF.precision_recall([True, True, False, False], [True, False, True, False])
    assert pr == dict(n_selected=2, n_reference=2, n_both=1, precision=0.5, recall=0.5)
    assert np.isnan(CF.precision_recall([False, False], [True, False])["precision"])
    table = pd.DataFrame(
        dict(
            layer=[0, 0, 1, 1],
            feature=[0, 1, 0, 1],
            adapted=[True, True, True, False],
            spatial=[True, True, False, True],
            final=[True, False, False, False],
            reference=[False, True, False, True],
        )
    )
    vocab = pd.DataFrame(dict(layer=[0, 0], feature=[0, 1], lexical_post_image=[False, True]))
    verdict = pd.DataFrame(
        dict(
            layer=[0, 0, 1, 1],
            feature=[0, 1, 0, 1],
            reading="answer",
            **{"class": ["lexical", "spatial", "spatial", "spatial"]},
            passes=[False, True, True, True],
            tracks_truth=[False, True, False, True],
        )
    )
    t, rows = CF.against_reference(table, vocab, verdict)
    got = rows.set_index("selection")
    names = list(CF.SELECTIONS)
    assert got.loc[names[0], "n_both"] == 0
    assert got.loc[names[1], "recall"] == 0.5
    assert got.loc[names[3], ["n_selected", "recall"]].tolist() == [3, 1.0]
    assert got.loc[names[4], "precision"] == 1.0
    assert t.sel_candidates_cf.tolist() == [False, True, False, False]


# ---------------------------------------------------------------------------------------------------------------
# The read-out and the post_image reading on a tiny random organism


def topk_encoder(d: int, width: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    W_df, b_f = torch.randn(d, width, generator=g), 0.1 * torch.randn(width, generator=g)

    def encode(x_nd):
        pre = x_nd @ W_df + b_f
        top = pre.topk(k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())

    return encode


@pytest.fixture(scope="module")
def vlm():
    return fakes.world_vlm(seed=0, n_layers=2, with_base_lm=False)


def test_twin_readout_equals_a_direct_computation(vlm, relation_samples):
    samples = relation_samples[:7]
    encoders = {0: topk_encoder(32, 24, 6, seed=1), 1: topk_encoder(32, 24, 6, seed=2)}
    out = CF.twin_readout(vlm, encoders, samples, batch_size=3)
    yes, no = (vlm.tokenizer.convert_tokens_to_ids(w) for w in ("yes", "no"))
    for i, s in enumerate(samples):  # one sample at a time, no padding
        batch = A.prepare(vlm, [s.scene.render()], [s.question])
        resid = A.resid_stream(vlm, batch, [0, 1])
        post_s = (batch.post_image_bs & batch.keep_bs)[0]
        for layer, encode in encoders.items():
            z_sf = encode(resid[A.resid_name(layer)][0])
            torch.testing.assert_close(torch.from_numpy(out.codes["answer"][layer][i]), z_sf[-1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(
                torch.from_numpy(out.codes["post_image"][layer][i]), z_sf[post_s].amax(0), atol=1e-5, rtol=1e-5
            )
        logits = A.next_token_logits(vlm, batch)[0]
        assert out.margin_n[i] == pytest.approx(float(logits[yes] - logits[no]), abs=1e-4)
    parts = CF.split_readout(CF.Readout(out.codes, out.margin_n), 2)
    assert parts["word"].codes["answer"][0].shape == (2, 24) and len(parts["image"].margin_n) == 2


@pytest.fixture(scope="module")
def identity_vlm():
    """Decoder blocks that add nothing: every text position holds its word's embedding at every layer."""
    vlm = fakes.world_vlm(seed=0, n_layers=2, with_base_lm=False)
    with torch.no_grad():
        for block in A.decoder(vlm.model).layers:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
    return vlm


def word_reader(vlm, word: str):
    E_vd = vlm.model.get_input_embeddings().weight.detach()
    e_d = E_vd[vlm.tokenizer.convert_tokens_to_ids(word)]
    dist_v = (E_vd - e_d).norm(dim=1)
    r = 0.5 * dist_v[dist_v > 1e-6].min()
    return lambda x_nd: (1 - (x_nd - e_d).norm(dim=-1) / r).relu()


def test_the_post_image_reading_sees_the_prompt_and_leaves_the_paper_readings_unchanged(identity_vlm):
    vlm = identity_vlm
    E_vd = vlm.model.get_input_embeddings().weight.detach()
    describe, left = word_reader(vlm, "describe"), word_reader(vlm, "left")

    def encode(x_nd):
        image = (torch.cdist(x_nd, E_vd).min(-1).values - 0.1).relu()
        return torch.stack([left(x_nd) + describe(x_nd), left(x_nd) + image, left(x_nd)], -1)

    qs = W.make_samples(0, "train", 24, ("relation", "side", "color"), 16)
    samples = PR.SampleSet.from_world(qs)
    cands = pd.DataFrame({"layer": [1, 1, 1], "feature": [0, 1, 2]})
    kw = dict(top_n=3, threshold=0.01, prompts=CF.IN_VOCAB_PROMPTS, batch_size=4)
    paper = LX.lexical_filter(vlm, {1: encode}, cands, samples, **kw)
    three = LX.lexical_filter(
        vlm, {1: encode}, cands, samples, **kw, reading="post_image", top=paper.top, readings=PR.ALL_READINGS
    )
    for r in PR.READINGS:  # the paper's readings, bit for bit
        for key in paper.max_sp[r]:
            assert torch.equal(paper.max_sp[r][key], three.max_sp[r][key])
    assert paper.table.columns.tolist() == [*LX._LEXICAL_COLUMNS, "lexical"]
    t = three.table.set_index("feature")
    # Feature 0 reads "describe", which only the first prompt has: the text reading sees it, the image never does.
    m = three.max_sp["post_image"][(1, 0)]
    assert (m[:, 0] > 0.5).all() and (m[:, 1:] == 0).all()
    assert (three.max_sp["image"][(1, 0)] == 0).all()
    assert t.lexical_post_image.tolist() == [True, False, False] and t.lexical.tolist() == [True, False, False]
    assert t.lexical_image.tolist() == [False, True, False]
    _, summary = CF.prompt_spread(
        pd.DataFrame(
            [
                dict(layer=k[0], feature=k[1], reading=r, rank=s, prompt=p, max_act=float(mm[s, p]))
                for r, by in three.max_sp.items()
                for k, mm in by.items()
                for s in range(mm.shape[0])
                for p in range(mm.shape[1])
            ]
        )
    )
    s = summary.set_index("reading")
    assert s.loc["image", "max"] == 0 and s.loc["post_image", "share_nonzero"] > 0
    with pytest.raises(ValueError, match="readings"):
        LX.lexical_filter(vlm, {1: encode}, cands, samples, **kw, readings=("all", "post_image"))


# ---------------------------------------------------------------------------------------------------------------
# Figures


def test_figures_draw_from_tables(relation_samples):
    twins = CF.make_twins(relation_samples)
    z = {k: planted_codes(getattr(twins, k)) for k in ("original", "image", "word")}
    sens = CF.sensitivity(z["original"], z["image"], z["word"], twins.direction_n)
    sens.insert(0, "feature", range(len(sens)))
    sens.insert(0, "layer", 0)
    rows = pd.concat([sens.assign(position=p) for p in CF.POSITIONS], ignore_index=True)
    classified = CF.classify(rows)
    marks = {
        "final": pd.DataFrame(dict(layer=[0], feature=[1])),
        "reference": pd.DataFrame(dict(layer=[0], feature=[2])),
    }
    rule = CF.LexicalRule()
    fig = FL.plot_swap_sensitivity(classified, marks, rule.ratio, rule.min_sensitivity)
    assert len(fig.axes) == 2
    spread = pd.DataFrame(dict(reading=["image", "post_image", "post_image"], spread=[0.0, 1.0, 0.0]))
    assert len(FL.plot_prompt_spread(spread).axes) == 1
    em = pd.DataFrame(dict(layer=[2, 3], feature=[1, 2], adapted_score=[0.95, 1.0], base_score=[0.5, 0.97],
                           verdict=["new", "reused"]))  # fmt: skip
    assert len(FL.plot_emergence(em, 0.9).axes) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.ratio = 2.0  # the rule is a frozen dataclass
