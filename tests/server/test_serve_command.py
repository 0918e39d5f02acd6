"""``nijimi serve`` as users run it: the README's A1111 client example works as written, the command serves in a
process of its own and stops cleanly on Ctrl+C, and a bad ``--model`` is one ``error:`` line."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
from helpers import run_cli
from PIL import Image

from nijimi.pipelines.request import GenerationRequest

README = Path(__file__).parents[2] / "README.md"


def readme_client() -> str:
    """The first Python block of the README's ``nijimi serve`` section."""
    section = README.read_text(encoding="utf-8").split("\n## nijimi serve\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_client_example_works_as_written(served, tmp_path, monkeypatch, capsys):
    code = readme_client()
    assert 'url = "http://127.0.0.1:7860"' in code
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("http://127.0.0.1:7860", served.url), "README.md", "exec"), {})
    assert '"all_seeds": [42, 43]' in capsys.readouterr().out
    request = GenerationRequest("a red circle on the left", "blurry", steps=20, guidance=7, sampler="DPM++ 2M",
                                seed=42, width=64, height=64, batch=2)
    for i, want in enumerate(served.pipe.generate(request).images):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / f"txt2img-{i}.png").convert("RGB")),
                                      np.asarray(want))


def test_the_command_serves_and_stops_on_ctrl_c(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NIJIMI_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(README.parent), os.environ.get("PYTHONPATH", "")])}
    # a shell's background job ignores SIGINT, and so would the server it starts: give it the default, Ctrl+C's
    process = subprocess.Popen([sys.executable, "-m", "nijimi", "serve", "--port", "0", "--quiet", "--output-dir",
                                str(tmp_path)], stderr=subprocess.PIPE, text=True, env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = process.stderr.readline()
        url = re.match(r"nijimi serve: (http://127\.0\.0\.1:\d+)/ \(model embedded; ", line)
        assert url, line
        with urllib.request.urlopen(url.group(1) + "/sdapi/v1/options", timeout=60) as answer:
            assert answer.status == 200 and b'"sd_model_checkpoint": "embedded [' in answer.read()
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0 and process.stderr.read() == ""
    finally:
        process.kill()
        process.stderr.close()


def test_bad_options_are_one_error_line(capsys, tmp_path):
    code, out, err = run_cli(capsys, "serve", "--model", str(tmp_path / "none.safetensors"))
    assert (code, out) == (2, "")
    assert err == f"error: --model {tmp_path / 'none.safetensors'}: no such file, folder or model in the models " \
                  "folder\n"
    assert run_cli(capsys, "serve", "--lora-dir", tmp_path / "none")[::2] == (
        2, f"error: --lora-dir {tmp_path / 'none'}: no such folder\n")
    assert run_cli(capsys, "serve", "--controlnet-dir", tmp_path / "none")[::2] == (
        2, f"error: --controlnet-dir {tmp_path / 'none'}: no such folder\n")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        code, out, err = run_cli(capsys, "serve", "--port", taken.getsockname()[1])
    finally:
        taken.close()
    assert code == 2 and err.startswith("error: cannot listen on 127.0.0.1:") and "in use" in err
