"""ln_ext through the `kernels` library: transformers' own kernel route, from the local install.

transformers decorates its norm classes `@use_kernel_forward_from_hub("RMSNorm")` (LlamaRMSNorm
and ~140 others) or `("RMSNormZeroCentered")` (Qwen3.5); `kernels.kernelize` then swaps their
forward for a layer's from a mapping of layer names to kernel repositories. ln_ext ships such a
repository inside the package (ln_ext/hub_kernel/, see its __init__), so the mapping points at a
local path: nothing is downloaded, no `trust_remote_code`, HF_HUB_OFFLINE=1 works.

    with kernels.use_kernel_mapping(ln_ext.hub.kernel_mapping(), inherit_mapping=False):
        model = kernels.kernelize(model, mode=kernels.Mode.TRAINING, device="cuda")

    model = AutoModelForCausalLM.from_pretrained(path, use_kernels=True,
                                                 kernel_config=ln_ext.hub.kernel_config())

The math each module gets is the one `ln_ext.convert_layer_norm` gives it (convert.TABLE, by the
module's exact class); classes the table does not know keep their own forward.
`RMSNormGated` (a gate multiplied in) is not a form ln_ext implements and is not offered.

`kernels` and `transformers` stay optional: they are imported inside the functions only.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Iterable, Optional, Union

# transformers' layer name -> the layer class in ln_ext/hub_kernel/layers.py
LAYERS: dict[str, str] = {
    "RMSNorm": "RMSNorm",
    "RMSNormZeroCentered": "RMSNormZeroCentered",
}


def kernel_repo_path() -> Path:
    """The absolute path of ln_ext's kernel repository (a `kernels` build variant)."""
    return (Path(__file__).resolve().parent / "hub_kernel").resolve()


def _default_devices() -> tuple:
    from .ops import has_cuda_kernels

    return ("cpu", "cuda") if has_cuda_kernels() else ("cpu",)


def _warn_if_transformers_ignores_kernels() -> None:
    """transformers' decorators are no-ops unless it accepts the installed `kernels` version:
    kernelize would then find no layer to swap, silently. Only looks when transformers is
    already imported."""
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return
    try:
        from transformers.utils.import_utils import (
            KERNELS_MAX_VERSION,
            KERNELS_MIN_VERSION,
            is_kernels_available,
        )
    except ImportError:
        return
    if not is_kernels_available():
        import kernels

        warnings.warn(
            f"transformers {transformers.__version__} supports kernels >= {KERNELS_MIN_VERSION}, "
            f"< {KERNELS_MAX_VERSION}, not the installed {kernels.__version__}: its norm classes are not "
            "decorated, so kernelize leaves them alone (install a kernels version it supports)",
            RuntimeWarning,
            stacklevel=3,
        )


def kernel_mapping(
    device: Union[str, Iterable[str], None] = None,
    modes: Optional[Iterable] = None,
    layers: Optional[Iterable[str]] = None,
) -> dict:
    """The mapping for `kernels.use_kernel_mapping` / `kernels.register_kernel_mapping`:
    transformers' layer names (`layers`, default all of `LAYERS`) -> ln_ext's local repository,
    for each device type in `device` (default "cpu", and "cuda" when this build has the CUDA
    kernels) and each `kernels.Mode` in `modes` (default: every mode, torch.compile included;
    the layers have a backward and compile)."""
    from kernels import LocalLayerRepository

    _warn_if_transformers_ignores_kernels()
    devices = _default_devices() if device is None else ((device,) if isinstance(device, str) else tuple(device))
    names = tuple(LAYERS) if layers is None else tuple(layers)
    unknown = [n for n in names if n not in LAYERS]
    if unknown:
        raise ValueError(f"ln_ext.hub: no layer for {unknown}; ln_ext offers {list(LAYERS)}")
    mode_list = None if modes is None else tuple(modes)
    path = kernel_repo_path()
    mapping: dict = {}
    for name in names:
        repo = LocalLayerRepository(repo_path=path, layer_name=LAYERS[name])
        per_device = repo if mode_list is None else {mode: repo for mode in mode_list}
        mapping[name] = {dev: per_device for dev in devices}
    return mapping


_CONFIG_CLASS = None


def _kernel_config_class():
    """transformers' KernelConfig with two fixes for a local repository (transformers 5.23):
    create_compatible_mapping accepts the "cpu" device and the (repo, metadata) tuples that
    from_pretrained's register_kernel_replacements_and_fusions leaves in the mapping, and
    registers the repository for every mode (model.train() / .eval() re-kernelize with the
    other mode: a mode-specific entry would drop ln_ext there); sanitize_kernel_mapping skips
    the layer names the model does not use (a Llama has no RMSNormZeroCentered)."""
    global _CONFIG_CLASS
    if _CONFIG_CLASS is not None:
        return _CONFIG_CLASS
    from transformers import KernelConfig

    class LnExtKernelConfig(KernelConfig):
        def __init__(self, kernel_mapping=None, use_local_kernel=True, inherit_mapping=False, devices=None):
            super().__init__(kernel_mapping, use_local_kernel=use_local_kernel, inherit_mapping=inherit_mapping)
            self.devices = devices

        def _names_in(self, model):
            self.store_registered_layer_names(model)
            used = set(self.registered_layer_names.values())
            return [name for name in self.kernel_mapping if name in used]

        def sanitize_kernel_mapping(self, model):
            names = self._names_in(model)
            self.kernel_mapping = {name: self.kernel_mapping[name] for name in names}
            super().sanitize_kernel_mapping(model)

        def create_compatible_mapping(self, model, compile=False):
            self.kernel_mapping = kernel_mapping(device=self.devices, layers=self._names_in(model))

    LnExtKernelConfig.__qualname__ = "LnExtKernelConfig"
    _CONFIG_CLASS = LnExtKernelConfig
    return LnExtKernelConfig


def __getattr__(name):
    # `ln_ext.hub.LnExtKernelConfig` (pickle finds the class by this name) without importing
    # transformers when ln_ext.hub is imported.
    if name == "LnExtKernelConfig":
        return _kernel_config_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def kernel_config(device: Union[str, Iterable[str], None] = None, layers: Optional[Iterable[str]] = None):
    """A transformers `KernelConfig` for `from_pretrained(..., use_kernels=True, kernel_config=...)`
    (or `model.set_use_kernels(True, kernel_config=...)`) pointing every layer name of `layers`
    (default all of `LAYERS`) that the model uses at ln_ext's local repository, on the device
    types in `device` (default as `kernel_mapping`). Use a fresh one per model: transformers
    rewrites a KernelConfig's mapping in place when it applies it."""
    names = tuple(LAYERS) if layers is None else tuple(layers)
    path = kernel_repo_path()
    spec = {}
    for name in names:
        if name not in LAYERS:
            raise ValueError(f"ln_ext.hub: no layer for {name!r}; ln_ext offers {list(LAYERS)}")
        spec[name] = f"{path}:{LAYERS[name]}"
    devices = None if device is None else ((device,) if isinstance(device, str) else tuple(device))
    return _kernel_config_class()(spec, use_local_kernel=True, inherit_mapping=False, devices=devices)
