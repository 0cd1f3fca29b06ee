"""The four console scripts are installed and answer --help."""

import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("script,words", [("vdm-shard", "--frames"), ("vdm-train", "--config"),
                                           ("vdm-consolidate", "--weights"), ("vdm-sample", "--cond-scale")])
def test_console_script_help(script, words):
    proc = subprocess.run([str(BIN / script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert words in proc.stdout and script in proc.stdout


def test_sample_rejects_a_missing_model_dir(tmp_path):
    proc = subprocess.run([str(BIN / "vdm-sample"), str(tmp_path / "nope"), "--prompt", "a cat"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "vdm-consolidate" in proc.stderr
