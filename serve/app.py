"""The LatentQA Ray Serve application: read, score and control over HTTP.

    serve run serve.app:build_app auth=none      # the latest decoder under runs/, else the shipped SmolLM2 one
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
    `decoders`, what `served_by_default` picks. A start that cannot serve exits in one line that
    says what to do (`cannot serve: ...`), with no traceback."""
    import yaml
    from pydantic import ValidationError

    from latentqa.config import ConfigError, validation_message
    from latentqa.model_files import WrongTarget, check_target
    from latentqa.models import load_model_config

    args = dict(args)
    if "settings" in args:
        args = {**yaml.safe_load(Path(args.pop("settings")).read_text()), **args}
    try:
        if not args.get("decoders"):
            args.update(served_by_default(args))
        settings = ServeSettings.model_validate(args)
        target = load_model_config(settings.engine_config().model)
    except ValidationError as err:
        raise SystemExit(f"cannot serve: {validation_message('serve.app:build_app', err)}") from None
    except (ConfigError, OSError) as err:
        raise SystemExit(f"cannot serve: {err}") from None
    for folder in settings.decoders.values():  # a wrong base fails here in one line, not in the replicas
        if Path(folder).is_dir():
            try:
                check_target(folder, target)
            except WrongTarget as err:
                raise SystemExit(f"cannot serve: {err}") from None
    return application(settings)


def served_by_default(args: dict, runs: Path | None = None) -> dict[str, object]:
    """The settings a start without `decoders` adds: the engine config's own decoder (e.g. a shipped
    one, with the controls shipped for it as chat models unless `controls` is given); else the latest
    decoder trained under `runs/`; else, when no config is named, the shipped SmolLM2 decoder and its
    target (`infra/configs/smollm2-135m-instruct.yaml`, prepared by infra/setup.sh), said in one line."""
    from latentqa.config import load_config
    from latentqa.decoders import registry_reference
    from latentqa.paths import PROJECT_ROOT, RUNS_DIR, latest_decoder
    from latentqa.showcase import SHIPPED_CONFIG

    model = ServeSettings.model_validate(args).engine_config().model
    named = model.decoder_adapter and (registry_reference(model.decoder_adapter) or model.decoder_adapter)
    if named:
        controls = {} if "controls" in args else {"controls": shipped_controls(Path(named).name)}
        return {"decoders": {Path(named).name: named}, **controls}
    runs = runs or RUNS_DIR
    try:
        return {"decoders": {"latest": str(latest_decoder(runs))}}
    except FileNotFoundError:
        pass
    shipped = SHIPPED_CONFIG.relative_to(PROJECT_ROOT)
    if args.get("config") is None and Path(load_config(SHIPPED_CONFIG).model.path).exists():
        print(f"no decoder trained under {runs}: serving the shipped SmolLM2 decoder (config={shipped})", flush=True)
        return {"config": str(SHIPPED_CONFIG), **served_by_default({**args, "config": str(SHIPPED_CONFIG)}, runs)}
    raise SystemExit(
        f"cannot serve: no decoder trained under {runs}; train one (python jobs/train.py), serve the shipped "
        f"one (serve run serve.app:build_app config={shipped}, after infra/setup.sh), or name one "
        "(serve run serve.app:build_app settings=FILE.yaml, the file holding decoders: {NAME: DIR})"
    )


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
