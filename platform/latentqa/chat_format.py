"""Derive a chat model's token layout from its tokenizer and chat template alone.

Nothing here is keyed by model name. Every fact the layout needs (BOS, where turns start,
how a system prompt is placed, whether the decoder may use its own role name, which token
ids make n placeholders, which variable switches thinking) is found by rendering small probe
dialogs through the template and looking at where the probe contents land in the text.
docs/chat-templates.md shows the result for each tested family.
"""

from __future__ import annotations

import copy
import functools
import re
import threading
from dataclasses import dataclass
from typing import Literal

from tokenizers import AddedToken
from transformers import PreTrainedTokenizerBase

# The decoder answers as "reflect" where the template allows arbitrary roles: the published
# decoder was trained that way (SPEC "Write side").
DECODER_ROLE = "reflect"
# The roles chat dialogs hold; `ChatFormat.dialog_roles` keeps those a template renders.
CHAT_ROLES = ("system", "user", "assistant", "tool")
# Probe contents: plain words that no template rewrites and no real text contains.
_PROBES = ("qzxprobeone", "qzxprobetwo", "qzxprobethree", "qzxprobefour")
# The template variables by which chat templates switch a model's thinking on and off (Qwen3's
# `enable_thinking`, DeepSeek-V3.1's `thinking`). Which one a template honours, if any, is found
# by rendering a generation prompt both ways.
THINKING_SWITCHES = ("enable_thinking", "thinking")
# How a reasoning target's reply opens its thought (SPEC "Data", case 4).
THOUGHT_OPENING = "<think>"
# How many recurring template pieces `_Encoder` keeps the ids of: a handful per dialog shape.
RECURRING_PIECES_KEPT = 1024

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


class _Encoder:
    """Token ids of template text (special tokens recognised) and of plain text (message contents,
    where the tokens that mark turns are spelled out as text)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        # The Rust tokenizer is called directly: for a layout's few short pieces the wrapper's
        # per-call set-up and the batch call's thread pool cost more than the tokenising itself,
        # over half the layout's time (docs/benchmarks.md, "layout"). A layout never truncates or
        # pads (some tokenizer.json files ask for it): a copy without either, where needed.
        if backend is not None and (backend.truncation is not None or backend.padding is not None):
            backend = _unbounded_copy(backend)
        self._backend = backend
        self._plain_backend = None
        self._lock = threading.Lock()
        self._recurring_ids = functools.lru_cache(maxsize=RECURRING_PIECES_KEPT)(
            lambda text: tuple(self.template([text])[0])
        )

    def template(self, texts: list[str]) -> list[list[int]]:
        if self._backend is None:
            return self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        self._backend.encode_special_tokens = False  # the wrapper leaves it as its last call set it
        return [self._backend.encode(text, add_special_tokens=False).ids for text in texts]

    def recurring(self, text: str) -> list[int]:
        """`template` for text that recurs in every dialog of a shape (BOS, role headers, the layout's
        placeholder and acknowledgement): over half of a layout's pieces, so their ids are kept."""
        return list(self._recurring_ids(text))

    def plain(self, texts: list[str], turn_markup: frozenset[str]) -> list[list[int]]:
        backend = self._plain(turn_markup)
        if backend is None:  # a tokenizer without a Rust backend: only special tokens are split
            return self.tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return [backend.encode(text, add_special_tokens=False).ids for text in texts]

    def _plain(self, turn_markup: frozenset[str]):
        """A copy of the Rust tokenizer that splits special tokens, and the turn markup's tokens that
        are not marked special (DeepSeek's `<｜User｜>`), as the wrapper's split_special_tokens does
        for special ones. Made on first use: copying a large vocabulary takes a second or two."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        with self._lock:
            if self._plain_backend is None and backend is not None:
                plain = _unbounded_copy(backend)
                plain.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in sorted(turn_markup)])
                plain.encode_special_tokens = True
                self._plain_backend = plain
        return self._plain_backend


def _unbounded_copy(backend):
    backend = copy.deepcopy(backend)
    backend.no_truncation()
    backend.no_padding()
    return backend


class ChatFormat:
    """Everything the LatentQA layout needs to know about one tokenizer's chat format."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        if not getattr(tokenizer, "chat_template", None):
            raise UnsupportedChatTemplate(
                "the tokenizer has no chat_template; LatentQA renders dialogs with the target's template"
            )
        self.tokenizer = tokenizer
        self._encoder = _Encoder(tokenizer)
        # the text of any added token but whitespace (Gemma's `\n`), which templates never parse
        self._added_text = _pattern(t.content for t in tokenizer.added_tokens_decoder.values() if t.content.strip())
        self.thinking_switch = self._discover_thinking_switch()
        self.trims_contents = self._discover_trimming()
        self.bos_text = self._discover_bos()
        self.bos_id = tokenizer.bos_token_id if self.bos_text else None
        self.pad_id = _pad_id(tokenizer)
        self.role_prefixes = {role: self._discover_role_prefix(role) for role in ("user", "assistant")}
        self.decoder_role = DECODER_ROLE if self._allows_role(DECODER_ROLE) else "assistant"
        self.system_placement = self._discover_system_placement()
        self.placeholder_first_id, self.placeholder_rest_id = self._discover_placeholder_ids()
        self.reply_end = self._discover_reply_end()
        self.stop_ids = self._discover_stop_ids()
        self.turn_markup = self._discover_turn_markup()
        self._markup_text = _pattern(self.turn_markup)

    @functools.cached_property
    def dialog_roles(self) -> tuple[str, ...]:
        """The CHAT_ROLES a dialog may hold: those whose content the template renders verbatim,
        each probed where a dialog has it (a system prompt first, any other role after a user turn).
        A system prompt is among them wherever `system_placement` can place it. Templates that
        render any role name (Llama-3, Gemma) take others too, which are not listed."""
        user = {"role": "user", "content": _PROBES[0]}
        # quotes and a line break: a template that writes a role's content as JSON (Llama-3.1's
        # tool turns) rewrites it
        content = f'{_PROBES[1]} "{_PROBES[2]}"\n{_PROBES[3]}'
        probes = {"system": [{"role": "system", "content": content}, user], "user": [user]}
        roles = []
        for role in CHAT_ROLES:
            messages = probes.get(role) or [user, {"role": role, "content": content}]
            try:
                text = self._render_whole(messages, add_generation_prompt=False, generation_role=None, thinking=False)
            except UnsupportedChatTemplate:  # the template refuses the role
                continue
            if all(self._as_rendered(m["content"]) in text for m in messages):
                roles.append(role)
        return tuple(roles)

    # ----- rendering -------------------------------------------------------------------
    def render_text(self, messages: list[Message], add_generation_prompt: bool = False, thinking: bool = False) -> str:
        """The template's own rendering, with its thinking switch (if it has one) set to `thinking`:
        off unless asked, so Qwen3 renders its non-thinking form."""
        switch = {self.thinking_switch: thinking} if self.thinking_switch else {}
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **switch
            )
        except Exception as err:  # templates raise on roles or orders they do not accept
            roles = [m["role"] for m in messages]
            raise UnsupportedChatTemplate(f"the chat template cannot render roles {roles}: {err}") from None

    def render(
        self,
        messages: list[Message],
        add_generation_prompt: bool = False,
        generation_role: str | None = None,
        thinking: bool = False,
    ) -> RenderedDialog:
        """Render `messages` and locate every turn and content in the text.

        `generation_role` appends the opening of a turn for that role (e.g. the decoder's
        "reflect"), which `add_generation_prompt` cannot do for roles other than the assistant.
        `thinking` renders the dialog as a reasoning target sees it with thinking on; a dialog
        that ends in an assistant reply is then the reply as generated (see `_generated_reply`).
        """
        if thinking and messages[-1]["role"] == "assistant" and not add_generation_prompt and generation_role is None:
            return self._generated_reply(messages)
        contents = [self._as_rendered(m["content"]) for m in messages]
        roles = tuple(m["role"] for m in messages)
        shape = self._shape(roles, add_generation_prompt, generation_role, thinking)
        rendered = shape.fill(contents)
        # Checked on a shape's first fill, and whenever a content holds a token's text: templates
        # may rewrite such contents (Qwen3 and DeepSeek-R1 parse `</think>` out of replies).
        if not shape.verified[0] or any(self._added_text and self._added_text.search(c) for c in contents):
            expected = self._render_whole(
                [{"role": r, "content": c} for r, c in zip(roles, contents)],
                add_generation_prompt,
                generation_role,
                thinking,
            )
            if expected != rendered.text:
                raise UnsupportedChatTemplate(
                    f"the chat template rewrites message contents for roles {roles}; "
                    "LatentQA needs contents inserted verbatim to locate turns"
                )
            shape.verified[0] = True
        return rendered

    def _generated_reply(self, messages: list[Message]) -> RenderedDialog:
        """A dialog ending in the target's reply, as the target saw it while generating that reply:
        the prompt with thinking on, then the reply (SPEC case 4: `<think>...</think>` and the
        answer), then the end of its turn. Templates may render a past reply otherwise (DeepSeek-R1
        distills drop its thought), but this is what the model's activations were computed on."""
        prompt = self.render(messages[:-1], add_generation_prompt=True, thinking=True)
        reply = self._as_rendered(messages[-1]["content"])
        # A generation prompt that already opens the thought (ends in "<think>\n") is continued by the reply.
        opened = _overlap(prompt.text[prompt.turn_ends[-1] :], reply)
        if reply.startswith(THOUGHT_OPENING) and opened >= len(THOUGHT_OPENING):
            reply = reply[opened:]
        start = len(prompt.text)
        text = prompt.text + reply + self.reply_end
        return RenderedDialog(
            text,
            [*prompt.turn_starts, prompt.turn_ends[-1]],
            [*prompt.content_spans, (start, start + len(reply))],
            [*prompt.turn_ends, len(text)],
        )

    def _render_whole(
        self, messages: list[Message], add_generation_prompt: bool, generation_role: str | None, thinking: bool
    ) -> str:
        if self.system_placement == "merged" and messages and messages[0]["role"] == "system":
            messages = _merge_system(messages)
        text = self.render_text(messages, add_generation_prompt and generation_role is None, thinking)
        if generation_role is not None:
            text += self.generation_prompt(messages, generation_role)
        return text

    @functools.lru_cache(maxsize=256)  # noqa: B019  one ChatFormat per loaded model; its shapes live as long
    def _shape(
        self, roles: tuple[str, ...], add_generation_prompt: bool, generation_role: str | None, thinking: bool
    ) -> _Shape:
        probes = [f"qzxprobe{k}qzx" for k in range(len(roles))]
        messages = [{"role": r, "content": p} for r, p in zip(roles, probes)]
        merged = self.system_placement == "merged" and roles[:1] == ("system",)
        system_in_user_turn = roles[:1] == ("system",) and self.system_placement != "own_turn" and len(roles) > 1
        text = self._render_whole(messages, add_generation_prompt, generation_role, thinking)
        turns = _merge_system(messages) if merged else messages
        positions = []
        for k, probe in enumerate(probes):
            at = text.find(probe)
            if at < 0:
                raise UnsupportedChatTemplate(
                    f"the chat template drops message {k} (role {roles[k]!r}) from the dialog"
                )
            if positions and at < positions[-1]:
                raise UnsupportedChatTemplate(
                    f"the chat template renders message {k} (role {roles[k]!r}) before message {k - 1} "
                    f"(role {roles[k - 1]!r}); LatentQA needs turns in their order"
                )
            positions.append(at)
        turn_ends = []
        for k, (probe, at) in enumerate(zip(probes, positions)):
            end = at + len(probe)
            if k == 0 and system_in_user_turn:  # the system text ends where the user text begins
                turn_ends.append(positions[1])
                continue
            try:
                alone = self.render_text(turns[: k + 1 - merged], thinking=thinking)
            except Exception as err:  # a template that rejects the dialog cut after this turn
                raise UnsupportedChatTemplate(
                    f"the chat template cannot render the dialog's first {k + 1} messages on their own: {err}"
                ) from err
            turn_ends.append(
                _turn_end(text, end, positions[k + 1] if k + 1 < len(positions) else len(text), alone, probe)
            )
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
        """The text that opens a new turn of `role` after `messages` (whose contents do not matter:
        probes stand in for them, so that the last one can be found)."""
        probed = [{"role": m["role"], "content": f"qzxturn{k}qzx"} for k, m in enumerate(messages)]
        last, new = probed[-1]["content"], _PROBES[3]
        alone = self.render_text(probed)
        full = self.render_text(probed + [{"role": role, "content": new}])
        at = full.find(new)
        if at < 0 or last not in full[:at]:
            raise UnsupportedChatTemplate(f"cannot open a {role!r} turn with this chat template")
        return full[_turn_end(full, full.index(last) + len(last), at, alone, last) : at]

    def placeholder_ids(self, n: int) -> list[int]:
        """Exactly n placeholder token ids (Llama-3: `?` then ` ?`..., as `"? " * n` trimmed gives)."""
        return [self.placeholder_first_id] + [self.placeholder_rest_id] * (n - 1) if n else []

    # ----- tokenizing ------------------------------------------------------------------
    def encode(self, texts: list[str], plain: bool = False) -> list[list[int]]:
        """Token ids of text pieces. Template text holds special tokens; `plain` text (message
        contents) spells out the tokens that mark turns (`turn_markup`): the ids the tokenizer gives
        with special tokens split, so content can never open or close a turn."""
        if not texts:
            return []
        return self._encoder.plain(texts, self.turn_markup) if plain else self._encoder.template(texts)

    def tokenize(
        self, rendered: RenderedDialog, cuts: list[int] = (), fixed: tuple[int, ...] = ()
    ) -> tuple[list[int], list[list[int]]]:
        """A rendered dialog cut at `cuts` and tokenised piece by piece: the piece bounds, and the
        pieces' token ids. Cutting first makes every cut an exact token boundary; the layout cuts
        at turn boundaries, so the ids are those of tokenising the whole text.

        A content holding the text of a turn-markup token is the exception: it is cut out and
        encoded as plain text (`encode`), so that a message can never open or close a turn.

        The contents of messages `fixed` are the same in every dialog (the layout's placeholder and
        acknowledgement): pieces holding no other content recur, and their ids are kept."""
        text = rendered.text
        forged = [
            (a, b) for a, b in rendered.content_spans if self._markup_text and self._markup_text.search(text, a, b)
        ]
        varying = [span for k, span in enumerate(rendered.content_spans) if k not in fixed]
        bounds = sorted({0, *cuts, *(b for span in forged for b in span), len(text)})
        pieces = []
        for start, end in zip(bounds, bounds[1:]):
            piece = text[start:end]
            if forged and any(a <= start and end <= b for a, b in forged):
                pieces.append(self._encoder.plain([piece], self.turn_markup)[0])
            elif any(start < b and a < end for a, b in varying):
                pieces.append(self._encoder.template([piece])[0])
            else:
                pieces.append(self._encoder.recurring(piece))
        return bounds, pieces

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """`messages` up to the assistant's generation prompt, as the target's input ids."""
        _, pieces = self.tokenize(self.render(messages, add_generation_prompt=True))
        return [t for piece in pieces for t in piece]

    # ----- discovery -------------------------------------------------------------------
    def _discover_thinking_switch(self) -> str | None:
        """The template variable (THINKING_SWITCHES) that changes its generation prompt, if any."""
        messages = [{"role": "user", "content": _PROBES[0]}]
        render = lambda **switch: self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **switch
        )
        for name in THINKING_SWITCHES:
            try:
                if render(**{name: True}) != render(**{name: False}):
                    return name
            except Exception:  # a template that rejects this variable has not got this switch
                continue
        return None

    def _discover_trimming(self) -> bool:
        """Whether the template trims message contents (Llama-3, Gemma) or inserts them as given."""
        return f" {_PROBES[0]}\n" not in self.render_text([{"role": "user", "content": f" {_PROBES[0]}\n"}])

    def _as_rendered(self, content: str) -> str:
        return content.strip() if self.trims_contents else content

    def _discover_turn_markup(self) -> frozenset[str]:
        """The tokens that must never come out of a message's content: the special tokens, and the
        added tokens the template writes between contents (DeepSeek's `<｜User｜>` is not marked
        special). Tokens it writes only inside replies (Qwen3's `<think>`) are not among them, nor
        are whitespace tokens (Gemma's `\n`), which mark nothing."""
        added = self.tokenizer.added_tokens_decoder
        pieces = []
        for roles in (("user", "assistant", "user"), ("system", "user")):
            try:
                text = self.render_text([{"role": r, "content": p} for r, p in zip(roles, _PROBES)])
            except UnsupportedChatTemplate:  # no system role: the first dialog shows the markup
                continue
            pieces += re.split("|".join(_PROBES), text)
        written = {
            added[i].content for ids in self.encode(pieces) for i in ids if i in added and added[i].content.strip()
        }
        return frozenset(written | {t.content for t in added.values() if t.special})

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

    def _discover_reply_end(self) -> str:
        """The text that closes an assistant turn (`<|eot_id|>`, `<|im_end|>\n`, ...)."""
        user, answer = _PROBES[0], _PROBES[1]
        text = self.render_text([{"role": "user", "content": user}, {"role": "assistant", "content": answer}])
        return text[text.index(answer) + len(answer) :]

    def _discover_stop_ids(self) -> set[int]:
        """Tokens that end a generated turn: what closes an assistant turn, and EOS."""
        tail = self.encode([self.reply_end])[0]
        stops = {tail[0]} if tail else set()
        if self.tokenizer.eos_token_id is not None:
            stops.add(self.tokenizer.eos_token_id)
        if not stops:
            raise UnsupportedChatTemplate("cannot find a token that ends an assistant turn")
        return stops


def _pattern(texts) -> re.Pattern | None:
    """Matches any of `texts` (longest first), or None where there are none."""
    texts = sorted(set(texts), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, texts))) if texts else None


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id):
        if candidate is not None:
            return int(candidate if not isinstance(candidate, list) else candidate[0])
    return 0


def _merge_system(messages: list[Message]) -> list[Message]:
    system, first, *rest = messages
    merged = {"role": first["role"], "content": f"{system['content'].strip()}\n\n{first['content']}"}
    return [merged, *rest]


def _turn_end(text: str, content_end: int, next_content: int, alone: str, probe: str) -> int:
    """Where the turn whose content (`probe`) ends at `content_end` in `text` ends: as far as the
    text after it agrees with the dialog rendered up to that turn alone (`alone`). Templates may
    render a turn differently depending on what follows (Qwen3's empty thought in the last reply),
    so a dialog's prefix need not render as a prefix of the whole."""
    tail = alone[alone.index(probe) + len(probe) :]
    return content_end + len(_common_prefix(tail, text[content_end:next_content]))


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _overlap(text: str, continuation: str) -> int:
    """The length of the longest start of `continuation` that `text` already ends with."""
    return next((k for k in range(min(len(text), len(continuation)), 0, -1) if text.endswith(continuation[:k])), 0)
