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
