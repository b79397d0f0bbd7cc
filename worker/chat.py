"""Conversations to token ids with an assistant-only target mask, through the tokenizer's template.

A conversation is a list of ``{"role", "content"}`` messages. It is rendered with the teacher
tokenizer's own chat template and tokenised without extra special tokens (the template writes
them), exactly as ``tokenizer.apply_chat_template(messages)`` does. Which tokens are the
assistant's is found one of two ways:

- **generation markers**: a template that wraps assistant text in ``{% generation %}`` ...
  ``{% endgeneration %}`` tells it directly (``return_assistant_tokens_mask=True``);
- **prefix diff**, for templates without markers: for each assistant message i, the text it adds
  is ``render(messages[:i+1])`` minus ``render(messages[:i], add_generation_prompt=True)`` (so the
  role header is not trained, the content and the end-of-turn text are). This is exact for
  templates that render each message as a prefix of the next; a template that does not (one that
  rewrites earlier turns, e.g. drops past reasoning) is refused, naming the row, rather than
  masked wrongly.

Both mark a token as the assistant's when its characters overlap assistant text (the rule
transformers uses), so a template with markers and the same template without them give the same
mask.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from kdcache.core.errors import DatasetError

__all__ = ["ChatRenderer", "has_generation_markers"]

_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


def has_generation_markers(template: str) -> bool:
    """True when a chat template marks assistant text with ``{% generation %}``."""
    return bool(_GENERATION.search(template))


class ChatRenderer:
    """Renders conversations with one tokenizer's chat template into (ids, assistant flags).

    ``tokenizer``: a loaded fast Hugging Face tokenizer; ``name`` says where it came from, for
    errors. Raises :class:`DatasetError` when the tokenizer has no chat template.
    """

    def __init__(self, tokenizer: Any, name: str) -> None:
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):  # named templates: the default one renders chats
            template = template.get("default")
        if not isinstance(template, str) or not template.strip():
            raise DatasetError(
                f"the tokenizer {name} has no chat template "
                "(chat_template in tokenizer_config.json or chat_template.jinja)",
                field="dataset.messages_field",
            )
        if not getattr(tokenizer, "is_fast", False):
            raise DatasetError(
                f"the tokenizer {name} is not a fast tokenizer; "
                "assistant masks need its character offsets",
                field="dataset.messages_field",
            )
        self.tok = tokenizer
        self.template = template
        self.method = "generation" if has_generation_markers(template) else "prefix"

    def render(self, messages: list[dict[str, str]], where: str) -> tuple[list[int], np.ndarray]:
        """Token ids of a conversation and (len,) bool flags: true on the assistant's tokens."""
        try:
            if self.method == "generation":
                out = self.tok.apply_chat_template(
                    messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
                )
                return list(out["input_ids"]), np.asarray(out["assistant_masks"], dtype=bool)
            return self._prefix_diff(messages, where)
        except DatasetError:
            raise
        except Exception as err:  # jinja errors (raise_exception in templates) and the like
            raise DatasetError(
                f"{where}: the chat template fails on this conversation: "
                f"{type(err).__name__}: {err}",
                field="dataset.messages_field",
            ) from None

    def _text(self, messages: list[dict[str, str]], prompt: bool = False) -> str:
        if not messages:
            return ""
        text: str = self.tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=prompt
        )
        return text

    def _prefix_diff(
        self, messages: list[dict[str, str]], where: str
    ) -> tuple[list[int], np.ndarray]:
        full = self._text(messages)
        spans: list[tuple[int, int]] = []
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            before, upto = self._text(messages[:i], prompt=True), self._text(messages[: i + 1])
            if not (upto.startswith(before) and full.startswith(upto)):
                raise DatasetError(
                    f"{where}: the chat template does not render each message as a prefix of the "
                    f"next (at message {i}), so assistant tokens cannot be found without "
                    "{% generation %} markers in the template",
                    field="dataset.messages_field",
                )
            spans.append((len(before), len(upto)))
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        flags = np.zeros(len(enc["input_ids"]), dtype=bool)
        for t, (a, b) in enumerate(enc["offset_mapping"]):
            flags[t] = any(a < e and b > s for s, e in spans)
        return list(enc["input_ids"]), flags
