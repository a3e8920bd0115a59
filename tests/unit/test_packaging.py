"""Packaging: what installing and importing lightning-grid does to a user's environment.

Each check runs in a fresh interpreter (``sys.modules`` of this test process is full of everything), and
reads the installed metadata, the way pip and Lightning see the package.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
DIST = "lightning-grid"

# Linux-only (or POSIX-only) extension modules: set to None in sys.modules, an import of them fails as it
# would on Windows. torch and Lightning import fcntl and termios only optionally.
_BLOCK_POSIX = (
    "import sys\nfor _m in ('fcntl', 'termios', 'resource', 'grp', 'pwd'):\n    sys.modules[_m] = None\n"
)
_LAUNCHER_MODULES = (
    "lightning_grid.launcher",
    "lightning_grid.sdk",
    "lightning_grid.cli",
    "lightning_grid.ui",
)
_TORCH_MODULES = ("torch", "torchvision", "lightning", "pytorch_lightning", "lightning_fabric")


def _python(
    code: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """Runs ``code`` in a fresh interpreter, outside the repository (the package comes from its install)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LIGHTNING_GRID_", "PYTHONPATH"))}
    base.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", LIGHTNING_GRID_HOME=str(cwd / "home"))
    base.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=base, capture_output=True, text=True, timeout=timeout
    )


def _modules_after(code: str, cwd: Path, env: dict[str, str] | None = None) -> list[str]:
    proc = _python(
        code
        + "\nimport json, sys\nprint('MODULES=' + json.dumps(sorted(m for m, v in sys.modules.items() if v is not None)))",
        cwd,
        env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("MODULES=")][-1]
    return json.loads(line.removeprefix("MODULES="))


def _under(modules: list[str], roots: tuple[str, ...]) -> list[str]:
    return [m for m in modules if any(m == r or m.startswith(r + ".") for r in roots)]


# -- import weight and platform neutrality ---------------------------------------------------------------


def test_import_lightning_grid_loads_no_launcher_torch_or_linux_only_module(tmp_path: Path) -> None:
    modules = _modules_after(
        _BLOCK_POSIX + "import lightning_grid\nassert lightning_grid.__version__", tmp_path
    )
    assert _under(modules, _LAUNCHER_MODULES) == []
    assert _under(modules, _TORCH_MODULES) == []
    assert "fcntl" not in modules
    assert "lightning_grid.resumable.callback" not in modules


@pytest.mark.parametrize("resumable", ["0", "1"])
def test_lightning_entry_point_runs_without_launcher_or_linux_only_modules(
    tmp_path: Path, resumable: str
) -> None:
    """What Lightning runs in every training process: its Trainer loads our factory via the entry point."""
    code = _BLOCK_POSIX + (
        "from importlib.metadata import entry_points\n"
        "(ep,) = [e for e in entry_points(group='lightning.pytorch.callbacks_factory') if e.name == 'lightning_grid']\n"
        "assert ep.value == 'lightning_grid.resumable.factory:callbacks_factory', ep.value\n"
        "import lightning.pytorch as pl\n"
        "trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,\n"
        "                     default_root_dir='root')\n"
        "print('CALLBACKS=' + ','.join(type(c).__qualname__ for c in trainer.callbacks))\n"
    )
    proc = _python(
        code
        + "import json, sys\nprint('MODULES=' + json.dumps(sorted(m for m, v in sys.modules.items() if v is not None)))",
        tmp_path,
        env={"LIGHTNING_GRID_RESUMABLE": resumable, "LIGHTNING_GRID_CHECKPOINTS": str(tmp_path / "ck")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    callbacks = re.search(r"^CALLBACKS=(.*)$", proc.stdout, re.M)
    modules = json.loads(re.search(r"^MODULES=(.*)$", proc.stdout, re.M).group(1))  # type: ignore[union-attr]
    assert callbacks is not None
    assert "lightning_grid.resumable.factory" in modules  # Lightning did call us
    assert _under(modules, _LAUNCHER_MODULES) == []
    if resumable == "1":
        assert "Resumable" in callbacks.group(1).split(",")
    else:
        assert "Resumable" not in callbacks.group(1).split(",")
        # Not resuming: nothing of ours beyond the contract is loaded into the user's training process.
        assert "lightning_grid.resumable.callback" not in modules
        assert "lightning_grid.checkpoints" not in modules


def test_launcher_side_imports_no_torch_or_lightning(tmp_path: Path) -> None:
    code = (
        "import importlib, pkgutil\n"
        "import lightning_grid.launcher as launcher\n"
        "for info in pkgutil.iter_modules(launcher.__path__, 'lightning_grid.launcher.'):\n"
        "    importlib.import_module(info.name)\n"
        "import lightning_grid.cli, lightning_grid.sdk\n"
        "from lightning_grid import Experiment, Status\n"
        "from lightning_grid.launcher import Engine, Spec, Outcome\n"
        "if importlib.util.find_spec('starlette') is not None:\n"
        "    import lightning_grid.ui\n"
    )
    modules = _modules_after(code, tmp_path)
    assert "lightning_grid.launcher.engine" in modules  # the check saw the whole launcher
    assert _under(modules, _TORCH_MODULES) == []
    assert _under(modules, ("lightning_grid.resumable",)) == []


def test_public_names_still_import_from_the_package(tmp_path: Path) -> None:
    code = (
        "import lightning_grid\n"
        "from lightning_grid import Experiment, LightningGridError, Preempted, Resumable, Status, Trainer\n"
        "from lightning_grid.resumable import Resumable as R2\n"
        "from lightning_grid.launcher import Status as S2\n"
        "assert R2 is Resumable and S2 is Status and Status.RUNNING.value == 'running'\n"
        "assert Resumable.__module__ == 'lightning_grid.resumable.callback'\n"
        "assert Experiment.__module__ == 'lightning_grid.sdk'\n"
        "assert set(lightning_grid.__all__) <= set(dir(lightning_grid))\n"
        "try:\n"
        "    lightning_grid.NoSuchThing\n"
        "except AttributeError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
    )
    proc = _python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


# -- platforms ------------------------------------------------------------------------------------------


def test_platforms_are_declared() -> None:
    classifiers = importlib.metadata.metadata(DIST).get_all("Classifier") or []
    assert "Operating System :: POSIX :: Linux" in classifiers  # everything, the launcher included
    # the in-process side only (the tests above check it imports nothing Linux-only)
    assert {"Operating System :: MacOS", "Operating System :: Microsoft :: Windows"} <= set(classifiers)


@pytest.mark.parametrize("platform", ["darwin", "win32"])
def test_cli_on_an_unsupported_platform_says_so_in_one_line_and_exits_2(
    tmp_path: Path, platform: str
) -> None:
    # The console script's own target, loaded from the installed metadata, on a platform we pretend to be.
    code = (_BLOCK_POSIX if platform == "win32" else "import sys\n") + (
        f"sys.platform = {platform!r}\n"
        "from importlib.metadata import entry_points\n"
        "(ep,) = [e for e in entry_points(group='console_scripts') if e.name == 'lightning-grid']\n"
        "sys.argv = ['lightning-grid', 'list']\n"
        "sys.exit(ep.load()())\n"
    )
    proc = _python(code, tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "needs Linux" in lines[0] and platform in lines[0]


def test_experiment_on_an_unsupported_platform_raises_one_clear_error(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "sys.platform = 'darwin'\n"
        "from lightning_grid import Status\n"  # a plain enum: fine anywhere
        "from lightning_grid.launcher import UnsupportedPlatformError\n"
        "try:\n"
        "    from lightning_grid import Experiment\n"
        "except UnsupportedPlatformError as exc:\n"
        "    print('ERROR=' + str(exc))\n"
    )
    proc = _python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^ERROR=.*needs Linux.*darwin", proc.stdout, re.M), proc.stdout


def test_console_script_runs_the_cli_on_linux(tmp_path: Path) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("the launcher needs Linux")
    script = shutil.which("lightning-grid", path=str(Path(sys.executable).parent))
    assert script is not None, "the console script is not installed next to this interpreter"
    proc = subprocess.run([script, "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert importlib.metadata.version(DIST) in proc.stdout


# -- the standalone pytorch_lightning package -----------------------------------------------------------


@pytest.mark.skipif(
    importlib.util.find_spec("pytorch_lightning") is None, reason="pytorch_lightning not installed"
)
def test_standalone_pytorch_lightning_trainer_trains_and_is_told_it_is_not_resumable(tmp_path: Path) -> None:
    # Under `lightning-grid run --resumable`: a lightning.pytorch Resumable handed to this Trainer used to
    # make fit() fail ("An invalid dataloader was passed"); now it trains, unmodified, with one warning.
    code = (
        "import sys\n"
        "import pytorch_lightning as pl\n"
        "from pytorch_lightning.demos.boring_classes import BoringModel\n"
        "for run in range(2):  # one warning per process, however many Trainers\n"
        "    trainer = pl.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=0, logger=False,\n"
        "                         enable_progress_bar=False, enable_model_summary=False, default_root_dir='root')\n"
        "    assert not [c for c in trainer.callbacks if type(c).__module__.startswith('lightning_grid')]\n"
        "    trainer.fit(BoringModel())\n"
        "    assert trainer.global_step == 4, trainer.global_step\n"
        "assert 'lightning_grid.resumable.factory' in sys.modules  # the entry point was called\n"
        "assert 'lightning.pytorch' not in sys.modules  # and loaded no second Lightning\n"
        "print('FIT-OK')\n"
    )
    proc = _python(
        code,
        tmp_path,
        env={"LIGHTNING_GRID_RESUMABLE": "1", "LIGHTNING_GRID_CHECKPOINTS": str(tmp_path / "ck")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FIT-OK" in proc.stdout
    warnings = [ln for ln in proc.stderr.splitlines() if "standalone `pytorch_lightning`" in ln]
    assert len(warnings) == 1, proc.stderr[-3000:]


# -- version and requirements ---------------------------------------------------------------------------


def test_version_is_defined_once(tmp_path: Path) -> None:
    proc = _python("import lightning_grid; print(lightning_grid.__version__)", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == importlib.metadata.version(DIST)
    literal = re.compile(r"""__version__\s*=\s*["']\d+\.\d+""")  # a release number written in the source
    assert not [p for p in (REPO / "lightning_grid").rglob("*.py") if literal.search(p.read_text())]


def _requirements() -> list[Requirement]:
    return [Requirement(r) for r in importlib.metadata.requires(DIST) or []]


def test_torch_and_torchvision_have_lower_bounds_only() -> None:
    for req in _requirements():
        if canonicalize_name(req.name) in {"torch", "torchvision"}:
            capping = [s for s in req.specifier if s.operator in {"<", "<=", "==", "===", "~="}]
            assert not capping, f"{req}: a cap makes pip downgrade (or refuse) a user's newer release"


def test_torchvision_is_an_extra_for_the_example_and_the_tests() -> None:
    torchvision = [r for r in _requirements() if canonicalize_name(r.name) == "torchvision"]
    assert torchvision, "the example and the tests need torchvision from some extra"
    for extra in ("examples", "test"):
        assert any(r.marker is not None and r.marker.evaluate({"extra": extra}) for r in torchvision), extra
    assert not any(r.marker is None or r.marker.evaluate({"extra": ""}) for r in torchvision)


# -- pip, for real: installing next to a newer torch -----------------------------------------------------


def _local_package_sources() -> tuple[list[str], list[str]]:
    """The configured indexes and find-links that need no network (file:// or a folder): (indexes, links)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60
    )
    indexes: list[str] = []
    links: list[str] = []
    for line in proc.stdout.splitlines():
        key, _, value = line.partition("=")
        for item in value.strip().strip("'\"").split():
            local = item.startswith("file://") or os.path.isabs(item)
            if not local or not os.path.exists(item.removeprefix("file://")):
                continue
            if key.endswith(("index-url", "extra-index-url")) and item not in indexes:
                indexes.append(item)
            elif key.endswith("find-links") and item not in links:
                links.append(item)
    return indexes, links


def _fake_venv_with_torch(root: Path, torch_version: str) -> Path:
    """A fresh venv whose only distribution is a torch newer than any the indexes offer (metadata only)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()
    info = Path(purelib) / f"torch-{torch_version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {torch_version}\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text("")
    return python


def _dry_run(python: Path, indexes: list[str], links: list[str], args: list[str], report: Path) -> dict:
    # The user's pip, not this machine's: no config file (this one pins torch<=2.14.1 for its own disk).
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    sources = ["--index-url", indexes[0]] if indexes else ["--no-index"]
    for index in indexes[1:]:
        sources += ["--extra-index-url", index]
    for link in links:
        sources += ["--find-links", link]
    cmd = [sys.executable, "-m", "pip", "--python", str(python), "install", "--dry-run", "--quiet",
           "--report", str(report), *sources, *args]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(report.read_text())


def _installs(report: dict) -> dict[str, str]:
    return {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in report["install"]}


def test_installing_next_to_a_newer_torch_changes_no_torch(tmp_path: Path) -> None:
    indexes, links = _local_package_sources()
    if not indexes and not links:
        pytest.skip("no local package index or find-links configured: resolving would need the network")
    if tuple(int(x) for x in importlib.metadata.version("pip").split(".")[:2]) < (22, 3):
        pytest.skip("pip --python needs pip 22.3")
    python = _fake_venv_with_torch(tmp_path / "venv", "2.15.0")
    # Build from a copy: pip builds in the source tree, and a stale lightning_grid.egg-info left in the
    # repository would shadow the installed metadata for every process started there.
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy2(REPO / "pyproject.toml", project)
    shutil.copy2(REPO / "README.md", project)
    shutil.copytree(
        REPO / "lightning_grid", project / "lightning_grid", ignore=shutil.ignore_patterns("__pycache__")
    )

    installs = _installs(_dry_run(python, indexes, links, [str(project)], tmp_path / "report.json"))
    assert "lightning-grid" in installs and "lightning" in installs, installs  # it did resolve the tree
    assert "torch" not in installs, f"pip would replace the user's torch 2.15.0 with {installs.get('torch')}"
    assert "torchvision" not in installs, installs  # an extra now; its releases pin one torch each

    # Control: the same harness does see a requirement that would move that torch.
    control = _installs(
        _dry_run(python, indexes, links, ["--no-deps", "torch>=2.3,<=2.14.1"], tmp_path / "c.json")
    )
    assert "torch" in control, control


def test_our_logger_follows_lightnings_convention(tmp_path: Path) -> None:
    """Without logging configured our messages reach stderr on their own; once the user configures a
    root handler, they go through it (as Lightning's own logger does), and are not printed twice."""
    emit = "import logging, lightning_grid\nlogging.getLogger('lightning_grid').info('hello from us')\n"
    plain = _python(emit, tmp_path)
    assert plain.returncode == 0 and plain.stderr.strip().splitlines() == ["hello from us"]
    configured = _python(
        "import logging\nlogging.basicConfig(format='ROOT %(name)s: %(message)s')\n" + emit, tmp_path
    )
    assert configured.returncode == 0 and configured.stderr.strip().splitlines() == [
        "ROOT lightning_grid: hello from us"
    ]
