"""The LatentQA Ray Serve application: read, score and control over HTTP.

    serve run serve.app:build_app auth=none      # offline default; decoder: the latest under runs/
    serve run serve.app:build_app settings=my_settings.yaml
    serve deploy serve/config.yaml               # replicas, autoscaling and settings from the file

Three deployments, a module each:

- `serve/gateway.py`   `Gateway`, the FastAPI ingress: validation, auth, routing; no model.
- `serve/replica.py`   `ModelReplica`, one base model with multiplexed adapters and batched reads.
- `serve/steering.py`  `Steering`, control jobs one at a time; their state lives in MLflow.

The request contract (models, limits, errors) is `latentqa_platform.serving`; see serve/README.md.
"""

from pathlib import Path

from ray import serve

from latentqa_platform import console
from latentqa_platform.serving import ServeSettings
from serve.gateway import Gateway
from serve.replica import ModelReplica
from serve.steering import Steering


def build_app(args: dict) -> serve.Application:
    """The application for `serve run serve.app:build_app key=value` and `serve deploy`: `args`
    are `ServeSettings` fields; `settings=FILE.yaml` reads them from a file first. Without
    `decoders`, the engine config's `model.decoder_adapter` is served (with the controls shipped for
    it, `infra/controls/<decoder>/`, unless `controls` is given), else the latest under runs/."""
    import yaml

    from latentqa.decoders import registry_reference
    from latentqa.model_files import WrongTarget, check_target
    from latentqa.models import load_model_config
    from latentqa.paths import latest_decoder

    args = dict(args)
    if "settings" in args:
        args = {**yaml.safe_load(Path(args.pop("settings")).read_text()), **args}
    model = ServeSettings.model_validate(args).engine_config().model
    if not args.get("decoders"):  # the config's own decoder (e.g. a shipped one), else the latest trained
        named = model.decoder_adapter and (registry_reference(model.decoder_adapter) or model.decoder_adapter)
        args["decoders"] = {Path(named).name: named} if named else {"latest": str(latest_decoder())}
        if named and "controls" not in args:  # and the controls shipped with that decoder, as chat models
            args["controls"] = shipped_controls(Path(named).name)
    settings = ServeSettings.model_validate(args)
    target = load_model_config(model)
    for folder in settings.decoders.values():  # a wrong base fails here in one line, not in the replicas
        if Path(folder).is_dir():
            try:
                check_target(folder, target)
            except WrongTarget as err:
                raise SystemExit(f"cannot serve: {err}") from None
    return application(settings)


def shipped_controls(decoder_name: str) -> dict[str, str]:
    """The control adapters shipped for a decoder (`infra/controls/<decoder>/<control>/`), by name."""
    from latentqa.paths import SHIPPED_CONTROLS

    folder = SHIPPED_CONTROLS / decoder_name
    return {p.name: str(p) for p in sorted(folder.iterdir()) if p.is_dir()} if folder.is_dir() else {}


def application(settings: ServeSettings, model=ModelReplica, steering=Steering, gateway=Gateway) -> serve.Application:
    """The three deployments bound together; callers in Python may pass deployments with
    `.options(...)` (replicas, resources, runtime_env)."""
    args = settings.model_dump(mode="json")
    # Bounded queues: past them Serve refuses a request (503) instead of letting it wait unseen.
    model, gateway = (d.options(max_queued_requests=settings.max_queued_requests) for d in (model, gateway))
    if not settings.verbose:
        model, steering, gateway = (_quiet(d) for d in (model, steering, gateway))
    return gateway.bind(model.bind(args), steering.bind(args), args)


def _quiet(deployment: serve.Deployment) -> serve.Deployment:
    """The deployment with `console.QUIET_REPLICA_ENV` added to its actors' environment."""
    options = dict(deployment.ray_actor_options or {})
    runtime_env = dict(options.get("runtime_env") or {})
    runtime_env["env_vars"] = {**console.QUIET_REPLICA_ENV, **runtime_env.get("env_vars", {})}
    return deployment.options(ray_actor_options={**options, "runtime_env": runtime_env})
