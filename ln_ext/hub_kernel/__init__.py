"""ln_ext as a kernel repository of the `kernels` library (transformers' `use_kernels=True`).

This folder is one build variant of a local kernel repository: `metadata.json` beside this
file, and this module's `layers`, the stateless layer classes `kernels.kernelize` swaps in for
the forward of classes decorated `@use_kernel_forward_from_hub(name)`. It runs on every torch
build (the layers are Python calling ln_ext's ops), so it is the repository's only variant,
the one `kernels` takes when the path points at a variant directly. `ln_ext.hub` builds the
mappings that point at it. `kernels` loads this file a second time under the metadata's id:
`layers` is ln_ext's own module either way (an absolute import), not a copy.

`metadata.json` records a digest of this folder's files (kernels >= 0.18 checks it on every
load): change a file here and tests/test_hub_kernels.py prints the new digest.
"""
from ln_ext.hub_kernel import layers  # noqa: F401
