"""Converters from PyTorch / diffusers / EDM checkpoints to our Flax parameters.

Command line: ``python -m dmd_jax.convert <network> --src=... --dst=...``. A converted folder of the
single-network converters (``edm``, ``lpips``, ``inception``) records its converter in ``config.json`` as
``{"network": ...}``; :func:`check_network` checks it when the folder is read.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

from dmd_jax.convert.common import ConversionError


def check_network(config: Mapping[str, Any], network: str, src_dir: str | os.PathLike) -> None:
  """``ConversionError`` unless the converted folder ``src_dir`` (its ``config.json`` dict ``config``) holds a
  ``network`` network."""
  # Folders converted by earlier versions record the converter under "family".
  got = config.get("network", config.get("family"))
  if got != network:
    raise ConversionError(f"{os.fspath(src_dir)!r} holds a {got!r} network, not {network!r}")
