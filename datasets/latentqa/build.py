"""Build `datasets/latentqa/{train,heldout}` from the paper's eval set (Apache-2.0, LICENSE here).

    python datasets/latentqa/build.py --source ../shared/data/latentqa/eval
    python datasets/latentqa/build.py --source ../shared/data/latentqa/eval --complete infra/configs/smollm2-135m-instruct.yaml

Labels, not records, are split: within each label kind (`persona`, `goal`, `sqa`: the label's first
dash-separated word) a seeded 15% of the labels that have records go to `heldout/`, the rest to
`train/`, so no held-out persona or goal is ever trained on. `--complete CONFIG` adds
`stimulus_completion.json` to both splits: each stimulus record with `stimulus_model` set to the
configured target's own reply (greedy, at most 64 new tokens) to `stimulus_user` under the record's
instruction as system prompt (a 135M target follows a system prompt far more reliably than an
instruction given turns earlier), so the decoder also learns to read a persona or goal from the
assistant's reply (SPEC case 4).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECORD_FILES = ("system.json", "stimulus.json", "control.json")
HELDOUT_FRACTION = 0.15
SEED = 0


def split_labels(labels: set[str]) -> set[str]:
    """The held-out labels: a seeded HELDOUT_FRACTION of each kind."""
    by_kind: dict[str, list[str]] = defaultdict(list)
    for label in sorted(labels):
        by_kind[label.split("-")[0]].append(label)
    rng = random.Random(SEED)
    heldout = set()
    for kind in sorted(by_kind):
        heldout.update(rng.sample(by_kind[kind], round(len(by_kind[kind]) * HELDOUT_FRACTION)))
    return heldout


def write_splits(source: Path) -> None:
    qa = json.loads((source / "qa.json").read_text())
    records = {name: json.loads((source / name).read_text()) for name in RECORD_FILES}
    labels = {r["label"] for rows in records.values() for r in rows}
    heldout = split_labels(labels)
    for split, keep in (("train", lambda label: label not in heldout), ("heldout", lambda label: label in heldout)):
        out = HERE / split
        out.mkdir(exist_ok=True)
        kept_labels = set()
        for name, rows in records.items():
            kept = [r for r in rows if keep(r["label"])]
            kept_labels.update(r["label"] for r in kept)
            (out / name).write_text(json.dumps(kept, indent=1, ensure_ascii=False) + "\n")
        (out / "qa.json").write_text(
            json.dumps({k: qa[k] for k in sorted(kept_labels)}, indent=1, ensure_ascii=False) + "\n"
        )
        print(f"{split}: {len(kept_labels)} labels")


def write_completions(config_path: str, max_new_tokens: int = 64, batch_size: int = 16) -> None:
    """stimulus_completion.json per split: each stimulus dialog finished by the target itself."""
    import torch

    from latentqa.config import load_config
    from latentqa.models import load_base, load_tokenizer

    config = load_config(config_path)
    tokenizer = load_tokenizer(config.model)
    tokenizer.padding_side = "left"
    model = load_base(config.model)
    for split in ("train", "heldout"):
        rows = json.loads((HERE / split / "stimulus.json").read_text())
        finished = []
        for start in range(0, len(rows), batch_size):
            part = rows[start : start + batch_size]
            dialogs = [
                [{"role": "system", "content": r["control_user"]}, {"role": "user", "content": r["stimulus_user"]}]
                for r in part
            ]
            texts = [tokenizer.apply_chat_template(d, tokenize=False, add_generation_prompt=True) for d in dialogs]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            with torch.no_grad():
                out = model.generate(
                    **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
            for row, ids in zip(part, out[:, batch["input_ids"].shape[1] :]):
                reply = tokenizer.decode(ids, skip_special_tokens=True).strip()
                finished.append({k: v for k, v in row.items() if k != "control_thought"} | {"stimulus_model": reply})
            print(f"{split}: {len(finished)}/{len(rows)} completions", file=sys.stderr)
        (HERE / split / "stimulus_completion.json").write_text(
            json.dumps(finished, indent=1, ensure_ascii=False) + "\n"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(HERE.parents[1] / ".." / "shared" / "data" / "latentqa" / "eval"))
    parser.add_argument("--complete", metavar="CONFIG", help="also write stimulus_completion.json with this target")
    args = parser.parse_args()
    write_splits(Path(args.source))
    if args.complete:
        write_completions(args.complete)


if __name__ == "__main__":
    main()
