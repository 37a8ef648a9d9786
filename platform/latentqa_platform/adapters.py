"""Many adapters over one base model: where they come from, and how a request picks its own.

`AdapterCatalog` turns what a request names (a configured name, or a registered version
`model/3` / `model@alias`) into a canonical id, the Serve multiplexing key, and fetches the
adapter folder for an id. Request strings only ever become MLflow model URIs after matching a
strict pattern; local folders come from the operator's configuration alone.

`SharedAdapters` keeps every loaded adapter under its own PEFT name on the one base and routes
the engine's two roles ("decoder", "control") to the adapters the current request uses, so the
engine's read/score code runs unchanged for any decoder.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from latentqa.config import LatentQAConfig
from latentqa.decoders import check_adapter_folder, trained_config_file
from latentqa.model_files import ModelFileError
from latentqa.models import AdapterSet

from .serving import RequestError, Unavailable, UnknownAdapter
from .tracking import resolve_adapter

Kind = Literal["decoder", "control"]
_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")  # MLflow: no such version; no such alias
KIND_TAG = "latentqa.kind"  # on registered versions: "control" for control adapters
REGISTRY_REF = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,127})(?:/(?P<version>[1-9][0-9]{0,8})|@(?P<alias>[A-Za-z][A-Za-z0-9_-]{0,63}))$"
)


@dataclass(frozen=True)
class FetchedAdapter:
    folder: Path  # adapter_config.json + adapter_model.safetensors
    config: LatentQAConfig | None  # the engine config it was trained with, when it came with one


def fetch_adapter(uri: str, tracking_uri: str, download_dir: Path) -> FetchedAdapter:
    """A PEFT adapter from a registry URI or a local folder, with the engine config it was trained
    with when one sits beside it. Only safetensors weights are accepted: a pickled `.bin` could
    run code on load."""
    folder = resolve_adapter(uri, tracking_uri, download_dir)
    try:
        check_adapter_folder(folder, uri)
    except ModelFileError as err:
        raise RequestError("adapter", str(err)) from None
    config_file = trained_config_file(folder)  # a run's config.json, or the registered `config.json` artifact
    config = LatentQAConfig.model_validate_json(config_file.read_text()) if config_file else None
    return FetchedAdapter(folder, config)


class AdapterCatalog:
    def __init__(self, kind: Kind, named: dict[str, str], tracking_uri: str):
        self.kind, self.named, self.tracking_uri = kind, named, tracking_uri

    def _client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.tracking_uri)

    def configured(self, ref: str) -> str | None:
        """The canonical id of a configured folder's name, which needs no registry lookup; else None."""
        uri = self.named.get(ref)
        return f"{self.kind}:{ref}" if uri is not None and not uri.startswith("models:/") else None

    def locate(self, ref: str, field: str) -> str:
        """The canonical id of `ref`: `<kind>:<name>` for a configured adapter, `models:/name/N`
        for a registered one (aliases resolved now, so a moved alias is seen). 404 otherwise."""
        if ref in self.named:
            uri = self.named[ref]
            return self.configured(ref) or self._registered(uri.removeprefix("models:/"), field, check_kind=False)
        return self._registered(ref, field, check_kind=True)

    def _registered(self, ref: str, field: str, check_kind: bool) -> str:
        from mlflow.exceptions import MlflowException

        match = REGISTRY_REF.match(ref)
        if not match:
            raise UnknownAdapter(
                field,
                f"unknown {self.kind} {ref!r}: not configured, and not a registered `name/version` or `name@alias`",
            )
        name, version, alias = match["name"], match["version"], match["alias"]
        try:
            found = (
                self._client().get_model_version(name, version)
                if version
                else self._client().get_model_version_by_alias(name, alias)
            )
        except MlflowException as err:
            if err.error_code in _NOT_FOUND:
                raise UnknownAdapter(field, f"unknown {self.kind} {ref!r}: no such registered model version") from None
            raise Unavailable(field, "the model registry is unavailable; retry later") from None
        is_control = found.tags.get(KIND_TAG) == "control"
        if check_kind and is_control != (self.kind == "control"):
            raise UnknownAdapter(field, f"{ref!r} is registered, but it is not a {self.kind}")
        return f"models:/{name}/{found.version}"

    def fetch(self, adapter_id: str, download_dir: Path) -> FetchedAdapter:
        """The adapter folder of a canonical id (downloaded under `download_dir` if registered)."""
        if adapter_id.startswith("models:/"):
            try:
                return fetch_adapter(adapter_id, self.tracking_uri, download_dir)
            except FileNotFoundError as err:  # located a moment ago: the registry or its store failed
                logging.getLogger("ray.serve").error("%s: %s", adapter_id, err)
                raise Unavailable(self.kind, "the model registry is unavailable; retry later") from None
        name = adapter_id.removeprefix(f"{self.kind}:")
        if name not in self.named:
            raise UnknownAdapter(self.kind, f"unknown {self.kind} {name!r}")
        try:
            return fetch_adapter(self.named[name], self.tracking_uri, download_dir)
        except (RequestError, FileNotFoundError) as err:  # the server's fault; its message holds the server's path
            logging.getLogger("ray.serve").error("configured %s %r: %s", self.kind, name, err)
            raise Unavailable(
                self.kind, f"the configured {self.kind} {name!r} cannot be loaded (see the server log)"
            ) from None

    def listing(self, exclude_prefix: str | None = None) -> list[dict]:
        """Configured adapters and registered models of this kind, for GET endpoints. A configured
        folder shows as `folder`: a server path is the operator's, not the client's."""
        from mlflow.exceptions import MlflowException

        rows = [
            {"name": name, "source": uri if uri.startswith("models:/") else "folder", "kind": "configured"}
            for name, uri in self.named.items()
        ]
        try:
            models = self._client().search_registered_models(max_results=200)
        except MlflowException:
            raise Unavailable(self.kind, "the model registry is unavailable; retry later") from None
        for model in models:
            if exclude_prefix and model.name.startswith(exclude_prefix):
                continue
            versions = sorted(int(v.version) for v in model.latest_versions or [])
            rows.append(
                {
                    "name": model.name,
                    "source": f"models:/{model.name}",
                    "kind": "registered",
                    "latest_version": versions[-1] if versions else None,
                    "aliases": sorted(model.aliases or {}),
                }
            )
        return rows


class SharedAdapters(AdapterSet):
    """The session's adapters, with every served adapter under its own PEFT name and the engine's
    roles routed per request (`with adapters.routed(decoder="a3"): read(...)`)."""

    def __init__(self, adapters: AdapterSet):
        super().__init__(adapters.model, set())  # serving trains nothing
        self.routes: dict[str, str] = {}

    def load(self, folder: Path, name: str) -> None:
        self.load_frozen(folder, name)
        self._adapters_changed()

    def unload(self, name: str) -> None:
        if name in self.model.peft_config:
            self.model.delete_adapter(name)
            self._adapters_changed()

    @contextlib.contextmanager
    def routed(self, **roles: str) -> Iterator[None]:
        self.routes = roles
        try:
            yield
        finally:
            self.routes = {}

    def use(self, adapter: str | None):
        return super().use(self.routes.get(adapter, adapter) if adapter else None)
