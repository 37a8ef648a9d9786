"""Curate LatentQA training data with any OpenAI-compatible chat model, as a Ray Data pipeline.

    python jobs/curate.py --config datasets/curation/example.yaml --llm.base_url https://api.openai.com/v1 \
        --llm.model gpt-4o-mini --output_dir runs/curation/first
    python jobs/curate.py --config ... --stages seed            # one stage; rerun to resume it
    python jobs/curate.py --config ... --stages expand,qa,assemble

Stages: seed (personas and goals from the config's categories) -> expand (control and stimulus
dialogs) and qa (QA pairs per label) -> assemble (the SPEC's five files in OUTPUT/dataset/).
Each writes JSONL in the output folder as it goes; rerunning the same command asks only for what
is not done yet. Prompts are the versioned templates in datasets/curation/prompts/. The API key
comes from `--llm.api_key` or the variable named by `--llm.api_key_env` (OPENAI_API_KEY).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from latentqa.config import ConfigError
from latentqa.data import DataError
from latentqa_platform import console
from latentqa_platform.batchjobs import run_main
from latentqa_platform.curation import load_curation_config, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="jobs/curate.py",
        allow_abbrev=False,
        description="Curate LatentQA data. Any config field is an override: --stages seed,expand, "
        "--llm.max_in_flight 8, --budget.max_requests 500, --counts.qa_pairs 6.",
    )
    parser.add_argument("--config", type=Path, help="YAML file of CurationConfig fields")
    parser.add_argument("--verbose", action="store_true", help="show Ray's and the libraries' messages here too")
    args, overrides = parser.parse_known_args(argv)
    config = load_curation_config(args.config, overrides)
    if not args.verbose:
        log = Path(config.output_dir) / "console.log"
        console.quiet(log)
        print(f"Ray's and the libraries' messages: {log}")
    try:
        summary = run(config)
    except DataError as err:  # a damaged stage file: the user's to fix, named by file and line
        raise ConfigError(str(err)) from None
    print(json.dumps(summary, indent=1))
    pending = sum(c.get("left_pending", 0) for c in summary.values() if isinstance(c, dict))
    if pending:
        print(f"{pending} inputs are still pending (budget or endpoint failures): rerun the same command to continue")
    return 1 if pending else 0


if __name__ == "__main__":
    sys.exit(run_main(main))
