"""The platform layer over the engine: Ray (cluster, Ray Data, Ray Train, Serve) and MLflow.

The engine (`latentqa`) never imports Ray or MLflow; the jobs in `jobs/` and the Serve app in
`serve/` are thin scripts over the engine and this package:

- `settings`  the `ray:` and `mlflow:` config sections beside the engine's, from one YAML + overrides
- `raydata`   the five sets read, validated and laid out with Ray Data
- `tracking`  MLflow runs, metrics, figures, and decoders in the model registry
"""

from latentqa.decoders import register_registry


def _fetch_from_mlflow(*args):
    from .tracking import fetch_registered_decoder  # MLflow loads only when a decoder is fetched

    return fetch_registered_decoder(*args)


# Also where the package runs from a checkout, without its entry points installed.
register_registry("mlflow", _fetch_from_mlflow)
