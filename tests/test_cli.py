"""The `gumbelkit` console script as a user meets it: every case runs the real command in a
subprocess, in a temporary directory, and checks the exit status, that errors are ONE line
(no traceback) and come before any work, and what is left on disk.

Missing extras are simulated by a ``sitecustomize`` that puts ``None`` into ``sys.modules`` for
the hidden names (``import rich`` then fails and ``importlib.util.find_spec`` says absent).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from test_demo import fake_mnist

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--importance-samples", "4", "--latents", "6", "--classes", "4", "--hidden", "32", "--quiet"]
INSTALL = "pip install 'gumbelkit[demo]'"


def console_script() -> list[str]:
    """The installed ``gumbelkit`` entry point next to this interpreter; where the package is
    not installed (a bare checkout), the same call the entry point makes."""
    script = Path(sys.executable).with_name("gumbelkit")
    if script.is_file():
        return [sys.executable, str(script)]
    return [sys.executable, "-c", "import sys; from gumbelkit.cli import main; sys.exit(main())"]


def env_for(hide: tuple[str, ...] = (), tmp: Path | None = None) -> dict[str, str]:
    src = str(ROOT / "src")
    paths = [src, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    if hide:
        assert tmp is not None
        site = tmp / "hide-site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(
            "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in hide))
        paths.insert(0, str(site))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def gumbelkit(*args, cwd: Path, hide: tuple[str, ...] = (), timeout: float = 300,
              **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*console_script(), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env_for(hide, cwd), **kw)


def one_line_error(proc: subprocess.CompletedProcess, command: str = "demo") -> str:
    """Exit status 2 and exactly one line on stderr, ``gumbelkit COMMAND: error: ...``."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"gumbelkit {command}: error: "), lines[0]
    assert "Traceback" not in proc.stderr
    return lines[0]


def metrics_of(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


# ----------------------------------------------------------------------------- missing extras

@pytest.mark.parametrize("command", ["demo", "classify", "estimators"])
def test_missing_extras_one_line_before_any_work(tmp_path, command):
    proc = gumbelkit(command, cwd=tmp_path, hide=("rich", "matplotlib", "sklearn"))
    line = one_line_error(proc, command)
    assert INSTALL in line and "rich" in line and "ModuleNotFoundError" not in line
    if command != "estimators":
        assert "scikit-learn" in line
    if command != "classify":  # classify draws no plots
        assert "matplotlib" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hide-site"]  # nothing written


def test_demo_without_matplotlib_still_writes_metrics(tmp_path):
    out = tmp_path / "run"
    proc = gumbelkit("demo", *TINY, "--steps", 12, "--out", out, cwd=tmp_path, hide=("matplotlib",))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "matplotlib is not installed" in proc.stderr and INSTALL in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.json"]
    m = metrics_of(out)
    assert len(m["loss"]) == 12 and m["images"] == []


def test_demo_on_mnist_needs_no_scikit_learn(tmp_path):
    folder = fake_mnist(tmp_path / "mnist")
    proc = gumbelkit("demo", *TINY, "--steps", 5, "--batch-size", 16, "--data", "mnist",
                     "--data-dir", folder, "--out", tmp_path / "run", cwd=tmp_path, hide=("sklearn",))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert metrics_of(tmp_path / "run")["config"]["data"] == "mnist"


def test_estimators_without_matplotlib_writes_the_table(tmp_path):
    proc = gumbelkit("estimators", "--draws", 4, "--taus", 1, "--methods", "st", "reinforce",
                     cwd=tmp_path, hide=("matplotlib",))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "gumbelkit-estimators" / "estimators_bias.md").is_file()
    assert not (tmp_path / "gumbelkit-estimators" / "images").exists()


# ----------------------------------------------------------------------------- checked before training

def test_estimators_default_output_is_a_fresh_directory_not_docs(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "estimators_bias.md").write_text("tracked page")
    proc = gumbelkit("estimators", "--draws", 4, "--taus", 1, "--methods", "st", "rloo", "--no-plot",
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (docs / "estimators_bias.md").read_text() == "tracked page"
    assert "rloo" in (tmp_path / "gumbelkit-estimators" / "estimators_bias.md").read_text()


def _unwritable_dir(tmp_path: Path) -> Path:
    """An existing directory this user cannot write: mode 0o555, or for root (who ignores modes)
    sysfs, which refuses new files to everyone."""
    if os.name != "posix":
        pytest.skip("POSIX permissions")
    if os.geteuid() != 0:
        out = tmp_path / "read-only"
        out.mkdir()
        out.chmod(0o555)
        return out
    for candidate in (Path("/sys/kernel"), Path("/sys")):
        try:
            with tempfile.NamedTemporaryFile(dir=candidate):
                pass
        except OSError:
            return candidate
    pytest.skip("running as root with no read-only directory to try")


def test_unwritable_out_fails_before_training(tmp_path):
    out = _unwritable_dir(tmp_path)
    before = sorted(p.name for p in out.iterdir())
    proc = gumbelkit("demo", *TINY, "--steps", 100000, "--out", out, cwd=tmp_path, timeout=120)
    line = one_line_error(proc)
    assert f"--out {out} is not a writable directory" in line
    assert sorted(p.name for p in out.iterdir()) == before
    # a path under a regular file is no directory at all
    (tmp_path / "a-file").write_text("")
    line = one_line_error(gumbelkit("demo", "--out", tmp_path / "a-file" / "run", cwd=tmp_path))
    assert "is not a writable directory" in line
    line = one_line_error(gumbelkit("estimators", "--out", out, cwd=tmp_path), "estimators")
    assert "is not a writable directory" in line


def test_zero_test_images_fail_before_training(tmp_path):
    folder = fake_mnist(tmp_path / "mnist", n_test=0)
    line = one_line_error(gumbelkit("demo", *TINY, "--data", "mnist", "--data-dir", folder,
                                    "--out", tmp_path / "run", cwd=tmp_path))
    assert "t10k-images-idx3-ubyte" in line and "0 images" in line
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("args, message", [
    (["--seed", "-1"], "--seed must be an int from 0 to 2**63 - 1"),
    (["--seed", str(2**64)], "--seed must be an int from 0 to 2**63 - 1"),
    (["--estimator", "rloo", "--samples", "1"], "--estimator rloo needs --samples 2 or more"),
])
def test_setting_errors_are_one_line(tmp_path, args, message):
    line = one_line_error(gumbelkit("demo", *args, "--out", tmp_path / "run", cwd=tmp_path))
    assert message in line
    assert not (tmp_path / "run").exists()


def test_classify_and_estimators_check_their_settings(tmp_path):
    assert "--seed" in one_line_error(gumbelkit("classify", "--seed", -3, cwd=tmp_path), "classify")
    line = one_line_error(gumbelkit("estimators", "--methods", "rloo", "--n-samples", 1, cwd=tmp_path),
                          "estimators")
    assert "--n-samples must be >= 2 for rloo" in line
    assert not (tmp_path / "gumbelkit-estimators").exists() or not any(
        (tmp_path / "gumbelkit-estimators").iterdir())


def test_a_rank_that_never_joins_is_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    proc = subprocess.run([*console_script(), "demo", *TINY, "--dist-timeout", "2", "--out",
                           str(tmp_path / "run")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**env_for(), **env})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("gumbelkit demo: error:")]
    assert len(errors) == 1 and "did not form within 2 s" in errors[0] and "never joined" in errors[0]


# ----------------------------------------------------------------------------- foreign checkpoints

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    proc = gumbelkit("demo", *TINY, "--steps", 10, "--out", out, cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def _foreign(kind: str, good: bytes, tmp_path: Path) -> bytes:
    path = tmp_path / "x.pt"
    if kind == "empty":
        return b""
    if kind == "truncated":
        return good[: len(good) // 2]
    if kind == "other-file-type":
        return b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    if kind == "text":
        return b'{"step": 10, "config": {}}\n'
    state = torch.load(tmp_path.parent / "src.pt", weights_only=True)
    if kind == "plain-state-dict":
        torch.save(state["model"], path)
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "other-config":  # the settings of another model: its tensors do not fit
        state["config"]["latents"] = 9
        torch.save(state, path)
    elif kind == "unknown-setting":
        state["config"]["width"] = 3
        torch.save(state, path)
    elif kind == "not-weights-only":  # arbitrary pickled objects are refused, not executed
        torch.save({**state, "extra": Path("x")}, path)
    return path.read_bytes()


@pytest.mark.parametrize("kind", ["empty", "truncated", "other-file-type", "text", "plain-state-dict",
                                  "tensor", "other-config", "unknown-setting", "not-weights-only"])
def test_foreign_or_damaged_checkpoint_is_one_line(finished_run, tmp_path, kind):
    good = (finished_run / "checkpoint.pt").read_bytes()
    (tmp_path / "src.pt").write_bytes(good)
    work = tmp_path / "w"
    work.mkdir()
    out = work / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(_foreign(kind, good, work))
    line = one_line_error(gumbelkit("demo", "--resume", "--steps", 20, "--out", out, cwd=work))
    assert f"cannot read the checkpoint {out / 'checkpoint.pt'}" in line


def test_resume_errors_name_the_fix(finished_run, tmp_path):
    line = one_line_error(gumbelkit("demo", "--resume", "--out", tmp_path / "none", cwd=tmp_path))
    assert "no checkpoint" in line
    line = one_line_error(gumbelkit("demo", "--resume", "--out", finished_run, cwd=tmp_path))
    assert "already at step 10" in line and "--steps" in line
    line = one_line_error(gumbelkit("demo", "--resume", "--steps", 20, "--hidden", 64, "--out",
                                    finished_run, cwd=tmp_path))
    assert "hidden=(32,)" in line and "hidden=(64,)" in line


# ----------------------------------------------------------------------------- Ctrl-C and resume

def interrupt(cmd: list[str], out: Path, cwd: Path) -> subprocess.CompletedProcess:
    """Start ``cmd``, send SIGINT once its first checkpoint exists, and wait for it."""
    proc = subprocess.Popen([*console_script(), *cmd], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env_for())
    deadline = time.monotonic() + 240
    while not (out / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.skipif(os.name != "posix", reason="SIGINT delivery")
def test_ctrl_c_saves_and_the_original_command_resumes(tmp_path):
    out = tmp_path / "run"
    original = ["demo", *TINY, "--steps", "1500", "--checkpoint-every", "20", "--importance-samples",
                "3", "--out", str(out)]
    proc = interrupt(original, out, tmp_path)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("gumbelkit demo: interrupted at step ")
    step = int(line.split("interrupted at step ")[1].split(";")[0])
    assert 20 <= step < 1500
    assert "resume with: gumbelkit demo" in line and line.endswith("--resume")
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["step"] == step  # nothing lost: the checkpoint is the state after that step
    # the original command line, --hidden included, with --resume appended
    again = gumbelkit(*original, "--resume", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    m = metrics_of(out)
    assert m["resumed_from_step"] == step and m["steps"] == list(range(1500))
    assert m["loss"][:step] == saved["history"]["loss"]
    assert m["config"]["importance_samples"] == 3 and m["final"]["test_importance_bound"]["m"] == 3


@pytest.mark.skipif(os.name != "posix", reason="SIGINT delivery")
def test_resume_without_settings_continues_to_the_original_target(tmp_path):
    out = tmp_path / "run"
    original = ["demo", *TINY, "--steps", "1500", "--checkpoint-every", "20", "--importance-samples",
                "3", "--seed", "5", "--out", str(out)]
    assert interrupt(original, out, tmp_path).returncode == 130
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    proc = gumbelkit("demo", "--resume", "--quiet", "--out", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = metrics_of(out)
    assert m["resumed_from_step"] == step and len(m["steps"]) == 1500  # not the default 6000
    assert m["config"]["importance_samples"] == 3 and m["config"]["seed"] == 5
    assert m["config"]["hidden"] == [32] and m["config"]["checkpoint_every"] == 20


def test_cli_docstring_examples(capsys):
    import doctest

    import gumbelkit.cli

    result = doctest.testmod(gumbelkit.cli, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
    assert "--steps must be a positive int" in capsys.readouterr().err


def test_resume_command_appends_resume_once():
    from gumbelkit.cli import _resume_command

    assert _resume_command(["demo", "--out", "a b"]) == "gumbelkit demo --out 'a b' --resume"
    assert _resume_command(["demo", "--resume"]) == "gumbelkit demo --resume"
