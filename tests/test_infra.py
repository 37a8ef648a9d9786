"""infra/ agrees with the code and the pins: job configs validate with the paper's settings, DeepSpeed
JSONs leave the strategy's fields alone, KubeRay manifests run existing configs on as many workers
as GPUs, placed, checkpointed and restarted as tests/test_two_nodes.py's job is, the image installs
the pinned torch. Fast: no Ray, no GPU."""

from __future__ import annotations

import json
import random
import re
import shlex
import tomllib
from pathlib import Path, PurePosixPath

import pytest
import yaml

from latentqa.config import LatentQAConfig
from latentqa.paths import PROJECT_ROOT
from latentqa.strategy import DeepSpeedStrategy, StrategyConfig
from latentqa.training import strategy_config
from latentqa_platform.settings import JobSettings, load_job_config
from test_two_nodes import TWO_NODE_SETTINGS

INFRA = PROJECT_ROOT / "infra"
CONFIGS = sorted((INFRA / "configs").glob("llama3-*.yaml"))  # the GPU-cluster configs (CPU ones: test_real_models)
DEEPSPEED_CONFIGS = [p for p in CONFIGS if yaml.safe_load(p.read_text()).get("strategy", {}).get("kind") == "deepspeed"]
DEEPSPEED_JSONS = sorted((INFRA / "deepspeed").glob("*.json"))
MANIFESTS = sorted((INFRA / "kuberay").glob("*.yaml"))
PAPER_LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
# Fields a DeepSpeed JSON must not set although the strategy does not write them: they contradict
# its batch triple or bf16, replace the loop's own optimizer and schedule, or belong to cpu_offload.
NOT_IN_JSON = [
    ("train_batch_size",),
    ("fp16",),
    ("optimizer",),
    ("scheduler",),
    ("zero_optimization", "offload_optimizer"),
    ("zero_optimization", "offload_param"),
]


def name(path):
    return path.name


def pin(package: str) -> str:
    """The version pyproject.toml pins `package` to (`name==X` or `name[extras]==X`)."""
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"] + sum(project["optional-dependencies"].values(), []):
        if match := re.fullmatch(rf"{package}(\[[^\]]*\])?==(\S+)", dep):
            return match.group(2)
    raise AssertionError(f"pyproject.toml does not pin {package}")


def leaves(tree: dict, prefix: tuple = ()):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, (*prefix, key))
        else:
            yield (*prefix, key)


# ---------------------------------------------------------------- configs


def test_the_required_configs_exist():
    wanted = {"llama3-8b-ddp.yaml", "llama3-8b-fsdp.yaml", "llama3-70b-fsdp.yaml", "llama3-70b-zero3.yaml"}
    assert wanted <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=name)
def test_config_validates_with_the_paper_settings(path):
    config, settings = load_job_config(path)
    strategy = strategy_config(config, "ddp")
    assert not {"grad_accum_steps", "max_grad_norm"} & set(config.strategy)  # set through train:
    size = re.match(r"llama3-(\d+)b-", path.name).group(1)
    assert config.model.path == f"meta-llama/Meta-Llama-3-{size}B-Instruct"
    assert config.patch.read_layer == {"8": 15, "70": 21}[size]
    assert (config.patch.write_layer, config.model.weights, config.model.dtype) == (0, "pretrained", "bfloat16")
    lora = config.lora
    assert (lora.r, lora.alpha, lora.dropout, lora.target_modules) == (16, 32, 0.05, PAPER_LORA_MODULES)
    train = config.train
    assert (train.lr, train.weight_decay, train.epochs, train.batch_size, train.grad_accum) == (3e-5, 0.01, 5, 4, 8)
    assert strategy.kind == {"ddp": "ddp", "fsdp": "fsdp", "zero3": "deepspeed"}[path.stem.rsplit("-", 1)[1]]
    assert strategy.mixed_precision == "bf16"
    assert (settings.ray.num_workers, settings.ray.use_gpu) == (8, True)


@pytest.mark.parametrize("path", DEEPSPEED_CONFIGS, ids=name)
def test_deepspeed_config_file_resolves_and_deepspeed_accepts_the_merge(path, monkeypatch):
    monkeypatch.chdir(PROJECT_ROOT)  # configs name files relative to the project root
    strategy = strategy_config(load_job_config(path)[0], "ddp")
    assert strategy.deepspeed_config.is_file()
    merged = DeepSpeedStrategy(strategy).deepspeed_config()
    ds_config = pytest.importorskip("deepspeed.runtime.config")
    # DeepSpeed's own validation: rejects e.g. misspelt zero_optimization fields.
    assert ds_config.DeepSpeedConfig(merged).zero_optimization_stage == strategy.zero_stage == 3


@pytest.mark.parametrize("path", DEEPSPEED_JSONS, ids=name)
def test_deepspeed_json_sets_nothing_the_strategy_computes(path):
    # Every field the strategy writes (all options on): the merge would silently override them.
    computed = DeepSpeedStrategy(
        StrategyConfig(kind="deepspeed", cpu_offload=True, mixed_precision="bf16")
    ).deepspeed_config()
    owned = [*leaves(computed), *NOT_IN_JSON]
    clashes = [
        ".".join(leaf) for leaf in leaves(json.loads(path.read_text())) if any(leaf[: len(o)] == o for o in owned)
    ]
    assert not clashes, f"{path.name} sets fields the strategy or the loop owns"


# ---------------------------------------------------------------- KubeRay


def cluster_spec(manifest: dict) -> dict:
    return manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]


def gpus_per_node(cluster: dict) -> list[int]:
    """The GPUs of each node of the worker groups (the head has none)."""
    nodes = []
    for group in cluster["workerGroupSpecs"]:
        gpus = sum(
            int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in group["template"]["spec"]["containers"]
        )
        nodes += [gpus] * group["replicas"]
    return nodes


def shared_mounts(cluster: dict) -> set[PurePosixPath]:
    """Where every pod, head and workers, mounts a persistent volume claim read-write."""
    per_pod = []
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        claims = {volume["name"] for volume in pod.get("volumes", []) if "persistentVolumeClaim" in volume}
        per_pod.append(
            {
                PurePosixPath(mount["mountPath"])
                for container in pod["containers"]
                for mount in container.get("volumeMounts", [])
                if mount["name"] in claims and not mount.get("readOnly")
            }
        )
    return set.intersection(*per_pod)


def entrypoint(manifest: dict) -> tuple[Path, list[str]]:
    """A RayJob's `python jobs/train.py --config FILE FLAGS...`: the config file and the other flags."""
    command = shlex.split(manifest["spec"]["entrypoint"])
    assert command[:2] == ["python", "jobs/train.py"]
    args = command[2:]
    at = args.index("--config")
    return PROJECT_ROOT / args[at + 1], args[:at] + args[at + 2 :]


def jobs_run_by(manifest: dict) -> list[tuple[LatentQAConfig, JobSettings]]:
    """A RayJob's entrypoint; on the standing RayCluster, every GPU config."""
    if manifest["kind"] == "RayCluster":
        return [load_job_config(p) for p in CONFIGS]
    return [load_job_config(*entrypoint(manifest))]


@pytest.mark.parametrize("path", MANIFESTS, ids=name)
def test_kuberay_manifest_runs_a_config_with_one_worker_per_gpu(path):
    (manifest,) = yaml.safe_load_all(path.read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] in ("RayCluster", "RayJob")
    cluster = cluster_spec(manifest)
    assert cluster["rayVersion"] == pin("ray")  # KubeRay must match the Ray in the image
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    assert len({c["image"] for g in groups for c in g["template"]["spec"]["containers"]}) == 1
    gpus = sum(gpus_per_node(cluster))
    assert {settings.ray.num_workers for _, settings in jobs_run_by(manifest)} == {gpus}
    if manifest["kind"] == "RayJob":  # more workers, same global batch as the config's own node
        config_path, flags = entrypoint(manifest)
        assert config_path.is_file()
        (base, base_settings), (config, _) = load_job_config(config_path), load_job_config(config_path, flags)
        global_batch = base.train.batch_size * base_settings.ray.num_workers * base.train.grad_accum
        assert config.train.batch_size * gpus * config.train.grad_accum == global_batch


@pytest.mark.parametrize("path", MANIFESTS, ids=name)
def test_kuberay_jobs_run_as_on_the_two_node_test_cluster(path):
    """tests/test_two_nodes.py runs a job on two Ray nodes with TWO_NODE_SETTINGS: its workers
    spread over the nodes, its checkpoints in a folder both nodes see, and a killed worker's group
    restarted from the latest one. Every job a manifest runs is set up the same way: a GPU per
    worker (as many workers as GPUs, checked above, so each node gets one per GPU), spread like the
    two-node test's over several nodes (on one, PACK or SPREAD: nothing STRICT_), checkpoints on a
    volume every pod mounts read-write, restarts allowed and checkpoints to restart from."""
    (manifest,) = yaml.safe_load_all(path.read_text())
    cluster = cluster_spec(manifest)
    nodes, mounts = gpus_per_node(cluster), shared_mounts(cluster)
    for config, settings in jobs_run_by(manifest):
        ray = settings.ray
        assert ray.use_gpu
        placements = {TWO_NODE_SETTINGS["placement_strategy"]} if len(nodes) > 1 else {"PACK", "SPREAD"}
        assert ray.placement_strategy in placements
        storage = PurePosixPath(ray.storage_path or config.train.output_dir)
        assert any(storage.is_relative_to(mount) for mount in mounts), f"{storage}: not on {sorted(mounts)}"
        assert ray.max_failures != 0 and ray.checkpoint_every > 0  # -1: unlimited restarts


# ---------------------------------------------------------------- image and docs


def test_dockerfile_installs_the_pinned_torch_and_deepspeed():
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    assert set(re.findall(r"torch==([\w.]+)", dockerfile)) == {pin("torch")}
    assert '--index-url "https://download.pytorch.org/whl/${TORCH_CUDA}"' in dockerfile  # the CUDA build
    setup_sh = (INFRA / "setup.sh").read_text()
    assert (
        set(re.findall(r"deepspeed==([\w.]+)", dockerfile))
        == set(re.findall(r"deepspeed==([\w.]+)", setup_sh))
        != set()
    )
    assert ".venv" in (PROJECT_ROOT / ".dockerignore").read_text().split()  # no local venv in the context


@pytest.mark.parametrize("folder", ["configs", "deepspeed", "docker", "kuberay"])
def test_each_folder_has_a_readme_naming_its_files(folder):
    readme = (INFRA / folder / "README.md").read_text()
    files = [p.name for p in (INFRA / folder).iterdir() if p.name != "README.md"]
    assert files and [f for f in files if f"`{f}`" not in readme] == []


# ---------------------------------------------------------------- the sizing table


def _sizing():
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("sizing", INFRA / "sizing.py")
    module = sys.modules["sizing"] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_sizing_model_predicts_the_measured_h200_peaks():
    """The one GPU measurement we have (Llama-3-8B shape, one H200, batches 4 and 32 of the
    offline set laid out with the Llama-3 template) against the sizing model's prediction."""
    from transformers import AutoTokenizer

    from conftest import needs
    from latentqa.chat_format import ChatFormat
    from latentqa.data import DatasetSpec, load_examples
    from latentqa.layout import Layout
    from latentqa.paths import FETCHED_TOKENIZERS, OFFLINE_TRAIN, PROJECT_ROOT

    sizing = _sizing()
    measured = json.loads((PROJECT_ROOT / "docs" / "figures" / "gpu-h200-llama3-8b.json").read_text())
    shape = sizing.Shape.of(sizing.LLAMA3_8B)
    step = {k: {r["name"]: r for r in v["rows"]} for k, v in measured.items() if k.startswith("batch_")}
    assert shape.params() == step["batch_4"]["gpu train step"]["details"]["parameters"]
    layout = Layout(
        ChatFormat(AutoTokenizer.from_pretrained(needs(FETCHED_TOKENIZERS / "llama-3.1", "infra/setup.sh")))
    )
    examples = load_examples(DatasetSpec(path=OFFLINE_TRAIN))
    random.Random(0).shuffle(examples)  # as the benchmark's train_batch picks them
    for batch in (4, 32):
        laid = [layout.example(e, "train", i) for i, e in enumerate(examples[:batch])]
        padded = max(len(x.write.ids) for x in laid)
        labels = sum(sum(1 for t in x.write.labels if t != -100) for x in laid) / batch
        predicted = sizing.memory_gib(shape, "ddp", 1, batch, padded, labels)["total"] * 1024
        peak = step[f"batch_{batch}"]["gpu peak memory"]["measured"]  # MiB
        assert abs(predicted / peak - 1) < 0.01, (batch, predicted, peak)


def test_the_readme_sizing_table_is_what_the_script_prints(capsys):
    _sizing().main([])
    assert capsys.readouterr().out.strip() in (INFRA / "README.md").read_text()
