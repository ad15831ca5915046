"""Tokenization as vLLM 0.32 does it, from a local Hugging Face tokenizer directory.

Completions are encoded with the tokenizer's special tokens (its post-processor, e.g. a BOS);
chat messages are rendered with the model's chat template (a sandboxed Jinja environment set up
as transformers sets it up) and the rendered text is encoded without special tokens, because the
template already placed them. The indexer's read path and llmd-sim share this code, so a
prompt's tokens (and therefore its block keys) are the ones the engine computes.
"""

from __future__ import annotations

import json
import threading
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer


class TokenizerError(ValueError):
    """A tokenizer directory that cannot be used, or a chat template that fails to render."""


def _raise_exception(message: str) -> None:
    raise TokenizerError(f"chat template error: {message}")


@dataclass(frozen=True)
class ChatMessageIn:
    """A chat message reduced to what templates see: role and text content."""

    role: str
    content: str


def message_text(content: Any) -> str:
    """A chat message's text: a string, or the text parts of an OpenAI content-part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


class ModelTokenizer:
    """A model directory's tokenizer and chat template."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(
                f"{model_dir} has no tokenizer.json (a Hugging Face fast tokenizer is needed)"
            )
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise TokenizerError(f"cannot load {path}: {exc}") from None
        config = self._read_json(model_dir / "tokenizer_config.json")
        self.bos_token = self._token_text(config.get("bos_token"))
        self.eos_token = self._token_text(config.get("eos_token"))
        self.model_max_length = int(config.get("model_max_length") or 0) or None
        template = config.get("chat_template")
        jinja_file = model_dir / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text()
        self._template: jinja2.Template | None = None
        if isinstance(template, str):
            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.globals["raise_exception"] = _raise_exception
            try:
                self._template = env.from_string(template)
            except jinja2.TemplateError as exc:
                raise TokenizerError(
                    f"chat template of {model_dir} does not parse: {exc}"
                ) from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        special = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        self.special_ids = frozenset(
            i for i in (self._tok.token_to_id(s) for s in special) if i is not None
        )
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.segments = SegmentCache(self)

    def split_safe_tokens(self) -> list[str]:
        """Special tokens at which a text can be cut and its parts tokenized apart with the
        same result: added as whole tokens, without whitespace stripping or normalization."""
        out = []
        for t in self._tok.get_added_tokens_decoder().values():
            if t.special and not (t.lstrip or t.rstrip or t.normalized or t.single_word):
                out.append(t.content)
        return out

    @staticmethod
    def _read_json(path: Path) -> dict[str, Any]:
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise TokenizerError(f"cannot read {path}: {exc}") from None
        return data if isinstance(data, dict) else {}

    @staticmethod
    def _token_text(value: object) -> str | None:
        if isinstance(value, dict):
            content = value.get("content")
            return content if isinstance(content, str) else None
        return value if isinstance(value, str) else None

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text: str = self._tok.decode(list(ids), skip_special_tokens=True)
        return text

    def render_chat(
        self,
        messages: Sequence[ChatMessageIn],
        *,
        add_generation_prompt: bool = True,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """The prompt text the model's chat template makes of `messages`."""
        if self._template is None:
            raise TokenizerError(
                "the tokenizer has no chat template, so /v1/chat/completions cannot be tokenized"
            )
        kwargs: dict[str, Any] = dict(template_kwargs or {})
        kwargs.update(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )
        try:
            return self._template.render(**kwargs)
        except TokenizerError:
            raise
        except jinja2.TemplateError as exc:
            raise TokenizerError(f"chat template failed: {exc}") from None

    def encode_chat(
        self,
        messages: Sequence[ChatMessageIn],
        *,
        add_generation_prompt: bool = True,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        text = self.render_chat(
            messages, add_generation_prompt=add_generation_prompt, template_kwargs=template_kwargs
        )
        return self.segments.encode(text)


class SegmentCache:
    """Tokens of rendered chat text, reused across requests that share leading messages.

    A chat template puts special tokens between messages, and a tokenizer never merges across
    an added special token, so the rendered text can be cut right after each one and the parts
    tokenized apart: their tokens, concatenated, are the whole text's tokens. The parts are
    cached (bounded LRU, by total tokens): a long system prompt or conversation history seen
    before costs a dictionary lookup instead of a tokenization. A tokenizer is only cut where a
    self-test at load shows the cut changes nothing; otherwise every text is encoded whole.
    """

    def __init__(self, tokenizer: ModelTokenizer, max_tokens: int = 4_000_000) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self._parts: OrderedDict[str, array[int]] = OrderedDict()
        self._tokens = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.cut_at = self._verified_cuts(tokenizer.split_safe_tokens())

    def _verified_cuts(self, candidates: list[str]) -> tuple[str, ...]:
        tok = self.tokenizer
        good = []
        for sp in candidates:
            probes = [f"a b{sp}\nc d", f"{sp} x", f"x  {sp}  y\n", f"\u00e9{sp}\u00e9 z", f"1{sp}2"]
            if all(
                tok.encode(p, add_special_tokens=False)
                == [
                    t for part in _cut(p, (sp,)) for t in tok.encode(part, add_special_tokens=False)
                ]
                for p in probes
            ):
                good.append(sp)
        return tuple(good)

    @property
    def cached_tokens(self) -> int:
        return self._tokens

    def encode(self, text: str) -> list[int]:
        """`text`'s tokens (no special tokens added), exactly as encoding it whole gives."""
        if not self.cut_at:
            return self.tokenizer.encode(text, add_special_tokens=False)
        out: list[int] = []
        for part in _cut(text, self.cut_at):
            with self._lock:
                ids = self._parts.get(part)
                if ids is not None:
                    self._parts.move_to_end(part)
                    self.hits += 1
            if ids is None:
                fresh = self.tokenizer.encode(part, add_special_tokens=False)
                ids = array("l", fresh)
                with self._lock:
                    self.misses += 1
                    if part not in self._parts and len(fresh) <= self.max_tokens:
                        self._parts[part] = ids
                        self._tokens += len(fresh)
                        while self._tokens > self.max_tokens:
                            _, old = self._parts.popitem(last=False)
                            self._tokens -= len(old)
            out.extend(ids)
        return out


def _cut(text: str, markers: Sequence[str]) -> list[str]:
    """`text` cut right after every occurrence of any marker (the pieces join back to it)."""
    cuts = []
    for m in markers:
        i = text.find(m)
        while i >= 0:
            cuts.append(i + len(m))
            i = text.find(m, i + len(m))
    if not cuts:
        return [text]
    cuts.sort()
    parts, start = [], 0
    for c in cuts:
        if c > start:
            parts.append(text[start:c])
            start = c
    if start < len(text):
        parts.append(text[start:])
    return parts


class RenderClient:
    """Tokenization by a vLLM server itself: vLLM 0.32's render endpoints
    (`POST /v1/completions/render`, `/v1/chat/completions/render`) answer an OpenAI request with
    the token ids the engine would compute for it (chat template, tools and all), without
    running the model. A generative `vllm serve` has them with `--enable-scale-out` (without
    it they answer 403), and vLLM's render launcher serves only them.
    """

    def __init__(self, base_url: str, timeout_s: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def tokens(self, path: str, body: bytes | dict[str, Any]) -> list[int]:
        """The token ids of an OpenAI request to `path` (`/v1/completions` or a chat path);
        for a batch of prompts, the first one's. TokenizerError on any failure."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        url = f"{self.base_url}{path.rstrip('/')}/render"
        try:
            async with self._session.post(
                url, data=data, headers={"content-type": "application/json"}
            ) as resp:
                status = resp.status
                doc = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise TokenizerError(f"render request to {url} failed: {exc}") from None
        if status != 200:
            raise TokenizerError(f"{url} answered {status}: {str(doc)[:300]}")
        item = doc[0] if isinstance(doc, list) and doc else doc
        ids = item.get("token_ids") if isinstance(item, dict) else None
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            raise TokenizerError(f"{url} returned no token_ids: {str(doc)[:300]}")
        return ids
