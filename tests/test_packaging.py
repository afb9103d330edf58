"""The distribution: every package folder in the wheel, and a client install without torch."""

from __future__ import annotations

import json
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PACKAGES = {"shared": "kleinfarm/shared", "producer": "kleinfarm/producer", "worker": "kleinfarm/worker"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("kleinfarm-*.whl")
    return built


def test_the_wheel_holds_every_module_of_every_package_folder(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, package in PACKAGES.items():
        for source in (ROOT / folder).rglob("*"):
            if source.is_file() and source.suffix in (".py", ".lua", ".typed"):
                assert f"{package}/{source.relative_to(ROOT / folder)}" in names


def test_the_client_installs_without_torch_and_submits(wheel: Path, tmp_path: Path, farm_env: dict[str, str]) -> None:
    env_dir = tmp_path / "client-venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheel)], check=True, capture_output=True)
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=json"], check=True, capture_output=True)
    installed = {package["name"].lower() for package in json.loads(listed.stdout)}
    assert not installed & {"torch", "diffusers", "transformers"}

    script = (
        "import sys\n"
        "from kleinfarm.producer import FarmClient\n"
        "from kleinfarm.shared.jobs import Campaign\n"
        "handle = FarmClient.from_env().submit(Campaign.from_raw('no-torch', [{'prompt': 'p'}], priority=-1000))\n"
        "print(handle.status().total)\n"
        "handle.cancel()\n"
        "assert 'torch' not in sys.modules\n"
    )
    ran = subprocess.run([str(python), "-c", script], env=farm_env, capture_output=True, text=True, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "1"
