"""vdm.runtime: on glibc, freed large tensors stay mapped for reuse instead of being unmapped."""

import subprocess
import sys

import pytest

PROBE = """
import sys, torch
from vdm.runtime import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def rss():
    with open("/proc/self/status") as f:
        return int(next(l.split()[1] for l in f if l.startswith("VmRSS:"))) * 1024
x = torch.ones(64 * 2**20)  # 256 MB, touched
before = rss()
del x
print(before - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc")
def test_freed_memory_is_kept_only_when_asked():
    def released(mode):
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.strip())

    assert released("default") > 200 * 2**20, "glibc unmaps a large freed block by default"
    assert released("keep") < 16 * 2**20, "with keep_freed_memory the block stays for the next step"
