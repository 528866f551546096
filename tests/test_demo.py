"""The `gumbelkit` command: demo (categorical VAE), classify, and the data they read.

End-to-end runs use a few dozen steps, --quiet, few importance samples and one torch thread;
they check the written files, determinism and --resume, never timings.
"""

import doctest
import gzip
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from matplotlib import image as mpimg

import gumbelkit.data
import gumbelkit.demo
from gumbelkit.cli import build_parser, main
from gumbelkit.data import batches, load_digits, load_mnist, read_idx
from gumbelkit.demo import (
    ClassifyConfig,
    DemoConfig,
    History,
    available_estimators,
    build,
    make_schedule,
    run_classify,
    sample_latent,
    train,
)

TINY = ["--steps", "40", "--importance-samples", "4", "--latents", "6", "--classes", "4",
        "--hidden", "64", "--quiet"]
OUTPUTS = ["metrics.json", "curves.png", "reconstructions.png", "samples.png", "checkpoint.pt"]


def write_idx(path, array, type_byte=0x08, big_endian_dtype=">u1"):
    header = bytes([0, 0, type_byte, array.ndim]) + b"".join(
        int(s).to_bytes(4, "big") for s in array.shape)
    raw = header + np.asarray(array).astype(big_endian_dtype).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return raw


def fake_mnist(folder, n_train=120, n_test=30, side=6, gz=False):
    """Small MNIST-format files: random images, labels 0..9."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{split}-images-idx3-ubyte{ext}",
                  rng.integers(0, 256, (n, side, side), dtype=np.uint8))
        write_idx(folder / f"{split}-labels-idx1-ubyte{ext}", rng.integers(0, 10, n, dtype=np.uint8))
    return folder


def run_cli(*args):
    return main([str(a) for a in args])


def metrics_of(out):
    return json.loads((out / "metrics.json").read_text())


# ----------------------------------------------------------------------------- data

@pytest.mark.parametrize("module", [gumbelkit.data, gumbelkit.demo])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("type_byte, np_dtype, torch_dtype", [
    (0x08, ">u1", torch.uint8), (0x09, ">i1", torch.int8), (0x0B, ">i2", torch.int16),
    (0x0C, ">i4", torch.int32), (0x0D, ">f4", torch.float32), (0x0E, ">f8", torch.float64)])
def test_read_idx_round_trip(tmp_path, suffix, type_byte, np_dtype, torch_dtype):
    values = np.arange(-6, 18).reshape(2, 3, 4) * (1 if type_byte != 0x08 else -1) % 100
    if torch_dtype.is_floating_point:
        values = values / 7.0
    path = tmp_path / f"x-idx3{suffix}"
    write_idx(path, values, type_byte, np_dtype)
    got = read_idx(path)
    assert got.dtype == torch_dtype and got.shape == (2, 3, 4)
    assert np.array_equal(got.numpy(), values.astype(np_dtype).astype(got.numpy().dtype))


def test_read_idx_rejects_bad_files(tmp_path):
    good = write_idx(tmp_path / "good", np.zeros((3, 2, 2), dtype=np.uint8))
    cases = {
        "truncated": (good[:-1], "truncated"),
        "header-only": (good[:9], "truncated IDX header"),
        "trailing": (good + b"\x00", "trailing bytes"),
        "not-idx": (b"\x1f\x8bhello world", "not an IDX file"),
        "bad-type": (bytes([0, 0, 0x42, 1, 0, 0, 0, 0]), "not an IDX file"),
        "empty": (b"", "not an IDX file"),
    }
    for name, (raw, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(raw)
        with pytest.raises(ValueError, match=message) as err:
            read_idx(path)
        assert str(path) in str(err.value)
    broken_gz = tmp_path / "broken.gz"
    broken_gz.write_bytes(gzip.compress(good)[:-8])
    with pytest.raises(ValueError, match="decompress") as err:
        read_idx(broken_gz)
    assert str(broken_gz) in str(err.value)
    truncated_gz = tmp_path / "short.gz"
    truncated_gz.write_bytes(gzip.compress(good[:-3]))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(truncated_gz)
    with pytest.raises(FileNotFoundError, match="missing-file"):
        read_idx(tmp_path / "missing-file")


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist(tmp_path, gz):
    folder = fake_mnist(tmp_path / "mnist", gz=gz)
    ds = load_mnist(folder)
    assert ds.train_x.shape == (120, 36) and ds.test_x.shape == (30, 36)
    assert ds.image_shape == (6, 6) and ds.train_y.dtype == torch.int64
    assert set(ds.train_x.unique().tolist()) <= {0.0, 1.0}
    raw = read_idx(folder / ("train-images-idx3-ubyte" + (".gz" if gz else "")))
    assert torch.equal(ds.train_x, (raw.flatten(1).float() / 255 > 0.5).float())
    scaled = load_mnist(folder, binarize=False)
    assert float(scaled.train_x.max()) <= 1.0 and len(scaled.train_x.unique()) > 2


def test_load_mnist_errors_name_the_path(tmp_path):
    folder = fake_mnist(tmp_path / "mnist")
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte") as err:
        load_mnist(folder)
    assert str(folder) in str(err.value)
    write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(29, dtype=np.uint8))  # one short
    with pytest.raises(ValueError, match="expected 30 labels"):
        load_mnist(folder)
    write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(30, dtype=np.uint8))
    write_idx(folder / "t10k-images-idx3-ubyte", np.zeros((30, 4, 9), dtype=np.uint8))
    with pytest.raises(ValueError, match="do not match"):
        load_mnist(folder)
    images = folder / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated") as err:
        load_mnist(folder)
    assert str(images) in str(err.value)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_mnist(tmp_path / "nowhere")


def test_load_digits_fixed_split():
    a, b = load_digits(), load_digits()
    assert a.train_x.shape == (1438, 64) and a.test_x.shape == (359, 64)
    assert torch.equal(a.test_x, b.test_x) and torch.equal(a.train_y, b.train_y)
    assert set(a.train_x.unique().tolist()) == {0.0, 1.0}
    assert sorted(a.train_y.unique().tolist()) == list(range(10))


def test_batches_cover_each_epoch_and_resume_exactly():
    x = torch.arange(10.0).unsqueeze(1)
    it = batches(x, 3, seed=5)
    run = [next(it) for _ in range(9)]  # 3 full batches per epoch, the 10th row dropped
    for epoch in range(3):
        seen = torch.cat(run[3 * epoch: 3 * epoch + 3]).flatten()
        assert len(set(seen.tolist())) == 9
    resumed = batches(x, 3, seed=5, start_step=4)
    assert all(torch.equal(next(resumed), run[i]) for i in range(4, 9))
    other = batches(x, 3, seed=6)
    assert not all(torch.equal(next(other), run[i]) for i in range(3))
    with pytest.raises(ValueError, match="batch_size"):
        next(batches(x, 11, seed=0))


# ----------------------------------------------------------------------------- estimators

def test_sample_latent_builtin_and_delegated():
    logits = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed
    hard = sample_latent(logits, "st-gs", tau=0.5, generator=g(1))
    soft = sample_latent(logits, "soft", tau=0.5, generator=g(1))
    assert torch.equal(hard, torch.nn.functional.one_hot(soft.argmax(-1), 5).float())
    names = available_estimators()
    assert names[:2] == ["st-gs", "soft"]
    from gumbelkit import estimators

    assert set(names) == {"st-gs", "soft", *estimators.available()}
    for name in set(estimators.available("pathwise")) - {"st-gs"}:
        z = sample_latent(logits, name, tau=0.5, generator=g(2))
        assert torch.equal(z, estimators.sample(logits, name, tau=0.5, generator=g(2)))
    with pytest.raises(ValueError, match="unknown estimator"):
        sample_latent(logits, "nope", tau=1.0)


# ----------------------------------------------------------------------------- demo

@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert run_cli("demo", *TINY, "--out", out, "--seed", 3) == 0
    return out


def test_demo_writes_every_file_with_sane_contents(demo_run):
    for name in OUTPUTS:
        assert (demo_run / name).is_file(), name
    m = metrics_of(demo_run)
    assert len(m["steps"]) == len(m["loss"]) == len(m["neg_elbo"]) == len(m["tau"]) == 40
    assert m["steps"] == list(range(40))
    values = m["loss"] + m["neg_elbo"] + m["tau"] + list(m["final"].values())[:2]
    values.append(m["final"]["test_importance_bound"]["neg_log_likelihood_bound"])
    assert all(math.isfinite(v) for v in values)
    assert m["neg_elbo"][-1] < m["neg_elbo"][0]  # -ELBO decreases from the first logged step
    assert np.mean(m["neg_elbo"][-5:]) < np.mean(m["neg_elbo"][:5]) - 5  # by a wide margin
    assert m["loss"] == m["neg_elbo"]  # st-gs: the loss is the discrete -ELBO
    assert m["tau"][0] == 1.0 and all(0.5 <= t <= 1.0 for t in m["tau"])
    final = m["final"]
    assert final["test_importance_bound"]["m"] == 4
    assert 0 < final["test_importance_bound"]["neg_log_likelihood_bound"] <= final["test_neg_elbo"] + 1
    assert m["config"]["seed"] == 3 and m["config"]["latents"] == 6
    assert m["wall_time_s"] > 0 and m["train_time_s"] > 0
    for name in ("curves.png", "reconstructions.png", "samples.png"):
        img = mpimg.imread(demo_run / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert img.std() > 0.01  # not a blank canvas
        ink = (img[..., :3] < 0.98).any(-1)  # pixels that are not (near) white
        rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
        assert rows[-1] - rows[0] > 0.9 * img.shape[0] and cols[-1] - cols[0] > 0.9 * img.shape[1], name
    assert m["images"] == ["curves.png", "reconstructions.png", "samples.png"]
    ckpt = torch.load(demo_run / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 40 and set(ckpt) >= {"model", "optimizer", "generator", "config"}


def test_demo_is_deterministic_for_a_seed(demo_run, tmp_path):
    assert run_cli("demo", *TINY, "--out", tmp_path / "again", "--seed", 3) == 0
    a, b = metrics_of(demo_run), metrics_of(tmp_path / "again")
    assert a["loss"] == b["loss"] and a["final"] == b["final"]
    assert run_cli("demo", *TINY, "--out", tmp_path / "other", "--seed", 4) == 0
    assert metrics_of(tmp_path / "other")["loss"] != a["loss"]


def test_demo_resume_continues_exactly(demo_run, tmp_path):
    out = tmp_path / "resumed"
    half = [a if a != "40" else "20" for a in TINY]
    assert run_cli("demo", *half, "--out", out, "--seed", 3, "--checkpoint-every", 7) == 0
    assert metrics_of(out)["steps"] == list(range(20))
    # settings not given are taken from the checkpoint; --steps extends the run
    assert run_cli("demo", "--resume", "--steps", 40, "--out", out, "--quiet",
                   "--importance-samples", 4) == 0
    full, resumed = metrics_of(demo_run), metrics_of(out)
    assert resumed["resumed_from_step"] == 20
    assert resumed["loss"] == full["loss"] and resumed["tau"] == full["tau"]
    assert resumed["final"] == full["final"]
    a = torch.load(demo_run / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_demo_resume_errors(demo_run, tmp_path, capsys):
    assert run_cli("demo", "--resume", "--out", tmp_path / "empty", "--quiet") == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert run_cli("demo", "--resume", "--out", demo_run, "--estimator", "soft", "--quiet") == 2
    err = capsys.readouterr().err
    assert "estimator='st-gs'" in err and "estimator='soft'" in err
    assert run_cli("demo", "--resume", "--out", demo_run, "--steps", 40, "--quiet") == 2
    assert "already at step 40" in capsys.readouterr().err


def test_demo_soft_estimator_and_mnist(tmp_path):
    folder = fake_mnist(tmp_path / "mnist", gz=True)
    out = tmp_path / "soft"
    assert run_cli("demo", *TINY, "--estimator", "soft", "--data", "mnist", "--data-dir", folder,
                   "--out", out, "--schedule", "cosine", "--steps", 10, "--batch-size", 16) == 0
    m = metrics_of(out)
    assert m["config"]["data"] == "mnist" and m["config"]["estimator"] == "soft"
    assert m["loss"] != m["neg_elbo"]  # relaxed loss vs -ELBO of the discrete codes
    assert all(math.isfinite(v) for v in m["loss"] + m["neg_elbo"])
    assert mpimg.imread(out / "samples.png").ndim == 3


@pytest.mark.parametrize("name", ["reinmax", "gumbel-rao", "reinforce", "rloo"])
def test_demo_trains_with_other_estimators(tmp_path, name):
    out = tmp_path / name
    assert run_cli("demo", *TINY, "--estimator", name, "--steps", 5, "--out", out) == 0
    m = metrics_of(out)
    assert m["config"]["estimator"] == name and all(math.isfinite(v) for v in m["loss"])


def test_score_function_training_reduces_the_neg_elbo():
    """RLOO's surrogate has the -ELBO's value and an unbiased gradient: training improves it."""
    cfg = DemoConfig(estimator="rloo", latents=4, classes=4, hidden=(32,), samples=4)
    model, optimizer = build(cfg, in_features=64, device=torch.device("cpu"))
    history = History()
    train(model, optimizer, batches(load_digits().train_x, 100, seed=0), estimator="rloo",
          schedule=make_schedule(cfg), generator=torch.Generator().manual_seed(0), start=0, stop=150,
          history=history, samples=4)
    assert history.loss[0] == pytest.approx(history.neg_elbo[0], rel=1e-5)
    assert sum(history.neg_elbo[-20:]) / 20 < history.neg_elbo[0] - 5


def test_demo_errors_are_messages(tmp_path, capsys):
    assert run_cli("demo", "--data", "mnist", "--out", tmp_path / "x", "--quiet") == 2
    assert "--data-dir" in capsys.readouterr().err
    missing = tmp_path / "no-such-dir"
    assert run_cli("demo", "--data", "mnist", "--data-dir", missing, "--out", tmp_path, "--quiet") == 2
    assert str(missing) in capsys.readouterr().err
    assert run_cli("demo", "--steps", 0, "--out", tmp_path / "x", "--quiet") == 2
    assert "--steps must be a positive int" in capsys.readouterr().err
    assert run_cli("demo", "--tau0", 0.4, "--tau-min", 0.5, "--out", tmp_path / "x", "--quiet") == 2
    assert "tau_min" in capsys.readouterr().err
    assert run_cli("demo", "--device", "no-such-device", "--out", tmp_path / "x", "--quiet") == 2
    assert "--device 'no-such-device'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli("demo", "--estimator", "nope")
    with pytest.raises(ValueError, match="--schedule"):
        DemoConfig(schedule="step")


# ----------------------------------------------------------------------------- classify

def test_classify_beats_chance_and_matches_softmax(capsys):
    m = run_classify(ClassifyConfig(steps=300, eval_samples=5))
    printed = capsys.readouterr().out
    assert "plain softmax" in printed and "Gumbel-Softmax" in printed and "hard" in printed
    gs, sm = m["results"]["gumbel-softmax"], m["results"]["softmax"]
    for r in (gs, sm):
        assert 0.85 < r["argmax_accuracy"] <= 1.0  # 10 classes: chance is 0.1
        assert 0.8 < r["hard_sample_accuracy"] <= 1.0
    assert abs(gs["argmax_accuracy"] - sm["argmax_accuracy"]) < 0.06
    assert m == run_classify(ClassifyConfig(steps=300, eval_samples=5, quiet=True)) | {
        "wall_time_s": m["wall_time_s"], "config": m["config"]}


def test_cli_classify_and_help(capsys):
    assert run_cli("classify", "--steps", 50, "--quiet") == 0
    assert capsys.readouterr().out == ""
    parser = build_parser()
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["demo", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--estimator", "--latents", "--classes", "--steps", "--seed", "--out",
                   "--device", "--data", "--data-dir", "--resume", "--importance-samples"):
        assert option in text
    with pytest.raises(SystemExit):
        parser.parse_args([])  # a subcommand is required


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "gumbelkit.cli", "--version"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("gumbelkit ")


def test_demo_trains_data_parallel_under_torchrun(tmp_path):
    """torchrun with 2 gloo ranks: 20 DDP steps, every rank's noise its own, replicas identical."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "gumbelkit.cli", "demo", *map(str, TINY), "--steps", "20", "--dist-timeout", "60",
           "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = metrics_of(out)
    assert m["world_size"] == 2 and len(m["loss"]) == 20
    assert all(math.isfinite(v) for v in m["loss"])


def test_estimators_subcommand_writes_table_and_plot(tmp_path):
    assert run_cli("estimators", "--draws", 50, "--taus", 1.0, "--out", tmp_path) == 0
    table = (tmp_path / "estimators_bias.md").read_text()
    assert "reinmax" in table and "rloo" in table
    assert (tmp_path / "images" / "estimators_bias.png").stat().st_size > 0
