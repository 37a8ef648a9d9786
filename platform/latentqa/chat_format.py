"""Derive a chat model's token layout from its tokenizer and chat template alone.

Nothing here is keyed by model name. Every fact the layout needs (BOS, where turns start,
how a system prompt is placed, whether the decoder may use its own role name, which token
ids make n placeholders) is found by rendering small probe dialogs through the template and
looking at where the probe contents land in the text.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

from transformers import PreTrainedTokenizerBase

# The decoder answers as "reflect" where the template allows arbitrary roles: the published
# decoder was trained that way (SPEC "Write side").
DECODER_ROLE = "reflect"
# Probe contents: plain words that no template rewrites and no real text contains.
_PROBES = ("qzxprobeone", "qzxprobetwo", "qzxprobethree", "qzxprobefour")

Message = dict[str, str]
SystemPlacement = Literal["own_turn", "folded", "merged"]


class UnsupportedChatTemplate(ValueError):
    """The tokenizer's chat template cannot express the LatentQA layout."""


@dataclass(frozen=True)
class RenderedDialog:
    """A dialog rendered to text, with the character positions of each message.

    turn_starts[k] is where message k's turn (its role header) begins, content_spans[k] is
    where its content lies, and turn_ends[k] is where the next turn (or the generation
    prompt) begins.
    """

    text: str
    turn_starts: list[int]
    content_spans: list[tuple[int, int]]
    turn_ends: list[int]


@dataclass(frozen=True)
class _Shape:
    """A dialog shape (roles, prompt) rendered once with probe contents.

    Filling it with real contents gives the same text as rendering them, because templates
    insert (trimmed) content verbatim; `ChatFormat` checks this on the first fill of each shape.
    """

    pieces: list[str]  # text = pieces[0] + c0 + pieces[1] + c1 + ... + pieces[-1]
    header_lens: list[int | None]  # role header length before content k (None: turn starts at previous end)
    tail_lens: list[int]  # characters after content k that still belong to its turn
    first_turn_floor: int  # where the first turn may start at the earliest (after BOS)
    verified: list[bool]

    def fill(self, contents: list[str]) -> RenderedDialog:
        text_parts, starts, spans, ends = [self.pieces[0]], [], [], []
        cursor = len(self.pieces[0])
        prev_end = self.first_turn_floor
        for k, content in enumerate(contents):
            header = self.header_lens[k]
            starts.append(cursor - header if header is not None else prev_end)
            spans.append((cursor, cursor + len(content)))
            prev_end = cursor + len(content) + self.tail_lens[k]
            ends.append(prev_end)
            text_parts += [content, self.pieces[k + 1]]
            cursor += len(content) + len(self.pieces[k + 1])
        return RenderedDialog("".join(text_parts), starts, spans, ends)


def _plain_backend(tokenizer: PreTrainedTokenizerBase):
    """The fast tokenizer's Rust tokenizer when calling it directly gives the same ids as the
    Python wrapper (no truncation or padding configured), else None. For a layout's few short
    pieces the wrapper's per-call set-up and the batch call's thread pool cost more than the
    tokenising itself: over half the layout's time (docs/benchmarks.md, "layout")."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return None
    return backend


class ChatFormat:
    """Everything the LatentQA layout needs to know about one tokenizer's chat format."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        if not getattr(tokenizer, "chat_template", None):
            raise UnsupportedChatTemplate(
                "the tokenizer has no chat_template; LatentQA renders dialogs with the target's template"
            )
        self.tokenizer = tokenizer
        self._rust_tokenizer = _plain_backend(tokenizer)
        self.bos_text = self._discover_bos()
        self.bos_id = tokenizer.bos_token_id if self.bos_text else None
        self.pad_id = _pad_id(tokenizer)
        self.role_prefixes = {role: self._discover_role_prefix(role) for role in ("user", "assistant")}
        self.decoder_role = DECODER_ROLE if self._allows_role(DECODER_ROLE) else "assistant"
        self.system_placement = self._discover_system_placement()
        self.placeholder_first_id, self.placeholder_rest_id = self._discover_placeholder_ids()
        self.stop_ids = self._discover_stop_ids()

    # ----- rendering -------------------------------------------------------------------
    def render_text(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def render(
        self,
        messages: list[Message],
        add_generation_prompt: bool = False,
        generation_role: str | None = None,
    ) -> RenderedDialog:
        """Render `messages` and locate every turn and content in the text.

        `generation_role` appends the opening of a turn for that role (e.g. the decoder's
        "reflect"), which `add_generation_prompt` cannot do for roles other than the assistant.
        """
        contents = [m["content"].strip() for m in messages]
        roles = tuple(m["role"] for m in messages)
        shape = self._shape(roles, add_generation_prompt, generation_role)
        rendered = shape.fill(contents)
        if not shape.verified[0]:
            expected = self._render_whole(
                [{"role": r, "content": c} for r, c in zip(roles, contents)], add_generation_prompt, generation_role
            )
            if expected != rendered.text:
                raise UnsupportedChatTemplate(
                    f"the chat template rewrites message contents for roles {roles}; "
                    "LatentQA needs contents inserted verbatim to locate turns"
                )
            shape.verified[0] = True
        return rendered

    def _render_whole(self, messages: list[Message], add_generation_prompt: bool, generation_role: str | None) -> str:
        if self.system_placement == "merged" and messages and messages[0]["role"] == "system":
            messages = _merge_system(messages)
        text = self.render_text(messages, add_generation_prompt and generation_role is None)
        if generation_role is not None:
            text += self.generation_prompt(messages, generation_role)
        return text

    @functools.lru_cache(maxsize=256)
    def _shape(self, roles: tuple[str, ...], add_generation_prompt: bool, generation_role: str | None) -> _Shape:
        probes = [f"qzxprobe{k}qzx" for k in range(len(roles))]
        messages = [{"role": r, "content": p} for r, p in zip(roles, probes)]
        merged = self.system_placement == "merged" and roles[:1] == ("system",)
        text = self._render_whole(messages, add_generation_prompt, generation_role)
        turns = _merge_system(messages) if merged else messages
        # Where each rendered turn ends: rendering the first k turns must be a prefix of the whole.
        turn_ends = []
        for k in range(len(turns)):
            head = self.render_text(turns[: k + 1])
            if not text.startswith(head):
                raise UnsupportedChatTemplate(
                    f"rendering the first {k + 1} messages is not a prefix of rendering them all, "
                    "so turn boundaries cannot be located"
                )
            turn_ends.append(len(head))
        if merged:
            turn_ends.insert(0, 0)
        if roles[:1] == ("system",) and self.system_placement != "own_turn":
            # The system text sits inside the first user turn: it ends where the user text begins.
            turn_ends[0] = text.index(probes[1])
        positions = []
        for k, probe in enumerate(probes):
            at = text.find(probe)
            if at < 0 or (positions and at < positions[-1]):
                raise UnsupportedChatTemplate(
                    f"message {k} (role {roles[k]!r}) does not appear in order in the rendered dialog"
                )
            positions.append(at)
        pieces, header_lens, tail_lens, cursor = [], [], [], 0
        for k, (probe, at) in enumerate(zip(probes, positions)):
            pieces.append(text[cursor:at])
            header = self.role_prefixes.get(roles[k], "")
            header_lens.append(len(header) if header and text.endswith(header, cursor, at) else None)
            tail_lens.append(turn_ends[k] - at - len(probe))
            cursor = at + len(probe)
        pieces.append(text[cursor:])
        return _Shape(pieces, header_lens, tail_lens, len(self.bos_text), [False])

    def generation_prompt(self, messages: list[Message], role: str) -> str:
        """The text that opens a new turn of `role` after `messages`."""
        probe = _PROBES[3]
        base = self.render_text(messages)
        full = self.render_text(messages + [{"role": role, "content": probe}])
        if not full.startswith(base) or probe not in full[len(base):]:
            raise UnsupportedChatTemplate(f"cannot open a {role!r} turn with this chat template")
        return full[len(base) : full.index(probe, len(base))]

    def placeholder_ids(self, n: int) -> list[int]:
        """Exactly n placeholder token ids (Llama-3: `?` then ` ?`..., as `"? " * n` trimmed gives)."""
        return [self.placeholder_first_id] + [self.placeholder_rest_id] * (n - 1) if n else []

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of text pieces; the template already holds the special tokens."""
        if not texts:
            return []
        if self._rust_tokenizer is not None:  # a layout's few short pieces: see _plain_backend
            return [self._rust_tokenizer.encode(text, add_special_tokens=False).ids for text in texts]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    # ----- discovery -------------------------------------------------------------------
    def _discover_bos(self) -> str:
        text = self.render_text([{"role": "user", "content": _PROBES[0]}])
        bos = self.tokenizer.bos_token
        return bos if bos and text.startswith(bos) else ""

    def _discover_role_prefix(self, role: str) -> str:
        """The text between the end of one turn and the content of a `role` turn."""
        history = [{"role": "user", "content": _PROBES[0]}, {"role": "assistant", "content": _PROBES[1]}]
        if role == "assistant":
            history = history[:1]
        try:
            return self.generation_prompt(history, role)
        except Exception as err:  # a template that rejects the probe cannot be laid out
            raise UnsupportedChatTemplate(
                f"the chat template cannot render a simple user/assistant dialog: {err}"
            ) from err

    def _allows_role(self, role: str) -> bool:
        try:
            return role in self.generation_prompt([{"role": "user", "content": _PROBES[0]}], role)
        except Exception:  # templates that validate roles raise on unknown ones
            return False

    def _discover_system_placement(self) -> SystemPlacement:
        system, user = _PROBES[2], _PROBES[0]
        try:
            text = self.render_text([{"role": "system", "content": system}, {"role": "user", "content": user}])
        except Exception:  # "System role not supported": we fold it into the user turn ourselves
            return "merged"
        if system not in text:
            return "merged"
        user_turn = text.rfind(self.role_prefixes["user"], 0, text.index(user))
        return "folded" if 0 <= user_turn < text.index(system) else "own_turn"

    def _discover_placeholder_ids(self) -> tuple[int, int]:
        first = self.encode(["?"])[0]
        rest = self.encode([" ?"])[0]
        if len(first) != 1:
            raise UnsupportedChatTemplate("the tokenizer does not encode '?' as a single token")
        return first[0], (rest[0] if len(rest) == 1 else first[0])


    def _discover_stop_ids(self) -> set[int]:
        """Tokens that end a generated turn: what closes an assistant turn, and EOS."""
        user, answer = _PROBES[0], _PROBES[1]
        text = self.render_text([{"role": "user", "content": user}, {"role": "assistant", "content": answer}])
        tail = self.encode([text[text.index(answer) + len(answer) :]])[0]
        stops = {tail[0]} if tail else set()
        if self.tokenizer.eos_token_id is not None:
            stops.add(self.tokenizer.eos_token_id)
        if not stops:
            raise UnsupportedChatTemplate("cannot find a token that ends an assistant turn")
        return stops


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id):
        if candidate is not None:
            return int(candidate if not isinstance(candidate, list) else candidate[0])
    return 0


def _merge_system(messages: list[Message]) -> list[Message]:
    system, first, *rest = messages
    merged = {"role": first["role"], "content": f"{system['content'].strip()}\n\n{first['content']}"}
    return [merged, *rest]
