"""Word-level tokenizer over the world's fixed vocabulary, as a standard Hugging Face fast tokenizer.

The world's text is lower-case words separated by single spaces (punctuation is its own word), so a WordLevel model
with a whitespace pre-tokenizer is exact: one word, one token, and the id of a word never depends on a corpus.
Saved with `save_pretrained` it is a plain `tokenizer.json` that `AutoTokenizer.from_pretrained(dir)` reloads.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lib.sources.world import SPECIAL_TOKENS, VOCAB

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<bos>", "<eos>", "<image>"
assert set(SPECIAL_TOKENS) == {PAD, UNK, BOS, EOS, IMAGE}, f"lib.world.SPECIAL_TOKENS changed: {SPECIAL_TOKENS}"


def build_tokenizer(vocab: tuple[str, ...] = VOCAB) -> PreTrainedTokenizerFast:
    """The world's tokenizer: ids follow the order of `vocab` (specials first, as lib.world lists them)."""
    assert len(set(vocab)) == len(vocab), "vocabulary has duplicate words"
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    assert not missing, f"vocabulary lacks the special tokens {missing}"
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocab)}, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Words are joined back with single spaces, which inverts WhitespaceSplit on the world's text exactly.
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token=UNK,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        extra_special_tokens={"image_token": IMAGE},
        # The model sees exactly the text it is given: prompts add <bos> themselves, so no hidden template.
        add_bos_token=False,
        add_eos_token=False,
        padding_side="right",
        model_input_names=["input_ids", "attention_mask"],
    )
    return tok
