"""bncy.distributed: the MPI suite (tests/mpi) under mpiexec -n 2 and -n 3, and the
behaviour without MPI."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bncy.distributed as dist

MPI_SUITE = Path(__file__).parent / "mpi" / "test_sync_bn.py"


def _mpiexec():
    pytest.importorskip("mpi4py")
    exe = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which(
        "mpiexec")
    if exe is None:
        pytest.skip("no mpiexec (pip install 'bncy[mpi]')")
    return exe


@pytest.mark.parametrize("n", [2, 3])
def test_mpi_suite_under_mpiexec(n, tmp_path):
    cmd = [_mpiexec(), "-n", str(n), sys.executable, "-P", "-m", "pytest", "-q",
           "-p", "no:cacheprovider", "-x", str(MPI_SUITE)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert out.count(" passed") >= n, out[-2000:]    # every rank ran and passed


def test_without_a_communicator():
    with pytest.raises((TypeError, ImportError)):
        dist.forward(np.ones((4, 2)), comm=None)
