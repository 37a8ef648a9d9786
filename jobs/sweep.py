"""Sweep one config field over values with short `jobs/train.py` runs, and pick by held-out gain.

    python jobs/sweep.py --field patch.read_layer --values 3 9 15 21 27 \\
        --config infra/configs/smollm2-135m-instruct.yaml --model.decoder_adapter null \\
        --train.max_steps 20 --train.eval_every 0 --ray.num_workers 1 --ray.cpus_per_worker 1

Each value is one training run named `<--name>-<value>` (logged to MLflow like any run; a rerun
resumes or skips finished runs), evaluated on the held-out set at its end. The sweep writes
`sweep.json` (every run's final held-out metrics) and `sweep.png` (activation gain and losses by
value) to `<train.output_dir>/<--name>/`, and prints the value with the largest activation gain.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from latentqa_platform.batchjobs import run_main

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train


def plot(results: list[dict], field: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [yaml.safe_load(r["value"]) for r in results]  # numbers plot to scale
    fig, (gain_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    gains = [r["eval/activation_gain"] for r in results]
    # The paired 95% interval, where the run logged one (runs older than the interval have none).
    below = [g - r.get("eval/activation_gain_ci_low", g) for g, r in zip(gains, results)]
    above = [r.get("eval/activation_gain_ci_high", g) - g for g, r in zip(gains, results)]
    gain_ax.errorbar(values, gains, yerr=[below, above], fmt="o-", capsize=4)
    gain_ax.axhline(0, color="grey", linewidth=0.8)
    gain_ax.set(xlabel=field, ylabel="activation gain (shuffled - true loss)", title="held-out activation gain")
    for key, style in (("loss_true", "o-"), ("loss_shuffled", "s--"), ("loss_none", "^:")):
        loss_ax.plot(values, [r[f"eval/{key}"] for r in results], style, label=key.removeprefix("loss_"))
    loss_ax.set(xlabel=field, ylabel="held-out loss", title="held-out loss by activations")
    loss_ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--field", required=True, help="dotted config field, e.g. patch.read_layer")
    parser.add_argument("--values", nargs="+", required=True, help="values to try (read as YAML scalars)")
    parser.add_argument("--name", default="sweep", help="sweep name: runs are <name>-<value>")
    args, overrides = parser.parse_known_args(argv)
    output_dir = Path(train.parse_args(overrides)[1].train.output_dir)  # validated as the runs will be
    results = []
    for value in args.values:
        run_name = f"{args.name}-{value}"
        metrics_file = output_dir / run_name / "metrics.json"
        if not (output_dir / run_name / "decoder").exists():  # published last: the run is complete
            code = train.main([*overrides, f"--{args.field}", value, "--train.run_name", run_name])
            if code != 0:
                print(f"run {run_name} failed (exit {code})", file=sys.stderr)
                return code
        final = json.loads(metrics_file.read_text())["final"]
        results.append(
            {"value": value, "run_name": run_name, **{k: v for k, v in final.items() if k.startswith("eval/")}}
        )
        print(
            f"{args.field}={value}: "
            + "  ".join(f"{k}={v:.4f}" for k, v in results[-1].items() if k.startswith("eval/"))
        )
    out = output_dir / args.name
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(results, indent=2))
    plot(results, args.field, out / "sweep.png")
    best = max(results, key=lambda r: r["eval/activation_gain"])
    print(
        f"best {args.field}: {best['value']} (activation gain {best['eval/activation_gain']:.4f}); {out / 'sweep.png'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
