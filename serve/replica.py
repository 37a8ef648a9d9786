"""The `ModelReplica` deployment: one base model per replica. Decoders and control adapters are
Serve-multiplexed on it (LRU, `max_adapters_per_replica`), reads are batched (`Batcher`),
and all model work runs on one worker thread so the replica's event loop keeps answering."""

import asyncio
import contextlib
import sys
import tempfile
import threading
import uuid
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve

from latentqa.model_files import WrongTarget
from latentqa_platform import console
from latentqa_platform.adapters import AdapterCatalog, SharedAdapters
from latentqa_platform.batching import Batcher
from latentqa_platform.serving import RequestError, ServeSettings, Unavailable, check_tokens


class ServedAdapter:
    """One multiplexed adapter on a replica. Serve's LRU evicts it by calling __del__, but the
    requests using it hold it, and it is unmounted only when the last of them is done: a read
    queued behind an eviction never finds its decoder gone. (Held adapters may briefly exceed
    `max_adapters_per_replica`, by at most the requests in flight.)"""

    def __init__(self, replica: "ModelReplica", peft_name: str, read_layer: int):
        self.replica, self.peft_name, self.read_layer = replica, peft_name, read_layer
        self.holders, self.evicted = 0, False
        self.lock = threading.Lock()  # Serve runs __del__ on an executor thread

    @contextlib.contextmanager
    def held(self) -> Iterator["ServedAdapter"]:
        with self.lock:
            self.holders += 1
        try:
            yield self
        finally:
            with self.lock:
                self.holders -= 1
                last = self.evicted and self.holders == 0
            if last:
                self._unmount()

    def __del__(self):  # Serve's eviction, then the garbage collector: once is enough
        with self.lock:
            self.evicted = True
            idle = self.holders == 0
        if idle:
            self._unmount()

    def _unmount(self) -> None:
        with self.lock:
            name, self.peft_name = self.peft_name, ""
        if name and self.replica.work is not None:  # behind any model work in flight, on its one thread
            self.replica.work.submit(self.replica.adapters.unload, name)


@contextlib.contextmanager
def _fields_as(renames: dict[str, str]) -> Iterator[None]:
    """A check written for one request's body run on another's: its errors blame the fields
    under their names there (`renames`: old field prefix -> new)."""
    try:
        yield
    except RequestError as err:
        for old, new in renames.items():
            if err.field == old or err.field.startswith(old + "."):
                raise type(err)(new + err.field[len(old) :], err.message) from None
        raise


@dataclass(frozen=True)
class ReadJob:
    adapter: ServedAdapter
    dialogs: list[list[dict]]
    questions: list[str]
    read_layer: int
    max_new_tokens: int


@serve.deployment(name="ModelReplica", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32)
class ModelReplica:
    def __init__(self, settings: dict):
        from latentqa.session import LatentQA

        self.work = None
        self.settings = ServeSettings.model_validate(settings)
        if not self.settings.verbose:
            console.quiet_replica()
        uri = self.settings.tracking_uri()
        self.catalogs = {
            "decoder": AdapterCatalog("decoder", self.settings.decoders, uri),
            "control": AdapterCatalog("control", self.settings.controls, uri),
        }
        config = self.settings.engine_config()
        with tempfile.TemporaryDirectory() as tmp:
            default_id = self.catalogs["decoder"].locate(self.settings.decoder_name(), "decoder")
            fetched = self.catalogs["decoder"].fetch(default_id, Path(tmp))
            self.lqa = LatentQA.load(config, fetched.folder)
        # The default decoder stays in the engine's own "decoder" slot; others are multiplexed.
        self.adapters = self.lqa.model.adapters = SharedAdapters(self.lqa.model.adapters)
        self.default = ServedAdapter(self, "decoder", self._read_layer(fetched))
        self.default_id = default_id
        self.work = ThreadPoolExecutor(1, thread_name_prefix="latentqa-model")

        async def load(adapter_id: str) -> ServedAdapter:  # multiplexed() keeps its cache on a plain function
            return await self._load(adapter_id)

        self.adapter = serve.multiplexed(max_num_models_per_replica=self.settings.max_adapters_per_replica)(load)
        self.read_batch = Batcher(self._read_many, self.settings.max_batch_size, self.settings.batch_wait_timeout_s)

    def _read_layer(self, fetched) -> int:
        """A decoder reads at the layer it was trained for, unless a request says otherwise; it
        must write where this replica patches."""
        config = fetched.config or self.settings.engine_config()
        served = self.settings.engine_config().patch
        if (config.patch.write_layer, config.patch.mode) != (served.write_layer, served.mode):
            raise RequestError(
                "decoder",
                f"trained to write at block {config.patch.write_layer} ({config.patch.mode}); "
                f"this app patches block {served.write_layer} ({served.mode})",
            )
        return config.patch.read_layer

    async def _run(self, fn, *args):
        import torch

        try:
            return await asyncio.get_running_loop().run_in_executor(self.work, fn, *args)
        except torch.OutOfMemoryError:  # this request's size on this replica now: a retry may fit
            torch.cuda.empty_cache()
            raise Unavailable("model", "out of memory for this request; retry later, or send less") from None

    async def _load(self, adapter_id: str) -> ServedAdapter:
        # Shielded: a client gone mid-load cancels this request, not the mount; the adapter is then
        # unmounted at once instead of staying on the base with nothing left to evict it.
        mounting = asyncio.ensure_future(self._mount(adapter_id))
        try:
            return await asyncio.shield(mounting)
        except asyncio.CancelledError:
            mounting.add_done_callback(lambda done: done.cancelled() or done.exception() or done.result()._unmount())
            raise

    async def _mount(self, adapter_id: str) -> ServedAdapter:
        kind = "control" if adapter_id.startswith("control:") else "decoder"
        with tempfile.TemporaryDirectory() as tmp:  # the weights are in memory once loaded
            fetched = await asyncio.to_thread(self.catalogs[kind].fetch, adapter_id, Path(tmp))
            read_layer = self._read_layer(fetched) if kind == "decoder" else 0
            peft_name = f"a{uuid.uuid4().hex[:12]}"
            try:  # checked before anything is added to the base
                await self._run(self.adapters.load, fetched.folder, peft_name)
            except WrongTarget as err:  # the client's choice of adapter, named without the server's folder
                field, name = ("decoder", "decoder") if kind == "decoder" else ("model", "control")
                message = f"this {name} was trained on {err.trained}, but this server's target is {err.loaded}"
                raise RequestError(field, message) from None
        return ServedAdapter(self, peft_name, read_layer)

    @contextlib.asynccontextmanager
    async def _routed_adapter(self, default: ServedAdapter | None = None):
        """The adapter this request was routed for (its multiplexed id; `default` without one, None
        for the bare target), held while the request uses it."""
        adapter_id = serve.get_multiplexed_model_id()
        if not adapter_id:
            adapter = default
        else:
            adapter = self.default if adapter_id == self.default_id else await self.adapter(adapter_id)
        if adapter is None:
            yield None
            return
        with adapter.held():
            yield adapter

    # ----- the per-request work limits (serve/README.md), checked before batching so that one
    # bad request never fails the others in its batch
    def _tokens(self, text: str) -> int:
        return len(self.lqa.chat_format.encode([text], plain=True)[0])

    @property
    def _context(self) -> int:
        return self.lqa.layout.max_length or sys.maxsize

    def _check_dialogs(self, dialogs: list[list[dict]], field: str) -> list[int]:
        """Each turn and each whole dialog as the target reads it within the limits; returns each
        dialog's read span length (the decoder's placeholders)."""
        from latentqa.reading import dialog_to_read

        limit = min(self.settings.max_dialog_tokens, self._context)
        spans = []
        for d, dialog in enumerate(dialogs):
            turns = {f"{field}.{d}.{m}.content": message["content"] for m, message in enumerate(dialog)}
            check_tokens(self._tokens, turns, self.settings.max_turn_tokens)
            try:
                side = self.lqa.layout.read_side(dialog_to_read(dialog))
            except Exception as err:  # a role or shape the chat template rejects
                raise RequestError(f"{field}.{d}", str(err)) from None
            if len(side.ids) > limit:
                raise RequestError(f"{field}.{d}", f"{len(side.ids)} tokens as the target reads it; at most {limit}")
            spans.append(side.patched_span[1] - side.patched_span[0])
        return spans

    def _layer_for(self, adapter: ServedAdapter, read_layer: int | None) -> int:
        """The layer a request reads (its own, else the decoder's), checked against the target."""
        layer = adapter.read_layer if read_layer is None else read_layer
        self._check_layer(layer)
        return layer

    def _check_layer(self, read_layer: int, field: str = "read_layer") -> None:
        if not 0 <= read_layer < self.lqa.model.num_layers:
            raise RequestError(field, f"{read_layer} is outside the target's {self.lqa.model.num_layers} blocks")

    def _check_read(
        self, dialogs: list[list[dict]], questions: list[str], max_new_tokens: int, layers: int = 1
    ) -> None:
        """`layers`: the read layers each answer is generated at (a layer map)."""
        spans = self._check_dialogs(dialogs, "dialogs")
        check_tokens(
            self._tokens, {f"questions.{q}": text for q, text in enumerate(questions)}, self.settings.max_turn_tokens
        )
        generated = len(dialogs) * len(questions) * max_new_tokens * layers
        budget = self.settings.max_generated_tokens
        if generated > budget:
            at_layers = f" × {layers} layers" if layers > 1 else ""
            raise RequestError(
                "max_new_tokens",
                f"{len(dialogs)} dialogs × {len(questions)} questions × {max_new_tokens} new tokens{at_layers} is "
                f"{generated}; a read may generate at most {budget}",
            )
        longest = max(questions, key=self._tokens)
        prompts = [len(self.lqa.layout.write_side(span, longest, None, "generate").ids) for span in spans]
        for d, prompt in enumerate(prompts):
            if prompt + max_new_tokens > self._context:
                raise RequestError(
                    f"dialogs.{d}",
                    f"the decoder's prompt ({prompt} tokens) and {max_new_tokens} new tokens exceed the target's "
                    f"context of {self._context}",
                )
        # every answer prefills its own decoder prompt: bounded as the generated tokens are (the
        # longest question's prompt stands for each dialog's, an upper bound)
        prefilled = sum(prompts) * len(questions) * layers
        if prefilled > self.settings.max_prefill_tokens:
            at_layers = f" × {layers} layers" if layers > 1 else ""
            raise RequestError(
                "questions",
                f"{len(dialogs)} dialogs × {len(questions)} questions{at_layers} make up to {prefilled} decoder "
                f"prompt tokens; a read may prefill at most {self.settings.max_prefill_tokens}",
            )

    def _check_score(
        self,
        dialog: list[dict],
        question: str,
        candidates: list[str],
        layers: int = 1,
        contrast: list[dict] | None = None,
    ) -> None:
        """`layers`: the read layers every candidate is scored at (a layer map); `contrast`: the
        shuffled baseline's dialog (the candidates are then scored with its activations and with none too)."""
        [span] = self._check_dialogs([dialog], "dialog")
        texts = {"question": question, **{f"candidates.{c}": text for c, text in enumerate(candidates)}}
        check_tokens(self._tokens, texts, self.settings.max_turn_tokens)
        lengths = self._scored_lengths(span, question, candidates)
        scored, passes = layers * sum(lengths), f" at {layers} layers" if layers > 1 else ""
        if contrast is not None:
            [contrast_span] = self._check_dialogs([contrast], "contrast_dialog")
            scored += sum(lengths) + sum(self._scored_lengths(contrast_span, question, candidates))
            passes = " with the two baselines"
        if scored > self.settings.max_scored_tokens:
            raise RequestError(
                "candidates",
                f"{len(candidates)} candidates{passes} make {scored} decoder tokens; a score may run at most "
                f"{self.settings.max_scored_tokens}",
            )

    def _scored_lengths(self, span: int, question: str, candidates: list[str]) -> list[int]:
        """Each candidate's decoder tokens after a read span of `span` placeholders, within the context."""
        lengths = [len(self.lqa.layout.write_side(span, question, text, "score").ids) for text in candidates]
        for c, length in enumerate(lengths):
            if length > self._context:
                raise RequestError(
                    f"candidates.{c}", f"{length} decoder tokens; the target's context is {self._context}"
                )
        return lengths

    async def read(self, dialogs: list[list[dict]], questions: list[str], read_layer: int | None, max_new_tokens: int):
        async with self._routed_adapter(self.default) as adapter:
            layer = self._layer_for(adapter, read_layer)
            self._check_read(dialogs, questions, max_new_tokens)
            return layer, await self.read_batch(ReadJob(adapter, dialogs, questions, layer, max_new_tokens))

    async def _read_many(self, jobs: list[ReadJob]) -> list[list[list[str]]]:
        """One engine `read` per (decoder, layer, length) group of the batch: the target pass is
        shared by every dialog of the group. Each adapter is held for the whole batch: were its
        callers gone mid-batch, an evicted adapter would otherwise be unmounted before its group ran."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            groups[(job.adapter.peft_name, job.read_layer, job.max_new_tokens)].append(i)
        results: list[Any] = [None] * len(jobs)
        with contextlib.ExitStack() as holding:
            for adapter in {id(job.adapter): job.adapter for job in jobs}.values():
                holding.enter_context(adapter.held())
            for (peft_name, layer, max_new), members in groups.items():
                dialogs = [d for i in members for d in jobs[i].dialogs]
                questions = [jobs[i].questions for i in members for _ in jobs[i].dialogs]
                answers = await self._run(self._read_group, peft_name, dialogs, questions, layer, max_new)
                for i in members:
                    results[i], answers = answers[: len(jobs[i].dialogs)], answers[len(jobs[i].dialogs) :]
        return results

    def _read_group(self, peft_name, dialogs, questions, layer, max_new_tokens):
        from latentqa.reading import read

        with self.adapters.routed(decoder=peft_name):
            return read(
                self.lqa,
                dialogs,
                questions,
                read_layer=layer,
                max_new_tokens=max_new_tokens,
                batch_size=self.settings.max_batch_size,
            )

    async def score(self, dialog: list[dict], question: str, candidates: list[str], read_layer: int | None):
        from latentqa.reading import score

        async with self._routed_adapter(self.default) as adapter:
            layer = self._layer_for(adapter, read_layer)
            self._check_score(dialog, question, candidates)

            def run():
                with self.adapters.routed(decoder=adapter.peft_name):
                    ranked = score(self.lqa, dialog, question, candidates, read_layer=layer)
                    return [(s.answer, s.loss) for s in ranked]

            return layer, await self._run(run)

    async def score_baselines(
        self, dialog: list[dict], question: str, candidates: list[str], read_layer: int | None, contrast: list[dict]
    ):
        """Each candidate's loss with the dialog's activations, the `contrast` dialog's and none
        (`latentqa.reading.score_baselines`), best (with the dialog's) first."""
        from latentqa.reading import score_baselines

        async with self._routed_adapter(self.default) as adapter:
            layer = self._layer_for(adapter, read_layer)
            self._check_score(dialog, question, candidates, contrast=contrast)

            def run():
                with self.adapters.routed(decoder=adapter.peft_name):
                    losses = score_baselines(self.lqa, dialog, question, candidates, contrast, read_layer=layer)
                rows = [
                    {"answer": answer, "loss": true, "loss_shuffled": shuffled, "loss_none": none}
                    for answer, true, shuffled, none in zip(
                        candidates, losses["true"], losses["shuffled"], losses["none"]
                    )
                ]
                return sorted(rows, key=lambda row: row["loss"])

            return layer, await self._run(run)

    async def layer_map(
        self,
        dialog: list[dict],
        question: str,
        candidates: list[str] | None,
        layers: list[int] | None,
        max_new_tokens: int,
    ):
        """The answer (or, given `candidates`, their losses) with activations read at each of
        `layers` (default: every block), from one target pass; the work counts once per layer."""
        from latentqa.reading import read_layers, score_layers

        async with self._routed_adapter(self.default) as adapter:
            for i, layer in enumerate(layers or []):
                self._check_layer(layer, f"layers.{i}")
            layers = sorted(set(layers or range(self.lqa.model.num_layers)))
            if candidates:
                self._check_score(dialog, question, candidates, layers=len(layers))
            else:
                with _fields_as({"dialogs.0": "dialog", "questions.0": "question"}):
                    self._check_read([dialog], [question], max_new_tokens, layers=len(layers))

            def run():
                with self.adapters.routed(decoder=adapter.peft_name):
                    if candidates:
                        losses = score_layers(self.lqa, dialog, question, candidates, layers)
                        return [{"layer": layer, "losses": losses[layer]} for layer in layers]
                    answers = read_layers(self.lqa, dialog, question, layers, max_new_tokens)
                    return [{"layer": layer, "answer": answers[layer]} for layer in layers]

            return adapter.read_layer, await self._run(run)

    # ----- chat: the target (with or without a control adapter) as a chat model
    def _prompt(self, messages: list[dict], max_tokens: int) -> list[int]:
        self._check_dialogs([messages], "messages")
        prompt = self.lqa.chat_format.prompt_ids(messages)
        if len(prompt) + max_tokens > self._context:
            raise RequestError(
                "max_tokens",
                f"the prompt's {len(prompt)} tokens and {max_tokens} more exceed the context of {self._context}",
            )
        return prompt

    def _generate(self, peft_name: str | None, prompt: list[int], options: dict, streamer=None) -> list[int]:
        import torch

        ids = torch.tensor([prompt], device=self.lqa.device)
        sampling = {"do_sample": False}
        if options["temperature"] > 0:
            sampling = {"do_sample": True, "temperature": options["temperature"], "top_p": options["top_p"]}
            if options["seed"] is not None:
                torch.manual_seed(options["seed"])
        with self.adapters.use(peft_name), torch.no_grad():
            out = self.lqa.model.peft_model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=options["max_tokens"],
                eos_token_id=sorted(self.lqa.stop_ids),
                pad_token_id=self.lqa.chat_format.pad_id,
                streamer=streamer,
                **sampling,
            )
        return out[0, len(prompt) :].tolist()

    def _finish(self, tokens: list[int]) -> tuple[list[int], str]:
        for i, token in enumerate(tokens):
            if token in self.lqa.stop_ids:
                return tokens[:i], "stop"
        return tokens, "length"

    async def chat(self, messages: list[dict], options: dict) -> dict:
        async with self._routed_adapter() as adapter:
            prompt = self._prompt(messages, options["max_tokens"])
            generated = await self._run(self._generate, adapter and adapter.peft_name, prompt, options)
        tokens, finish = self._finish(generated)
        return {
            "text": self.lqa.decode(tokens),
            "prompt_tokens": len(prompt),
            "completion_tokens": len(tokens),
            "finish": finish,
        }

    async def chat_stream(self, messages: list[dict], options: dict):
        """Text deltas as the target generates them, then {"finish": reason}."""
        from transformers import AsyncTextIteratorStreamer

        async with self._routed_adapter() as adapter:
            prompt = self._prompt(messages, options["max_tokens"])
            streamer = AsyncTextIteratorStreamer(self.lqa.tokenizer, skip_prompt=True, skip_special_tokens=True)

            async def generate():
                try:
                    return await self._run(self._generate, adapter and adapter.peft_name, prompt, options, streamer)
                finally:  # a generation that raised never ends its streamer, and the loop below would wait forever
                    streamer.end()

            generation = asyncio.ensure_future(generate())
            async for text in streamer:
                if text:
                    yield {"delta": text}
            _, finish = self._finish(await generation)
        yield {"finish": finish}
