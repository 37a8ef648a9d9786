"""`latentqa`: the engine on the command line, single process, no Ray.

Every subcommand runs on the offline default (the project's tiny Llama and its dataset) when
given no arguments. Configuration: `--config FILE.yaml` plus dotted overrides such as
`--train.lr 3e-4 --patch.read_layer 1` (see `latentqa.config`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .chat_format import UnsupportedChatTemplate
from .config import ConfigError, LatentQAConfig, engine_sections, fields_help, load_config
from .data import DEFAULT_QUESTIONS, DataError, Example, Record, load_examples, read_dialog
from .layout import LayoutError
from .mixes import mix_examples
from .model_files import ModelFileError, WrongTarget
from .paths import CONTROLS_DIR, RUNS_DIR, STEER_PROMPTS, latest_decoder


def _config(args: argparse.Namespace, overrides: list[str]) -> LatentQAConfig:
    config = load_config(args.config, overrides)
    if getattr(args, "decoder", None):
        config.model.decoder_adapter = args.decoder
    return config


def _load(config: LatentQAConfig, train_decoder: bool = False):
    from .session import LatentQA  # torch and transformers load only when a model is needed

    decoder = None
    if not train_decoder and config.model.decoder_adapter is None:
        decoder = latest_decoder()
        print(f"using the latest decoder: {decoder}", file=sys.stderr)
    return LatentQA.load(config, decoder, train_decoder=train_decoder)


# ----- subcommands ---------------------------------------------------------------------
def cmd_inspect_batch(args: argparse.Namespace, overrides: list[str]) -> None:
    from transformers import AutoTokenizer

    from .chat_format import ChatFormat
    from .layout import Layout

    layout = Layout(ChatFormat(AutoTokenizer.from_pretrained(args.tokenizer)), thought_tokens=args.thought_tokens)
    for line_no, line in enumerate(Path(args.input).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        try:
            example = Example(Record.model_validate(row["record"]), row["question"], row.get("answer") or "")
        except (KeyError, ValueError) as err:
            raise DataError(f"{args.input}: line {line_no}: {err}") from None
        print(json.dumps(layout.example(example, row["mode"]).as_json()))


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> None:
    from tqdm import tqdm

    from .evaluation import evaluate
    from .models import DECODER
    from .strategy import Strategy
    from .training import (
        ExampleSize,
        StepPlan,
        TrainProgress,
        adamw_factory,
        cosine_with_warmup,
        fit,
        length_grouped_order,
        strategy_config,
    )

    config = _config(args, overrides)
    train_cfg = config.train
    run_dir = Path(train_cfg.output_dir) / (args.run_name or f"{train_cfg.run_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    out = run_dir / "decoder"
    if out.exists():
        raise SystemExit(f"{out} exists already; pick another --run-name so nothing saved is overwritten")
    train_examples = load_examples(config.data.train) + mix_examples(config.data.mix)
    eval_examples = load_examples(config.data.eval) if config.data.eval else None
    lqa = _load(config, train_decoder=True)
    laid = lqa.lay_out(train_examples, "train")
    sizes = [ExampleSize.of(e) for e in laid]

    def epoch_order(epoch: int) -> list[list[int]]:
        return length_grouped_order(sizes, train_cfg, train_cfg.seed + epoch)

    plan = StepPlan.of([len(epoch_order(epoch)) for epoch in range(train_cfg.epochs)], train_cfg)
    total = plan.total_steps

    def epoch_batches(epoch: int, skip: int):
        for indices in epoch_order(epoch)[skip:]:
            yield lqa.collate([laid[i] for i in indices])

    strategy = Strategy.create(strategy_config(config, "local"))
    strategy.prepare(
        lqa.model, adamw_factory(train_cfg), lambda opt: cosine_with_warmup(opt, train_cfg.warmup_steps, total)
    )

    def run_eval() -> dict[str, float]:
        with strategy.averaged_weights():
            return evaluate(
                lqa, eval_examples, batch_size=train_cfg.batch_size, max_batches=train_cfg.eval_batches
            ).as_metrics()

    bar = tqdm(total=total, desc="train", unit="step")

    def on_step(progress: TrainProgress, metrics: dict[str, float]) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['train/loss']:.3f}")
        if "eval/loss_true" in metrics:
            bar.write(_format_metrics(progress.step, metrics))

    first = run_eval() if eval_examples else {}
    if first:
        print(_format_metrics(0, first))
    fit(
        strategy,
        epoch_batches,
        plan,
        train_cfg,
        config.patch,
        TrainProgress(),
        run_eval if eval_examples else None,
        on_step,
    )
    bar.close()
    last = run_eval() if eval_examples else {}
    if last:
        print(_format_metrics(total, last))
    with strategy.averaged_weights():
        lqa.model.adapters.save(DECODER, out)
    (run_dir / "config.json").write_text(config.model_dump_json(indent=2))
    (run_dir / "metrics.json").write_text(json.dumps({"before": first, "after": last}, indent=2))
    print(f"decoder saved to {out}")


def _format_metrics(step: int, metrics: dict[str, float]) -> str:
    keys = ("eval/loss_true", "eval/loss_shuffled", "eval/loss_none", "eval/activation_gain")
    return f"step {step}: " + "  ".join(f"{k.split('/')[1]}={metrics[k]:.3f}" for k in keys if k in metrics)


def _held_out_dialogs(config: LatentQAConfig, count: int) -> tuple[list[list[dict]], list[str]]:
    if config.data.eval is None:
        raise SystemExit("no --dialog given and no held-out set configured (data.eval)")
    examples = load_examples(config.data.eval)
    seen, dialogs, labels = set(), [], []
    for example in examples:
        if example.record.label not in seen and not example.record.system and not example.record.control_model:
            seen.add(example.record.label)
            dialogs.append(read_dialog(example.record).messages)
            labels.append(example.record.label)
        if len(dialogs) == count:
            break
    return dialogs, labels


def _dialogs_from(args: argparse.Namespace, config: LatentQAConfig) -> tuple[list[list[dict]], list[str]]:
    if args.dialog:
        return [json.loads(args.dialog)], ["--dialog"]
    if args.dialogs:
        rows = [json.loads(line) for line in Path(args.dialogs).read_text().splitlines() if line.strip()]
        return [row["messages"] if isinstance(row, dict) else row for row in rows], [str(i) for i in range(len(rows))]
    return _held_out_dialogs(config, args.count)


def cmd_read(args: argparse.Namespace, overrides: list[str]) -> None:
    from .reading import read

    config = _config(args, overrides)
    dialogs, names = _dialogs_from(args, config)
    lqa = _load(config)
    questions = args.question or DEFAULT_QUESTIONS
    answers = read(lqa, dialogs, questions, read_layer=args.layer, max_new_tokens=args.max_new_tokens)
    for name, dialog, dialog_answers in zip(names, dialogs, answers):
        print(
            json.dumps(
                {"dialog": name, "messages": dialog, "answers": dict(zip(questions, dialog_answers))},
                ensure_ascii=False,
            )
        )


def cmd_score(args: argparse.Namespace, overrides: list[str]) -> None:
    from .reading import score

    config = _config(args, overrides)
    dialogs, _ = _dialogs_from(args, config)
    lqa = _load(config)
    for scored in score(lqa, dialogs[0], args.question, args.candidates, read_layer=args.layer):
        print(json.dumps({"answer": scored.answer, "loss": round(scored.loss, 4)}))


def _controls_folder(control: Path) -> Path:
    """Where a control's adapters go when no folder is given: a new one under runs/controls/."""
    return RUNS_DIR / "controls" / f"{control.stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def cmd_steer(args: argparse.Namespace, overrides: list[str]) -> None:
    from .data import read_prompt_set
    from .steering import load_control, steer
    from .steering_evaluation import SteeringEvaluation

    config = _config(args, overrides)
    control = load_control(args.control)
    if not control.qa:
        raise ConfigError(f"{args.control}: qa: no control pairs (jobs/control.py reads them from the instruction)")
    train_prompts, heldout = read_prompt_set(args.prompts)
    out = Path(args.out or _controls_folder(args.control))
    lqa = _load(config)
    evaluation = SteeringEvaluation(lqa, control, heldout) if heldout else None
    result = steer(
        lqa, control.qa, train_prompts, out, on_step=lambda step, loss: print(f"step {step}: control loss {loss:.3f}")
    )
    print(f"control adapter saved to {result.adapter_dir}")
    if evaluation is None:
        return
    measured = evaluation.result([evaluation.steered()])
    for prompt, before, after in list(zip(heldout, *(c.replies for c in measured.conditions)))[: args.show]:
        print(json.dumps({"prompt": prompt, "target": before, "steered": after}, ensure_ascii=False))
    print(measured.table())
    problem = measured.degenerate(config.steer)
    if problem:
        raise SystemExit(f"error: {problem} (adapter kept in {result.adapter_dir}; see docs/steering.md)")


def cmd_evaluate_steering(args: argparse.Namespace, overrides: list[str]) -> None:
    from .data import read_prompt_set
    from .models import CONTROL
    from .steering import load_control, steer
    from .steering_evaluation import SteeringEvaluation

    config = _config(args, overrides)
    control = load_control(args.control)
    if not control.qa and not args.adapter:
        raise ConfigError(f"{args.control}: qa: no control pairs to train on (give --adapter to evaluate one)")
    if args.adapter and args.seeds:
        raise ConfigError("give --adapter (evaluate that one) or --seeds (train one per seed), not both")
    seeds = args.seeds or [config.steer.seed]
    train_prompts, heldout = read_prompt_set(args.prompts)
    if not heldout:
        raise ConfigError(f"{args.prompts}: no held-out prompts to evaluate on")
    lqa = _load(config)
    evaluation = SteeringEvaluation(lqa, control, heldout, args.max_new_tokens)
    rows = evaluation.baselines(train_prompts)
    if args.adapter:
        lqa.model.adapters.load_frozen(args.adapter, CONTROL)
        rows.append(evaluation.steered())
    else:
        out = args.output or _controls_folder(args.control)
        for seed in seeds:
            cfg = config.steer.model_copy(update={"seed": seed})
            steer(lqa, control.qa, train_prompts, Path(out) / f"adapter-seed{seed}", cfg)
            rows.append(evaluation.steered("steered" if len(seeds) == 1 else f"steered-seed{seed}"))
    lqa.model.adapters.remove_control()
    result = evaluation.result(rows)
    print(result.table())
    if args.output:
        print(f"report in {result.write(args.output)}", file=sys.stderr)
    print(json.dumps({"spread": result.spread(), "matched_vector": result.matched_vector, **result.as_metrics("")}))


def cmd_evaluate(args: argparse.Namespace, overrides: list[str]) -> None:
    from .suite import run_suite

    config = _config(args, overrides)
    if config.data.eval is None:
        raise SystemExit("no held-out set configured (data.eval)")
    lqa = _load(config)
    result = run_suite(lqa, config.data.eval, **suite_options(args))
    if args.output:
        print(f"results, per-item table and figures in {result.write(args.output)}", file=sys.stderr)
    print(json.dumps(result.as_metrics(prefix="")))


# ----- parser --------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latentqa",
        description=(
            "Train and run LatentQA decoders: a LoRA copy of a chat model that reads the model's "
            "activations and answers questions about them. With no arguments every command uses the "
            "offline default (the project's tiny Llama, tokenizer and dataset). Any config field can be "
            "overridden as --section.field VALUE (e.g. --train.lr 3e-4, --model.path DIR)."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str, func) -> argparse.ArgumentParser:
        configured = name != "inspect-batch"
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=fields_help(engine_sections(), {"strategy.kind": "local"}) if configured else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(func=func)
        if configured:
            p.add_argument("--config", type=Path, help="YAML config (e.g. infra/configs/llama3-8b-ddp.yaml)")
        return p

    p = add(
        "inspect-batch",
        "print the token layout of each input line (mode, record, question, answer) as JSON",
        cmd_inspect_batch,
    )
    p.add_argument("--tokenizer", required=True, help="tokenizer folder with a chat template")
    p.add_argument("--input", required=True, help="JSONL of {mode, record, question, answer}")
    p.add_argument("--thought-tokens", action="store_true", help="wrap stimulus_model with <think> tokens")

    p = add("train", "train a decoder in this process (no Ray) and save its adapter", cmd_train)
    p.add_argument("--run-name", help="folder under train.output_dir (default: a timestamped name)")

    for name, text, func in (
        ("read", "answer questions about dialogs from their activations", cmd_read),
        ("score", "rank candidate answers to a question about a dialog by decoder loss", cmd_score),
        ("steer", "train a control adapter for the target from control QA pairs", cmd_steer),
        (
            "evaluate-steering",
            "a control's behaviour rate and fluency beside the prompted target and a steering vector",
            cmd_evaluate_steering,
        ),
        (
            "evaluate",
            "the evaluation suite: held-out loss, identification by multiple choice and open-ended reading, baselines",
            cmd_evaluate,
        ),
    ):
        p = add(name, text, func)
        p.add_argument(
            "--decoder", help="decoder adapter folder, or models:/NAME/N, NAME@alias (default: the latest under runs/)"
        )
        if name in ("read", "score", "evaluate"):
            p.add_argument("--layer", type=int, help="read layer (default: patch.read_layer)")
        if name in ("read", "score"):
            p.add_argument("--dialog", help='one dialog as JSON: [{"role": "user", "content": "..."}, ...]')
            p.add_argument("--dialogs", type=Path, help='JSONL of dialogs ({"messages": [...]} per line)')
            p.add_argument("--count", type=int, default=2, help="held-out dialogs to read when none is given")
    read_p = sub.choices["read"]
    read_p.add_argument("--question", action="append", help="a question (repeatable)")
    read_p.add_argument("--max-new-tokens", type=int, default=48, help="longest answer, in tokens")
    score_p = sub.choices["score"]
    score_p.add_argument("--question", required=True)
    score_p.add_argument("--candidates", nargs="+", required=True)
    evaluate_p = sub.choices["evaluate"]
    add_suite_arguments(evaluate_p)
    evaluate_p.add_argument("--output", type=Path, help="write results.json, per_item.jsonl and figures to this folder")
    for name in ("steer", "evaluate-steering"):
        p = sub.choices[name]
        p.add_argument("--control", type=Path, default=CONTROLS_DIR / "pirate.json", help="control file (JSON)")
        p.add_argument(
            "--prompts", type=Path, default=STEER_PROMPTS, help='prompt set: {"train": [...], "heldout": [...]}'
        )
    steer_p = sub.choices["steer"]
    steer_p.add_argument("--out", type=Path, help="where to save the control adapter (must be new)")
    steer_p.add_argument("--show", type=int, default=3, help="held-out replies to print before/after")
    steering_p = sub.choices["evaluate-steering"]
    steering_p.add_argument("--adapter", type=Path, help="a trained control adapter (default: train one per seed)")
    steering_p.add_argument(
        "--seeds", type=int, nargs="+", help="train a control with each seed (default: steer.seed, once)"
    )
    steering_p.add_argument("--max-new-tokens", type=int, default=48, help="longest reply, in tokens")
    steering_p.add_argument("--output", type=Path, help="report folder (steering.json, .md, .png) and adapters")
    return parser


def add_suite_arguments(parser: argparse.ArgumentParser) -> None:
    """The evaluation suite's options, shared with jobs/evaluate.py (`suite_options` reads them)."""
    from .suite import TASKS

    parser.add_argument(
        "--suite",
        nargs="+",
        choices=TASKS,
        default=list(TASKS),
        metavar="TASK",
        help=f"tasks to run (default: all of {' '.join(TASKS)})",
    )
    parser.add_argument("--choices", type=int, default=4, help="candidates per identification item (K)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="answer length in open-ended reading")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--layers", type=int, nargs="+", default=[], help="also map identification over these read layers"
    )
    parser.add_argument("--map-items", type=int, help="items in the layer map (default: all)")


def suite_options(args: argparse.Namespace) -> dict:
    """`run_suite` keywords from the arguments of `add_suite_arguments` (and --layer)."""
    return {
        "tasks": args.suite,
        "choices": args.choices,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "read_layer": args.layer,
        "layers": args.layers,
        "map_items": args.map_items,
    }


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    try:
        args.func(args, overrides)
    except (
        ConfigError,
        DataError,
        LayoutError,
        UnsupportedChatTemplate,
        FileNotFoundError,
        ModelFileError,
        WrongTarget,
    ) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
