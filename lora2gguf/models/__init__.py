"""The architectures: the spec every one fills (spec), the base class that holds an architecture's every
rule (arch), the PyTorch layers each forward composes (layers), one module per architecture, and
the registry that finds them (registry: adding an architecture is models/<name>.py and its name there)."""

from __future__ import annotations

from lora2gguf.models.arch import Arch
from lora2gguf.models.registry import NAMES, all_archs, find, for_gguf, get, module_for
from lora2gguf.models.spec import ModelSpec

__all__ = ["Arch", "ModelSpec", "NAMES", "all_archs", "find", "for_gguf", "get", "module_for"]
