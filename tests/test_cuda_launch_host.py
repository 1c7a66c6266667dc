"""Host-side decisions of the CUDA launchers, tested without a GPU (they need a build
with the CUDA kernels, as CI's is)."""
import pytest

import ln_ext
from ln_ext import _C

pytestmark = pytest.mark.skipif(not ln_ext.has_cuda_kernels(), reason="a build without the CUDA kernels")


@pytest.mark.parametrize("ptx_version, binary_version, usable", [
    (90, 90, True),    # sm_90 SASS from compute_90: an H100 runs the cluster bodies
    (90, 100, True),   # compute_90 PTX JIT-compiled for a newer GPU: still cluster code
    (100, 100, True),
    # TORCH_CUDA_ARCH_LIST="8.0+PTX" on an H100: the PTX is JIT-compiled to sm_90 SASS
    # (binaryVersion 90), but the body was compiled with __CUDA_ARCH__ = 800, where the
    # cluster operations trap: launching it would kill the CUDA context.
    (80, 90, False),
    (86, 90, False),
    (80, 80, False),   # an A100
    (0, 90, False),    # a cubin from before CUDA 3.0 reports no PTX version
])
def test_cluster_kernels_only_where_their_code_has_clusters(ptx_version, binary_version, usable):
    assert _C._kernel_has_cluster_code(ptx_version, binary_version) is usable
