"""Optional: an LLM as explainer and classifier of features (the authors' auto-interp protocol, for the paper
profile). Off by default: nothing here runs unless a caller asks for it with a configuration from the environment
(`LLMConfig.from_env`, `BOOK_LLM=1`). No dependency: the OpenAI-compatible chat-completions endpoint is called with
urllib, or with a `transport` the caller passes (the tests' fake).
"""

from __future__ import annotations

import base64
import io
import json
import os
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

LLM_ENV = {
    "enable": "BOOK_LLM",  # must be "1": the opt-in
    "base_url": "BOOK_LLM_BASE_URL",  # default https://api.openai.com/v1
    "model": "BOOK_LLM_MODEL",  # default gpt-4o-mini (the authors' model)
    "api_key": "BOOK_LLM_API_KEY",  # falls back to OPENAI_API_KEY
}

EXPLAIN_SYSTEM = (
    "You are analyzing a feature of a vision-language model using its top activating samples, each an image and a "
    "prompt; tokens where the feature fires are marked with [[ ]].\n"
    "Task: produce a concise ONE SENTENCE description that completes the phrase 'this feature activates for ...'.\n"
    "Focus on consistent visual-spatial patterns (objects, parts, relations, configurations); be specific; one short "
    'lower-case sentence, no hedging. Return strict JSON only: {"description": "..."}'
)
CLASSIFY_SYSTEM = (
    "You are validating a feature description by reviewing examples, each an image and a prompt.\n"
    "For each sample, output 1 if the description is supported by it, otherwise 0.\n"
    'Return strict JSON only: {"classifications": [<0 or 1 per sample, in order>]}'
)


@dataclass(frozen=True)
class LLMConfig:
    base_url: str
    model: str
    api_key: str
    timeout_s: float = 120.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LLMConfig | None:
        """The configuration if the environment opts in (BOOK_LLM=1 and a key), otherwise None."""
        env = os.environ if environ is None else environ
        if env.get(LLM_ENV["enable"]) != "1":
            return None
        key = env.get(LLM_ENV["api_key"]) or env.get("OPENAI_API_KEY")
        if not key:
            raise ValueError(f"{LLM_ENV['enable']}=1 but neither {LLM_ENV['api_key']} nor OPENAI_API_KEY is set")
        return cls(
            env.get(LLM_ENV["base_url"], "https://api.openai.com/v1").rstrip("/"),
            env.get(LLM_ENV["model"], "gpt-4o-mini"),
            key,
        )


class Example(NamedTuple):
    image: Any  # HxWx3 uint8 array or PIL image
    text: str  # the prompt, activating tokens marked (`mark_tokens`)


def mark_tokens(tokens: Sequence[str], acts: Sequence[float], threshold: float = 0.0) -> str:
    """The prompt as text with every token whose activation exceeds `threshold` marked [[like this]]."""
    marked = [f"[[{t}]]" if float(a) > threshold else t for t, a in zip(tokens, acts, strict=True)]  # NaN: unmarked
    return " ".join(marked)


def _image_url(image) -> str:
    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _examples_content(examples: Sequence[Example]) -> list[dict]:
    content = []
    for i, ex in enumerate(examples):
        content.append({"type": "text", "text": f"Sample {i + 1}. Prompt: {ex.text}"})
        content.append({"type": "image_url", "image_url": {"url": _image_url(ex.image)}})
    return content


def _urllib_post(url: str, headers: dict, payload: dict, timeout_s: float) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


def _chat(config: LLMConfig, system: str, content: list[dict], transport: Callable | None) -> dict:
    """One chat completion in JSON mode; returns the parsed JSON object of the answer."""
    payload = {
        "model": config.model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": content}],
        "temperature": 0.0,
        "max_tokens": 400,
        "response_format": {"type": "json_object"},
    }
    headers = {"Authorization": f"Bearer {config.api_key}", "Content-Type": "application/json"}
    reply = (transport or _urllib_post)(f"{config.base_url}/chat/completions", headers, payload, config.timeout_s)
    try:
        return json.loads(reply["choices"][0]["message"]["content"])
    except (KeyError, IndexError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config.base_url}: not a chat completion holding a JSON object: {str(reply)[:300]}") from e


def llm_explainer(examples: Sequence[Example], config: LLMConfig, transport: Callable | None = None) -> str:
    """A one-sentence description of a feature from its top examples, written by an LLM (opt-in, see LLMConfig)."""
    answer = _chat(config, EXPLAIN_SYSTEM, _examples_content(examples), transport)
    description = str(answer.get("description", "")).strip()
    if not description:
        raise ValueError(f"the LLM returned no description: {answer}")
    return description


def llm_classifier(
    description: str, examples: Sequence[Example], config: LLMConfig, transport: Callable | None = None
) -> list[int]:
    """Per example, 1 if the LLM judges the description to fit it (the scorer of the authors' protocol: feed it the
    held-out positives and random negatives in a shuffled order, then `f1_score`)."""
    content = [{"type": "text", "text": f"Feature description: {description}"}, *_examples_content(examples)]
    labels = [int(x) for x in _chat(config, CLASSIFY_SYSTEM, content, transport).get("classifications", [])]
    if len(labels) != len(examples) or not set(labels) <= {0, 1}:
        raise ValueError(f"the LLM classified {len(labels)} of {len(examples)} examples: {labels}")
    return labels
