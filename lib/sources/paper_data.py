"""The `paper` profile's data: VQAv2 (adaptation, held-out metrics and probing questions), COCO captions (the
text-only stream) and VSR (the statement benchmark), from the hub or a local copy, each checked for the columns the
calling step reads (`DatasetSchemaError` names the dataset and the column). Its models are
lib/sources/paper_models.py.

Local copies may be a `save_to_disk` directory, a directory of parquet / jsonl files named after their split (the
hub's layouts), or a single parquet / jsonl file; tests pass tiny stand-ins with the real column names. The step that
assembles them into the data of every analysis step lives in lib/steps/.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from lib.sources.paper_models import read_json

VQAV2_ID = "lmms-lab/VQAv2"
VSR_ID = "cambridgeltl/vsr_random"

# VQAv2 validation rows of the paper (METHOD.md): 0..49,999 adapt the SAEs, 50,000..54,095 are held out.
VQA_ADAPTATION_ROWS = range(0, 50_000)
VQA_HELDOUT_ROWS = range(50_000, 54_096)

# Columns each step reads (hub names). `load_vqav2` / `load_vsr` check them and fail with one message.
VQA_ACTIVATION_COLUMNS = ("image", "question")
VQA_TEXT_STREAM_COLUMNS = ("question", "image_id")
VQA_PROBING_COLUMNS = ("image", "question", "question_id", "question_type")
VSR_BENCHMARK_COLUMNS = ("image", "caption", "label", "relation")
VSR_SPLIT_FILES = {"train": "train.jsonl", "dev": "dev.jsonl", "test": "test.jsonl"}


class DatasetSchemaError(ValueError):
    """A dataset without a column a step needs; the message names the dataset and the column."""


# ---------------------------------------------------------------------------------------------------------------
# Data


def check_columns(ds, needed: Sequence[str], name: str) -> None:
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise DatasetSchemaError(
            f"dataset {name}: missing column {missing[0]!r} (needed {list(needed)}; found {ds.column_names})"
        )


def _load_split(source: str | Path, split: str, hub_kwargs: dict | None = None):
    """A `datasets.Dataset` for `split` of `source`: a directory written by `save_to_disk` (Dataset or
    DatasetDict), a directory of parquet/jsonl files named after their split (the hub's layouts:
    `data/{split}-*.parquet`, `{split}.jsonl`), a single parquet/jsonl file, or a hub id."""
    import datasets

    path = Path(source)
    if not path.exists():
        return datasets.load_dataset(str(source), split=split, **(hub_kwargs or {}))
    if path.is_file():
        kind = "parquet" if path.suffix == ".parquet" else "json"
        return datasets.load_dataset(kind, data_files=str(path), split="train")
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DatasetSchemaError(f"dataset {path}: no split {split!r} (has {list(ds)})")
            ds = ds[split]
        return ds
    layouts = (("parquet", f"{split}-*.parquet"), ("parquet", f"{split}.parquet"), ("json", f"{split}.jsonl"))
    for kind, pattern in layouts:
        files = sorted(str(f) for f in path.rglob(pattern))
        if files:
            return datasets.load_dataset(kind, data_files=files, split="train")
    raise DatasetSchemaError(f"dataset {path}: no `save_to_disk` data and no {split}-*.parquet / {split}.jsonl files")


def select_rows(ds, rows: range | None, name: str):
    """Rows `rows` of dataset `ds` (all of them for None); a range past its end names the dataset and its size."""
    if rows is None:
        return ds
    if rows.stop > len(ds):
        raise DatasetSchemaError(f"dataset {name}: rows {rows.start}..{rows.stop - 1} requested, only {len(ds)} rows")
    return ds.select(rows)


def load_vqav2(
    source: str | Path = VQAV2_ID,
    rows: range | None = None,
    columns: Sequence[str] = VQA_ACTIVATION_COLUMNS,
    split: str = "validation",
):
    """`lmms-lab/VQAv2` (split `validation`, 214,354 rows; columns question_type, multiple_choice_answer, answers,
    image_id, answer_type, question_id, question, image), a local copy of it, or a tiny stand-in with its column
    names. `rows`: e.g. VQA_ADAPTATION_ROWS; `columns`: what the calling step reads, checked first."""
    ds = _load_split(source, split)
    check_columns(ds, columns, str(source))
    return select_rows(ds, rows, str(source))


def load_vsr(source: str | Path = VSR_ID, split: str = "test", columns: Sequence[str] = VSR_BENCHMARK_COLUMNS):
    """`cambridgeltl/vsr_random` (jsonl splits train/dev/test; columns image (a COCO 2017 file name), image_link,
    caption, label (1 = true), relation, annotator_id, vote_true/false_validator_id), or a local copy."""
    hub_kwargs = {"data_files": VSR_SPLIT_FILES}
    ds = _load_split(source, split, hub_kwargs)
    check_columns(ds, columns, str(source))
    return ds


def vsr_image(row: dict, image_root: str | Path | None) -> Image.Image:
    """The image of a VSR row: the row's own image if the dataset holds one, else the COCO file `image` found under
    `image_root` (directly, or in the train2017/val2017 folder its `image_link` names)."""
    image = row["image"]
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if image_root is None:
        raise FileNotFoundError(
            f"VSR image {image!r}: the dataset holds file names only; pass image_root (a COCO 2017 image directory)"
        )
    root = Path(image_root)
    link_dir = Path(str(row.get("image_link") or "")).parent.name
    candidates = [root / image] + ([root / link_dir / image] if link_dir else [])
    for path in candidates:
        if path.exists():
            return Image.open(path).convert("RGB")
    raise FileNotFoundError(f"VSR image {image!r}: not found at {' or '.join(str(c) for c in candidates)}")


def load_coco_captions(path: str | Path) -> dict[int, str]:
    """COCO image id -> its first caption (file order), from a COCO captions annotation file such as
    `captions_val2014.json` (annotations_trainval2014.zip from cocodataset.org): VQAv2's validation images are COCO
    val2014, matched through VQAv2's `image_id`. The authors took the first caption per image the same way."""
    path = Path(path)
    data = read_json(path)
    anns = data.get("annotations")
    if not isinstance(anns, list) or (anns and not {"image_id", "caption"} <= set(anns[0])):
        raise DatasetSchemaError(f"{path}: expected COCO captions JSON with `annotations` holding image_id and caption")
    captions: dict[int, str] = {}
    for a in anns:
        captions.setdefault(int(a["image_id"]), a["caption"].strip())
    return captions


def text_stream_pairs(vqa, captions: dict[int, str], name: str = VQAV2_ID) -> tuple[list[str], list[str]]:
    """(captions, questions) for the text-only stream of VQAv2 rows; an image without a caption is an error."""
    check_columns(vqa, VQA_TEXT_STREAM_COLUMNS, name)
    image_ids, questions = vqa["image_id"], vqa["question"]
    missing = next((i for i in image_ids if int(i) not in captions), None)
    if missing is not None:
        raise DatasetSchemaError(f"dataset {name}: image_id {missing} has no COCO caption in the captions file")
    return [captions[int(i)] for i in image_ids], list(questions)


# ---------------------------------------------------------------------------------------------------------------
# The keyword split of the probing questions and the benchmark's prompt

# The keyword split of VQAv2 questions (METHOD.md, step 3: "left, right, above, below, behind, on top of, next to,
# between, ..."). The list after "between" is the book's completion of the source's "...", stated here.
SPATIAL_PATTERN = re.compile(
    r"\b(left|right|above|below|behind|on top of|next to|between|beside|under|underneath|beneath|in front of|"
    r"near|over|inside|outside|far|close to|top|bottom|middle|center|corner)\b",
    re.IGNORECASE,
)
VSR_PROMPT = "Is the following statement correct? Answer only with 'Yes' or 'No'.\nStatement: {caption}\nAnswer:"


def is_spatial_question(question: str) -> bool:
    return SPATIAL_PATTERN.search(question) is not None
