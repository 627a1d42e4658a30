"""The cost and stability commands refuse bad arguments before any work: one line naming
the flag, exit status 2, no traceback (a bad output path used to fail after the run)."""

import re

import pytest
import torch

from pyeuler.cli import main


@pytest.mark.parametrize("argv, message", [
    (["cost", "--json", "{file}/x.json"], "--json: cannot write"),
    (["cost", "--json", "{dir}"], "--json: .* is a folder"),
    (["cost", "--theta", "2"], "--theta: expected a number in \\[0, 1\\]"),
    (["cost", "--model", "foo"], "unknown model 'foo'"),
    (["stability", "--data", "moons", "--model", "mlp", "--json", "{file}/x.json"],
     "--json: cannot write"),
    (["stability", "--data", "moons", "--model", "mlp", "--plot", "{file}/x.png"],
     "--plot: cannot write"),
    (["stability", "--data", "moons", "--model", "mlp", "--out", "{file}"],
     "--out: .* is not a folder"),
    (["stability", "--data", "moons", "--model", "mlp", "--device", "banana"],
     "--device: expected cpu, cuda"),
    pytest.param(["stability", "--data", "moons", "--model", "mlp", "--backend", "cuda"],
                 "--backend: backend='cuda' is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(),
                                          reason="the cuda backend is available on a GPU")),
])
def test_bad_arguments_exit_2_naming_the_flag(argv, message, tmp_path, capsys):
    regular_file = tmp_path / "a-file"
    regular_file.write_text("")
    argv = [a.format(file=regular_file, dir=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv + (["--no-host-time"] if argv[0] == "cost" else []))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert re.search(message, err[0]), err[0]


def test_backend_choices_are_checked_by_argparse(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["stability", "--backend", "nonsense"])
    assert exit_info.value.code == 2
    assert "argument --backend: invalid choice" in capsys.readouterr().err


def _pyeuler(*argv, timeout=300, env=None):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "pyeuler", *argv], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_eps_accepts_fractions_as_eval_prints_them(capsys):
    """--eps 8/255 (how ε is written, and how eval prints it) is a number."""
    from pyeuler.cli.train import _nonneg_float

    assert _nonneg_float("8/255") == 8 / 255 and _nonneg_float("0.031") == 0.031
    for bad in ("8/0", "eight", "inf", "-1/255"):
        with pytest.raises(Exception, match="expected a number"):
            _nonneg_float(bad)
    done = _pyeuler("train", "--data", "moons", "--eps", "8/2x55")
    assert done.returncode == 2 and "--eps" in done.stderr and "Traceback" not in done.stderr


def test_resume_with_another_optimizer_is_one_line_exit_2(tmp_path):
    common = ["train", "--data", "moons", "--ie-steps", "0", "--eval-samples", "8",
              "--threads", "1", "--out", str(tmp_path), "--no-progress"]
    assert _pyeuler(*common, "--epochs", "1", "--optimizer", "sgd").returncode == 0
    done = _pyeuler(*common, "--epochs", "2", "--optimizer", "adam", "--resume")
    assert done.returncode == 2, done.stdout + done.stderr
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in done.stderr
    assert "was trained with --optimizer sgd; this run asks for --optimizer adam" in err[0]


def test_ctrl_c_says_where_the_checkpoint_is_and_exits_130(tmp_path):
    """SIGINT during training: one line naming the last checkpoint and --resume, exit 130."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "pyeuler", "train", "--data", "moons", "--ie-steps", "0",
         "--epochs", "100000", "--threads", "1", "--out", str(tmp_path), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while (not list(tmp_path.glob("moons-mlp-K0-*.pt")) and time.monotonic() < deadline
               and proc.poll() is None):
            time.sleep(0.2)
        (ckpt,) = tmp_path.glob("moons-mlp-K0-*.pt")
        time.sleep(0.5)  # let the first save complete
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1
    assert f"the last checkpoint is {ckpt} (epoch" in lines[0] and "--resume" in lines[0]


_NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(),
                              reason="the cuda backend is available on a GPU")


@pytest.fixture(scope="module")
def moons_checkpoint(tmp_path_factory):
    """A moons MLP checkpoint as pyeuler train writes one (saved untrained: no work)."""
    from pyeuler.checkpoint import save_checkpoint
    from pyeuler.robust import build_model

    kwargs = dict(h=1.0, ie_steps=0, norm="group")
    path = tmp_path_factory.mktemp("ckpt") / "moons.pt"
    save_checkpoint(path, build_model("mlp", (2,), 2, **kwargs), name="mlp", model_kwargs=kwargs,
                    config={"data": "moons", "seed": 0, "eps": 0.05})
    return path


@pytest.mark.parametrize("argv, message", [
    pytest.param(["train", "--data", "moons", "--backend", "cuda"],
                 "--backend: backend='cuda' is not available", marks=_NO_CUDA),
    (["train", "--data", "moons", "--json", "{file}/r.json"],
     "--json: cannot write .*a-file is not a folder"),
    (["train", "--data", "moons", "--out", "{file}/runs"],
     "--out: cannot write .*a-file is not a folder"),
    (["train", "--data", "moons", "--out", "{file}"], "--out: .*a-file exists and is not a folder"),
    (["train", "--data", "moons", "--model", "wrn-16-1"], "is convolutional and needs image"),
    (["train", "--data", "moons", "--recompute", "fast"],
     "argument --recompute: invalid choice: 'fast'"),
    (["bench", "--recompute", "full", "True"], "argument --recompute: invalid choice: 'True'"),
    pytest.param(["eval", "--checkpoint", "{ckpt}", "--backend", "cuda"],
                 "--backend: backend='cuda' is not available", marks=_NO_CUDA),
    (["eval", "--checkpoint", "{ckpt}", "--json", "{file}/e.json"],
     "--json: cannot write .*a-file is not a folder"),
    (["eval", "--checkpoint", "{ckpt}", "--json", "{file}"],
     "--json: .*a-file exists and is not a pyeuler eval result"),
    pytest.param(["stability", "--data", "moons", "--model", "mlp", "--backend", "cuda"],
                 "--backend: backend='cuda' is not available", marks=_NO_CUDA),
    (["stability", "--data", "moons", "--model", "mlp", "--out", "{file}/s"],
     "--out: cannot write .*a-file is not a folder"),
    pytest.param(["bench", "--backends", "eager", "cuda"],
                 "--backends: backend='cuda' is not available", marks=_NO_CUDA),
    (["bench", "--out", "{file}/results"], "--out: cannot write .*a-file is not a folder"),
    (["bench", "--depth", "11"], "--depth: a WideResNet's depth is 6n\\+4"),
    # a policy no row can show would be a silent no-op
    (["bench", "--backends", "reference", "eager", "--recompute", "full"],
     "--recompute full: a policy applies only to unrolled IE-Skips .* no requested row is one"),
    (["bench", "--steps", "0", "--recompute", "none"],
     "--recompute none: a policy applies only to unrolled IE-Skips"),
    pytest.param(["bench", "--recompute", "full"],
                 "no requested row is one \\(the default --backends here: eager reference\\)",
                 marks=_NO_CUDA),
    (["cost", "--backend", "reference", "--recompute", "none", "full"],
     "--recompute none full: a policy applies only to unrolled IE-Skips .* no requested "
     "configuration is one"),
    (["cost", "--ie-steps", "0", "--recompute", "full"],
     "--recompute full: a policy applies only to unrolled IE-Skips"),
    (["cost", "--json", "{file}/c.json"], "--json: cannot write .*a-file is not a folder"),
])
def test_mistakes_are_one_line_exit_2_before_any_work(argv, message, tmp_path,
                                                      moons_checkpoint):
    """Through the command line as a user runs it: exit status 2, one line on stderr naming
    the flag, and nothing on stdout (every command prints its header line only once the
    checks have passed, before loading data)."""
    regular_file = tmp_path / "a-file"
    regular_file.write_text("not a folder, not an eval result")
    argv = [a.format(file=regular_file, ckpt=moons_checkpoint) for a in argv]
    done = _pyeuler(*argv)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in done.stderr, done.stderr
    assert re.search(message, err[0]), err[0]
    assert regular_file.read_text() == "not a folder, not an eval result"


def test_a_bad_local_world_size_is_one_line_exit_2():
    import os
    import subprocess
    import sys

    env = dict(os.environ, LOCAL_WORLD_SIZE="zero")
    env.pop("OMP_NUM_THREADS", None)
    done = subprocess.run([sys.executable, "-m", "pyeuler", "train", "--data", "moons"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == "pyeuler: error: LOCAL_WORLD_SIZE: expected an int >= 1, got 'zero'"


def test_argparse_mistakes_are_one_line(capsys):
    """argparse's own errors (a bad type, a missing value) without the usage block."""
    for argv in (["train", "--eps", "-1"], ["train", "--epochs"], ["eval"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("pyeuler "), err
        assert "--help" in err[0]


def test_bad_pyeuler_backend_is_one_line_exit_2():
    import os

    env = dict(os.environ, PYEULER_BACKEND="gpu")
    out = _pyeuler("info", env=env)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "pyeuler: error: PYEULER_BACKEND must be one of ('reference', 'eager', 'triton', "
        "'cuda', 'auto'), got 'gpu' (see pyeuler --help)"]


def test_warnings_of_a_command_are_one_line(capsys):
    import warnings

    from pyeuler.cli import _one_line_warning

    line = _one_line_warning(UserWarning("careful"), UserWarning, "/x/y.py", 3, "code()")
    assert line == "pyeuler: UserWarning: careful\n"
    before = warnings.formatwarning
    main(["info"])
    assert warnings.formatwarning is before  # restored after the command
