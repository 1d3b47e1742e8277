"""Kubernetes manifests parse as YAML and carry what a scheduler needs; the node entry script builds the
hostfile and rendezvous of an Indexed Job (run by bash with the environment Kubernetes would set)."""
import os
import shlex
import subprocess
import sys

import pytest
import yaml

from megaseek.planner import Hardware, Setup, make_plan
from tests.helpers import REPO, compose

K8S = REPO / "k8s"


def _docs(name):
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _gpus(container):
    return int(container["resources"]["limits"]["nvidia.com/gpu"])


def _check_overrides_plan(init, world):
    """The init container's planner check runs on the same overrides and world the trainers use, and that
    layout plans and fits."""
    assert init["command"][:2] == ["python", "launch/plan.py"] and "--check" in init["command"]
    assert int(init["command"][init["command"].index("--world") + 1]) == world
    cfg = compose([o for o in init["args"] if not o.startswith("run_dir=")])
    plan = make_plan(Setup.from_config(cfg, world), Hardware.from_config(cfg), world)
    assert plan.ok, plan.problems


def test_indexed_job_and_headless_service():
    svc, job = _docs("job.yaml")
    assert (svc["apiVersion"], svc["kind"]) == ("v1", "Service") and svc["spec"]["clusterIP"] == "None"
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] >= 2
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 1
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "OnFailure"
    assert pod["subdomain"] == svc["metadata"]["name"]
    assert svc["spec"]["selector"] == {"job-name": job["metadata"]["name"]}   # the Job controller's pod label
    (trainer,) = pod["containers"]
    gpus = _gpus(trainer)
    assert gpus == 8 and trainer["resources"]["requests"]["nvidia.com/gpu"] == gpus
    env = {e["name"]: e["value"] for e in trainer["env"]}
    assert int(env["NNODES"]) == spec["completions"] and int(env["GPUS_PER_NODE"]) == gpus
    assert env["JOB_NAME"] == job["metadata"]["name"] and env["SERVICE"] == svc["metadata"]["name"]
    assert trainer["command"] == ["bash", "k8s/node.sh"] and (REPO / "k8s" / "node.sh").exists()
    assert {m["mountPath"] for m in trainer["volumeMounts"]} >= {"/dev/shm", "/checkpoints"}
    (init,) = pod["initContainers"]
    assert init["args"] == trainer["args"]                                       # same overrides (YAML anchor)
    _check_overrides_plan(init, spec["completions"] * gpus)


def test_pytorchjob_with_c10d_rendezvous():
    (pj,) = _docs("pytorchjob.yaml")
    assert (pj["apiVersion"], pj["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    spec = pj["spec"]
    assert spec["runPolicy"]["backoffLimit"] >= 1 and spec["elasticPolicy"]["rdzvBackend"] == "c10d"
    worker = spec["pytorchReplicaSpecs"]["Worker"]
    assert worker["restartPolicy"] == "OnFailure" and worker["replicas"] == spec["elasticPolicy"]["maxReplicas"]
    pod = worker["template"]["spec"]
    (c,) = pod["containers"]
    assert c["name"] == "pytorch"
    gpus = _gpus(c)
    assert int(spec["nprocPerNode"]) == gpus == 8
    cmd = c["command"]
    assert cmd[0] == "torchrun" and "--rdzv_backend=c10d" in cmd and f"--nproc_per_node={gpus}" in cmd
    assert "--rdzv_endpoint=$(PET_RDZV_ENDPOINT)" in cmd and cmd[-1] == "launch/pretrain.py"
    (init,) = pod["initContainers"]
    assert init["args"] == c["args"]
    _check_overrides_plan(init, worker["replicas"] * gpus)


def test_manifests_deserialize_into_kubernetes_models():
    """With the Kubernetes client installed, the core objects deserialize into its typed models."""
    kubernetes = pytest.importorskip("kubernetes")
    api = kubernetes.client.ApiClient()
    svc, job = _docs("job.yaml")

    class Resp:
        def __init__(self, obj):
            import json
            self.data = json.dumps(obj)
    j = api.deserialize(Resp(job), "V1Job")
    assert j.spec.template.spec.restart_policy == "OnFailure" and j.spec.completion_mode == "Indexed"
    assert api.deserialize(Resp(svc), "V1Service").spec.cluster_ip == "None"


@pytest.mark.parametrize("index", [0, 1])
def test_node_script_hostfile_rendezvous_and_command(tmp_path, index):
    _, job = _docs("job.yaml")
    trainer = job["spec"]["template"]["spec"]["containers"][0]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NCCL_", "MASTER_"))}
    env.update({e["name"]: e["value"] for e in trainer["env"]})
    env.update(JOB_COMPLETION_INDEX=str(index), MEGASEEK_RUN_DIR=str(tmp_path / "run"), MEGASEEK_DRY_RUN="1",
               MEGASEEK_PYTHON=sys.executable)
    r = subprocess.run(["bash", "k8s/node.sh", *trainer["args"]], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:8] == [f"megaseek-train-{i}.megaseek-train slots=8" for i in range(8)]
    assert "MASTER_ADDR=megaseek-train-0.megaseek-train" in lines and "MASTER_PORT=29500" in lines
    assert "NCCL_IB_DISABLE=0" in lines and "NCCL_ALGO=Ring" in lines        # from +cluster=64xA100
    cmd = shlex.split(next(l for l in lines if l.startswith("CMD "))[4:])
    assert cmd[0] == "deepspeed" and f"--node_rank={index}" in cmd and "--no_ssh" in cmd
    assert cmd[cmd.index("launch/pretrain.py") + 1:] == [*trainer["args"], f"run_dir={tmp_path / 'run'}"]
