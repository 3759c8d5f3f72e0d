"""The cluster infrastructure files (cluster/), offline and in seconds.

* KubeRay manifests against the CRDs' openAPIV3Schema (../shared/kuberay-crds), both
  as the CRD is (wrong types, missing required fields, bad quantities are refused) and
  "strict": every object schema that lists its properties refuses others, as
  `kubectl apply` (server-side field validation, Strict by default) does. The raw
  schema alone accepts a misspelt optional field (the API server would drop it
  silently): the mutation tests show both.
* The Ray cluster launcher configs against Ray's ray-schema.json, and through Ray's own
  prepare_config + validate_config (both offline: they merge the provider's
  defaults.yaml and run the same schema; `ray up` only calls the cloud after them).
* Drift between the files: the manifests share one cluster spec, the RayService's
  application is serve/config.yaml's, the RayJobs' entrypoints parse with the jobs' real
  flags and configs, every Ray version is the installed one, only GPU node types install
  the `gpu` extra, every placeholder is explained in cluster/README.md.
"""
from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml


REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
CRDS = Path(__file__).resolve().parents[2] / "shared" / "kuberay-crds"

MANIFESTS = {
    "raycluster.yaml": "RayCluster",
    "rayjob-synth.yaml": "RayJob",
    "rayjob-train.yaml": "RayJob",
    "rayservice.yaml": "RayService",
}
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
LAUNCHER_CONFIGS = ["aws.yaml", "gcp.yaml"]
WORKDIR = "/home/ray/cir"            # cluster/Dockerfile's WORKDIR, every container's workingDir
OUTPUTS_MOUNT = f"{WORKDIR}/outputs"
# serve/settings.py's per-deployment sections: the only args the RayService may size
# differently from serve/config.yaml (replicas, CPUs, GPUs, queue limits).
SERVE_SIZING_ARGS = ("query_encoder", "shard", "ingress")
SHELL_METACHARACTERS = set("$`;&|<>(){}'\"\\*?~")


# libyaml where PyYAML has it: the three CRDs are 3 MB of YAML (~10x faster than pure Python).
SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(path: Path):
    return yaml.load(path.read_text(), Loader=SafeLoader)


def ray_version() -> str:
    import ray

    return ray.__version__


# ---------------------------------------------------------------------------------------
# KubeRay: schema
# ---------------------------------------------------------------------------------------

def crd_schema(kind: str) -> dict:
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRDS} (CI lays out the repository and shared/ side by side)")
    crd = load_yaml(CRDS / CRD_FILES[kind])
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def strict(schema: dict) -> dict:
    """`schema` with unknown fields refused wherever the CRD lists an object's properties
    and does not ask to keep unknown fields (x-kubernetes-preserve-unknown-fields):
    what Kubernetes' strict field validation reports. The x-kubernetes-* keys are
    ignored by jsonschema (unknown keywords); int-or-string fields are anyOf
    [integer, string] in these CRDs, which jsonschema checks as written."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: strict(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = strict(out["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [strict(sub) for sub in out[key]]
    if isinstance(out.get("not"), dict):
        out["not"] = strict(out["not"])
    return out


def validator(schema):
    """Draft 7 (ray-schema.json declares it; the CRDs declare none, and use nothing newer)."""
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    cls.check_schema(schema)
    return cls(schema)


def errors(checker, doc) -> list[str]:
    """What `checker` (a validator) finds wrong in `doc`, one line per error."""
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in checker.iter_errors(doc)]


@pytest.fixture(scope="module")
def manifests():
    return {name: load_yaml(KUBERAY / name) for name in MANIFESTS}


@pytest.fixture(scope="module")
def schemas():
    """{kind: {"raw": validator, "strict": validator}}, built once."""
    out = {}
    for kind in sorted(set(MANIFESTS.values())):
        schema = crd_schema(kind)
        out[kind] = {"raw": validator(schema), "strict": validator(strict(schema))}
    return out


@pytest.mark.parametrize("name", list(MANIFESTS))
def test_kuberay_manifest_matches_crd(name, manifests, schemas):
    doc = manifests[name]
    kind = MANIFESTS[name]
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    assert errors(schemas[kind]["raw"], doc) == []
    assert errors(schemas[kind]["strict"], doc) == []


def _cluster_spec(doc: dict) -> dict:
    return {"RayCluster": lambda d: d["spec"], "RayJob": lambda d: d["spec"]["rayClusterSpec"],
            "RayService": lambda d: d["spec"]["rayClusterConfig"]}[doc["kind"]](doc)


def at(doc, *path):
    """The node of `doc` at `path` (keys and list indices)."""
    for key in path:
        doc = doc[key]
    return doc


def setting(*path, value):
    """A mutation: the field at `path` set to `value`."""
    return lambda doc: at(doc, *path[:-1]).__setitem__(path[-1], value)


def renaming(*path, to):
    """A mutation: the field at `path` renamed to `to` (a misspelling)."""
    return lambda doc: at(doc, *path[:-1]).__setitem__(to, at(doc, *path[:-1]).pop(path[-1]))


GPU_LARGE_LIMITS = ("spec", "workerGroupSpecs", 1, "template", "spec", "containers", 0, "resources", "limits")
MUTATIONS = {
    # name: (manifest, mutation, refused by the raw CRD schema?, refused by the strict one?)
    "replicas as a string": (
        "raycluster.yaml", setting("spec", "workerGroupSpecs", 0, "replicas", value="two"), True, True),
    "maxReplicas misspelt (a required field)": (
        "raycluster.yaml", renaming("spec", "workerGroupSpecs", 2, "maxReplicas", to="maxReplica"), True, True),
    "rayStartParams value not a string": (
        "raycluster.yaml", setting("spec", "headGroupSpec", "rayStartParams", "num-cpus", value=0), True, True),
    "GPU limit not a quantity": (
        "raycluster.yaml", setting(*GPU_LARGE_LIMITS, "nvidia.com/gpu", value="four"), True, True),
    "unknown auth mode": (
        "rayservice.yaml", setting("spec", "rayClusterConfig", "authOptions", "mode", value="password"), True, True),
    "entrypoint as a list": (
        "rayjob-train.yaml", setting("spec", "entrypoint", value=["python", "jobs/train.py"]), True, True),
    # Optional fields misspelt: the CRD schemas have no additionalProperties: false (nor
    # x-kubernetes-preserve-unknown-fields) anywhere, so only the strict check (kubectl's)
    # catches these; the API server would prune the field and go on without it.
    "enableInTreeAutoscaling misspelt": (
        "raycluster.yaml", renaming("spec", "enableInTreeAutoscaling", to="enableInTreeAutoscalling"), False, True),
    "shutdownAfterJobFinishes misspelt": (
        "rayjob-synth.yaml", renaming("spec", "shutdownAfterJobFinishes", to="shutdownAfterJobsFinish"), False, True),
    "container field misspelt inside the pod template": (
        "rayservice.yaml", renaming("spec", "rayClusterConfig", "headGroupSpec", "template", "spec", "containers", 0,
                                    "workingDir", to="workingDirectory"), False, True),
}


@pytest.mark.parametrize("case", list(MUTATIONS))
def test_kuberay_validation_refuses_mutations(case, manifests, schemas):
    name, mutate, raw_refuses, strict_refuses = MUTATIONS[case]
    doc = copy.deepcopy(manifests[name])
    mutate(doc)
    assert doc != manifests[name]
    kind = MANIFESTS[name]
    assert bool(errors(schemas[kind]["raw"], doc)) == raw_refuses
    assert bool(errors(schemas[kind]["strict"], doc)) == strict_refuses


# ---------------------------------------------------------------------------------------
# KubeRay: consistency
# ---------------------------------------------------------------------------------------

def test_manifests_share_one_cluster_spec(manifests):
    reference = manifests["raycluster.yaml"]["spec"]
    for name, doc in manifests.items():
        assert _cluster_spec(doc) == reference, f"{name}'s cluster spec differs from raycluster.yaml's"


def _pods(spec: dict):
    yield "head", spec["headGroupSpec"], spec["headGroupSpec"]["template"]["spec"]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group, group["template"]["spec"]


def _gpus(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def test_raycluster_groups_images_and_storage(manifests):
    spec = manifests["raycluster.yaml"]["spec"]
    version = ray_version()
    assert spec["rayVersion"] == version
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu_groups = [n for n, g in groups.items() if _gpus(g["template"]["spec"]["containers"][0]) > 0]
    assert len(groups) - len(gpu_groups) >= 1 and len(gpu_groups) == 2
    for name, group in groups.items():
        assert group["minReplicas"] == 0 and group.get("replicas", 0) == 0, name
        assert group["maxReplicas"] >= 1, name
    claims = set()
    for name, _, pod in _pods(spec):
        (container,) = pod["containers"]
        gpu = _gpus(container) > 0
        assert container["resources"]["limits"] == container["resources"]["requests"], name
        for c in [container, *pod.get("initContainers", [])]:
            image = c["image"]
            assert image.endswith(f":{version}-py311-cu128" if gpu else f":{version}-py311-cpu"), (name, image)
        assert container["workingDir"] == WORKDIR, name
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env.get("CIR_STORAGE") == "/mnt/cluster/cir", name
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts[OUTPUTS_MOUNT]["subPath"] == "cir/outputs", name
        assert mounts["/mnt/cluster"]["name"] == mounts[OUTPUTS_MOUNT]["name"], name
        volumes = {v["name"]: v for v in pod["volumes"]}
        claims.add(volumes[mounts[OUTPUTS_MOUNT]["name"]]["persistentVolumeClaim"]["claimName"])
        if gpu:
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"], name
    assert len(claims) == 1, f"every pod must mount the same shared volume, got {claims}"


def test_dockerfile_matches_manifests():
    text = (CLUSTER / "Dockerfile").read_text()
    version = ray_version()
    assert re.search(rf"^ARG BASE_IMAGE=rayproject/ray:{re.escape(version)}-py311-cu128$", text, re.M)
    assert re.search(rf"^WORKDIR {re.escape(WORKDIR)}$", text, re.M)
    assert re.search(r"^ARG EXTRAS=local,gpu$", text, re.M)
    assert 'pip install --no-cache-dir -e ".[${EXTRAS}]"' in text
    # What the image copies is what the jobs, the Serve app and their configs need.
    for folder in ("cir", "jobs", "serve", "configs"):
        assert re.search(rf"^COPY --chown=ray:users {folder}/ {folder}/$", text, re.M), folder
    # The build lines in its header tag the images that the manifests use.
    tags = set(re.findall(r"-t (YOUR-REGISTRY/cir:\S+)", text))
    manifest_images = set(re.findall(r"image: (YOUR-REGISTRY/cir:\S+)", (KUBERAY / "raycluster.yaml").read_text()))
    assert tags == manifest_images


def test_serve_application_matches_serve_config(manifests):
    from serve.settings import ServeSettings

    local = load_yaml(REPO / "serve" / "config.yaml")
    cluster = yaml.safe_load(manifests["rayservice.yaml"]["spec"]["serveConfigV2"])
    assert cluster["http_options"] == {"host": "0.0.0.0", "port": 8000}
    assert cluster["proxy_location"] == local["proxy_location"]

    def unsized(app):
        app = copy.deepcopy(app)
        for key in SERVE_SIZING_ARGS:
            app["args"].pop(key, None)
        return app

    assert [a["name"] for a in cluster["applications"]] == [a["name"] for a in local["applications"]]
    for mine, theirs in zip(cluster["applications"], local["applications"]):
        assert unsized(mine) == unsized(theirs)
        ServeSettings(**mine["args"])  # the sized sections are real settings (unknown keys refused)
        assert set(mine["args"]) == set(theirs["args"])
    encoder = cluster["applications"][0]["args"]["query_encoder"]
    assert encoder["num_gpus"] >= 1, "the RayService's query encoder should take a GPU"


def _entrypoint(doc: dict) -> list[str]:
    text = doc["spec"]["entrypoint"]
    assert not SHELL_METACHARACTERS & set(text), (
        f"{text!r}: the submitter pod runs the entrypoint through a shell; "
        "keep it to plain words (no $VARIABLES, quotes, ;, &&)")
    return shlex.split(text)


@pytest.mark.parametrize("name,config_cls", [("rayjob-synth.yaml", "synth"), ("rayjob-train.yaml", "train")])
def test_rayjob_entrypoint_parses_with_the_job(name, config_cls, manifests):
    from conftest import load_job

    argv = _entrypoint(manifests[name])
    assert argv[0] == "python" and re.fullmatch(r"jobs/\w+\.py", argv[1]), argv
    script = REPO / argv[1]
    assert script.is_file(), f"{argv[1]} does not exist"
    for arg in argv[2:]:
        if arg.endswith((".yaml", ".yml")):
            assert (REPO / arg).is_file(), f"{arg} does not exist"
    job = load_job(script.stem)
    args = job.parse_args(argv[2:])   # argparse exits (SystemExit) on an unknown flag
    if config_cls == "synth":
        cfg = job.build_config(args)
        # outputs/... (the shared volume's cir/outputs, mounted there) or /mnt/cluster/...
        assert Path(cfg.output).parts[0] == "outputs" or cfg.output.startswith("/mnt/cluster/"), cfg.output
    else:
        from cir.train.config import TrainConfig

        cfg = job.config_from_args(TrainConfig, args)   # unknown --set keys are refused here
        assert cfg.run.use_gpu is True, "an autoscaling cluster starts without GPUs: 'auto' would train on CPUs"


def test_train_job_reads_what_the_synth_job_writes(manifests):
    from conftest import load_job

    synth_job, train_job = load_job("synth"), load_job("train")
    from cir.train.config import TrainConfig

    synth = synth_job.build_config(synth_job.parse_args(_entrypoint(manifests["rayjob-synth.yaml"])[2:]))
    train_args = train_job.parse_args(_entrypoint(manifests["rayjob-train.yaml"])[2:])
    train = train_job.config_from_args(TrainConfig, train_args)
    synth_dirs = [s.data.synth_dir for s in train.stages if s.data.source in ("synth", "slerp")]
    assert synth_dirs and all(d == synth.output for d in synth_dirs)


# ---------------------------------------------------------------------------------------
# Ray cluster launcher
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_schema():
    import json

    import ray

    return validator(json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text()))


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_matches_ray_schema(name, ray_schema):
    config = load_yaml(CLUSTER / name)
    assert errors(ray_schema, config) == []


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_passes_ray_prepare_and_validate(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(load_yaml(CLUSTER / name))
    validate_config(prepared)
    # Every command list is ours: none of the provider defaults' (which install a Ray
    # nightly wheel) survived the merge.
    for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        for command in prepared[key]:
            assert "ray-wheels" not in command and "ray-3.0.0.dev" not in command, (key, command)


LAUNCHER_MUTATIONS = {
    "node type field misspelt": lambda c: c["available_node_types"]["gpu_small"].__setitem__(
        "max_worker", c["available_node_types"]["gpu_small"].pop("max_workers")),
    "GPU count as a string": lambda c: c["available_node_types"]["gpu_large"]["resources"].__setitem__("GPU", "4"),
    "top-level field misspelt": lambda c: c.__setitem__("idle_timeout_minute", c.pop("idle_timeout_minutes")),
    "per-type docker field the schema does not allow": lambda c: c["available_node_types"]["cpu"]["docker"]
    .__setitem__("image", "rayproject/ray:latest"),
    "resources missing": lambda c: c["available_node_types"]["cpu"].pop("resources"),
}


@pytest.mark.parametrize("case", list(LAUNCHER_MUTATIONS))
@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_validation_refuses_mutations(name, case, ray_schema):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_yaml(CLUSTER / name)
    LAUNCHER_MUTATIONS[case](config)
    assert config != load_yaml(CLUSTER / name)
    assert errors(ray_schema, config)
    # Ray's own path refuses it too (a misspelt max_workers would otherwise be filled in
    # by prepare_config with the global max_workers).
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


def _node_types(config: dict):
    """(name, is_head, docker image, setup commands) of each node type, as the launcher
    resolves them: a worker type's own worker_setup_commands replace the global lists."""
    docker = config["docker"]
    for name, node in config["available_node_types"].items():
        head = name == config["head_node_type"]
        if head:
            image = docker.get("head_image", docker["image"])
            commands = config["setup_commands"] + config["head_setup_commands"]
        else:
            image = node.get("docker", {}).get("worker_image", docker.get("worker_image", docker["image"]))
            commands = node.get("worker_setup_commands",
                                config["setup_commands"] + config["worker_setup_commands"])
        yield name, node, head, image, commands


def _extras(commands: list[str]) -> set[str]:
    """The extras of every `pip install -e '.[...]'` in `commands`."""
    found = [m for c in commands for m in re.findall(r"pip install[^&;]*-e\s+'?\.\[([\w,]+)\]", c)]
    assert found, f"no `pip install -e '.[...]'` of the project in {commands}"
    return {extra for group in found for extra in group.split(",")}


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_node_types(name):
    config = load_yaml(CLUSTER / name)
    version = ray_version()
    kinds = {"gpu": 0, "cpu": 0}
    for node_name, node, head, image, commands in _node_types(config):
        gpus = node["resources"].get("GPU", 0)
        assert image == f"rayproject/ray:{version}-py311-{'cu128' if gpus else 'cpu'}", (node_name, image)
        extras = _extras(commands)
        assert "local" in extras, node_name
        assert ("gpu" in extras) == (gpus > 0), f"{node_name}: the gpu extra belongs on GPU node types only"
        assert any("ln -sfn /mnt/cluster/cir/outputs ~/cir/outputs" in c for c in commands), node_name
        if head:
            assert node["resources"] == {"CPU": 0}
        else:
            assert node["min_workers"] == 0 and node["max_workers"] >= 1, node_name
            kinds["gpu" if gpus else "cpu"] += 1
            if gpus:
                assert node["resources"].get(node_name) == 1, f"{node_name}: its custom resource"
    assert kinds == {"gpu": 2, "cpu": 1}
    assert config["max_workers"] == sum(n.get("max_workers", 0) for n in config["available_node_types"].values()
                                        if n is not config["available_node_types"][config["head_node_type"]])
    run_options = " ".join(config["docker"]["run_options"])
    for option in ("-v /mnt/cluster:/mnt/cluster", "--env CIR_STORAGE=/mnt/cluster/cir", "--env RAY_AUTH_MODE=token"):
        assert option in run_options
    assert config["file_mounts"]["~/cir"] == "."
    assert "~/.ray/auth_token" in config["file_mounts"]
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in command:
            assert "cd ~/cir && ray start" in command, command


# ---------------------------------------------------------------------------------------
# Placeholders and pyproject
# ---------------------------------------------------------------------------------------

def test_every_placeholder_is_explained_in_the_readme():
    readme = (CLUSTER / "README.md").read_text()
    files = [CLUSTER / n for n in LAUNCHER_CONFIGS] + [KUBERAY / n for n in MANIFESTS] + [CLUSTER / "Dockerfile"]
    placeholders = {p for f in files for p in re.findall(r"YOUR-[A-Z0-9-]*[A-Z0-9]", f.read_text())}
    assert placeholders
    assert sorted(p for p in placeholders if p not in readme) == []


def test_jsonschema_is_a_test_dependency():
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(re.match(r"jsonschema\b", d) for d in extras["test"])
