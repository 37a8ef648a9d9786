"""Read a JSONL of dialogs with a decoder on a Ray cluster: Ray Data in, one JSONL shard out per
input shard, resumable.

    python jobs/read.py --input dialogs.jsonl --output out/ --decoder models:/latentqa-decoder-tiny-llama@champion \
        --question "What persona will the assistant adopt?" --question "What is the assistant trying to do?"
    ray job submit --working-dir . -- python jobs/read.py --input /abs/dialogs.jsonl --output /abs/out ...

Input lines: {"id": ..., "messages": [{"role", "content"}, ...]} (or the bare list of messages).
Output: `out/shard-00000.jsonl`, ... with {"id", "messages", "answers": {question: answer}} per line,
in input order, and `out/job.json` (what was asked). Each shard file appears, complete, when its
shard is done (written aside, then renamed), so rerunning the same command does only the shards
that are missing; a different job against the same `--output` is refused, nothing is overwritten.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import ray
from pydantic import TypeAdapter, ValidationError

from latentqa.config import ConfigError
from latentqa.data import DEFAULT_QUESTIONS
from latentqa_platform import tracking
from latentqa_platform.batchjobs import connect, job_tracking_uri, parse, run_main
from latentqa_platform.files import write_whole
from latentqa_platform.serving import Dialog


def _arguments(parser) -> None:
    parser.add_argument("--input", type=Path, required=True, help="JSONL of dialogs")
    parser.add_argument("--output", type=Path, required=True, help="folder for the answer shards (created)")
    parser.add_argument("--decoder", required=True, help="models:/name@alias, models:/name/N or a PEFT folder")
    parser.add_argument("--question", action="append", help=f"repeatable (default: {DEFAULT_QUESTIONS})")
    parser.add_argument("--shard-size", type=int, default=64, help="dialogs per output shard")
    parser.add_argument("--layer", type=int, help="read layer (default: the config's patch.read_layer)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="longest answer, in tokens")


def load_dialogs(path: Path) -> list[dict]:
    """Every line validated before Ray starts; errors name the file, line and field."""
    check = TypeAdapter(Dialog)
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            row = row if isinstance(row, dict) else {"messages": row}
            messages = check.validate_python(row.get("messages"))
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: line {number}: not JSON: {err}") from None
        except ValidationError as err:
            where = ".".join(str(p) for p in err.errors()[0]["loc"])
            raise ConfigError(
                f"{path}: line {number}: field messages{'.' + where if where else ''}: {err.errors()[0]['msg']}"
            ) from None
        rows.append({"id": row.get("id", number), "messages": [m.model_dump() for m in messages]})
    if not rows:
        raise ConfigError(f"{path}: no dialogs")
    return rows


class ShardReader:
    """A Ray Data actor: one session per actor, one output file per shard."""

    def __init__(self, config_json: str, decoder: str, registry: str, job: dict, output: str):
        from latentqa import LatentQA, LatentQAConfig

        self.lqa = LatentQA.load(LatentQAConfig.model_validate_json(config_json), decoder, registry=registry)
        self.job, self.output = job, Path(output)

    def __call__(self, batch: dict) -> dict:
        from latentqa.reading import read

        questions = self.job["questions"]
        for shard, rows_json in zip(batch["shard"], batch["rows"]):
            rows = json.loads(rows_json)
            answers = read(
                self.lqa,
                [r["messages"] for r in rows],
                questions,
                read_layer=self.job["layer"],
                max_new_tokens=self.job["max_new_tokens"],
            )
            lines = [
                json.dumps({**r, "answers": dict(zip(questions, a))}, ensure_ascii=False) for r, a in zip(rows, answers)
            ]
            write_whole(self.output / f"shard-{int(shard):05d}.jsonl", "\n".join(lines) + "\n")  # complete or absent
        return {"shard": batch["shard"]}


def main(argv: list[str] | None = None) -> int:
    args, config, settings = parse(
        "jobs/read.py", "Read a JSONL of dialogs with a decoder, in resumable shards.", argv, _arguments
    )
    if args.shard_size < 1:
        raise ConfigError("--shard-size must be at least 1")
    rows = load_dialogs(args.input)
    decoder = tracking.pinned(args.decoder, job_tracking_uri(config, settings))  # one version for every worker
    job = {
        "input_sha256": hashlib.sha256(args.input.read_bytes()).hexdigest(),
        "decoder": decoder,
        "questions": args.question or DEFAULT_QUESTIONS,
        "shard_size": args.shard_size,
        "layer": args.layer,
        "max_new_tokens": args.max_new_tokens,
        "config": json.loads(config.model_dump_json()),
    }
    output = args.output.resolve()
    output.mkdir(parents=True, exist_ok=True)
    record = output / "job.json"
    if record.exists() and json.loads(record.read_text()) != job:
        raise ConfigError(f"{output} holds the shards of a different job (see its job.json); choose a new --output")
    write_whole(record, json.dumps(job, indent=2))
    shards = [rows[i : i + args.shard_size] for i in range(0, len(rows), args.shard_size)]
    pending = [
        {"shard": k, "rows": json.dumps(s)}
        for k, s in enumerate(shards)
        if not (output / f"shard-{k:05d}.jsonl").exists()
    ]
    print(
        f"{len(rows)} dialogs in {len(shards)} shards; {len(pending)} to read, {len(shards) - len(pending)} already done"
    )
    if pending:
        connect(args, settings, output / "console.log")
        done = (
            ray.data.from_items(pending)
            .map_batches(
                ShardReader,
                fn_constructor_kwargs={
                    "config_json": config.model_dump_json(),
                    "decoder": decoder,
                    "registry": job_tracking_uri(config, settings),
                    "job": job,
                    "output": str(output),
                },
                batch_size=1,
                concurrency=settings.ray.num_workers,
                num_cpus=settings.ray.cpus_per_worker,
                num_gpus=1 if settings.ray.use_gpu else 0,
            )
            .take_all()
        )
        print(f"read {len(done)} shards")
    print(f"answers in {output}/shard-*.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
