"""Hugging Face transformers: a converted ``PreTrainedModel`` saved with ``save_pretrained``
and loaded with ``from_pretrained``, through transformers' custom quantizer registration.

    import sparqle.hf                                  # registers quant_method "sparqle"
    sparqle.convert(model, "int8")
    sparqle.hf.save_pretrained(model, "out")           # model.save_pretrained works from then on
    model = AutoModelForCausalLM.from_pretrained("out")

The checkpoint is transformers' own (config.json, safetensors shards); config.json's
``quantization_config`` is ``{"quant_method": "sparqle", ...}`` and every shard carries
sparqle's metadata (the settings of each converted module, as :func:`sparqle.save` writes
it; shared tensors are transformers' to tie). ``from_pretrained`` builds the converted modules
from the shards' tensors with sparqle's checks (see :func:`sparqle.load`), on the meta
model before transformers loads the other weights, and puts them in after. The converted
modules keep the dtype they were saved in; they are created on the device of a one-device
``device_map``, else on the CPU.

Importing this module imports transformers; ``import sparqle`` does not.
"""
import re
from typing import Dict, List, Optional

import torch
import transformers
from torch import nn
from transformers import PreTrainedModel
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from . import checkpoint
from .checkpoint import FORMAT_VERSION

QUANT_METHOD = "sparqle"


class SparqleConfig(QuantizationConfigMixin):
    """config.json's ``quantization_config`` of a model converted by sparqle: it routes
    ``from_pretrained`` to :class:`SparqleQuantizer`; the settings travel in the shards'
    metadata."""

    def __init__(self, format_version: int = FORMAT_VERSION, **kwargs):
        self.quant_method = QUANT_METHOD
        self.format_version = format_version


class _Placeholder(nn.Module):
    """Holds a converted module's place while transformers loads the other weights: it has
    no tensors, so transformers leaves the module's checkpoint keys to sparqle."""


class SparqleQuantizer(HfQuantizer):
    """Loads and saves the modules sparqle converted (see the module's docstring)."""

    requires_calibration = True  # the checkpoint holds converted weights: nothing converts at load

    def __init__(self, quantization_config: SparqleConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._converted: Dict[int, nn.Module] = {}

    def _process_model_before_weight_loading(self, model: PreTrainedModel, checkpoint_files: Optional[List[str]] = None,
                                             device_map=None, **kwargs):
        if not checkpoint_files:
            raise ValueError(f"the sparqle quantizer reads the converted layers from the checkpoint files, "
                             f"which this transformers ({transformers.__version__}) does not pass it")
        if not all(str(f).endswith(".safetensors") for f in checkpoint_files):
            raise ValueError(f"a sparqle checkpoint is in safetensors files, got {checkpoint_files}")
        safetensors = checkpoint._safetensors()
        device = _single_device(device_map)
        state, modules = {}, None
        for path in checkpoint_files:
            with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
                found, aliases = checkpoint.read_metadata(f.metadata(), str(path))
                if modules is not None and found != modules:
                    raise ValueError(f"{path}: its sparqle metadata differs from {checkpoint_files[0]}'s: "
                                     f"the shards are of different checkpoints")
                modules = found
                converted = [checkpoint._prefix(name) for name, s in modules.items() if s["format"] in checkpoint._LINEARS]
                state.update({key: f.get_tensor(key).to(device) for key in f.keys()
                              if any(key.startswith(p) and "." not in key[len(p):] for p in converted)})
        checkpoint.convert_structural(model, modules, str(checkpoint_files[0]))
        built = checkpoint.build_linears(model, modules, state, str(checkpoint_files[0]))
        placeholders = {key: _Placeholder() for key in built}
        self._converted = {id(placeholders[key]): module for key, module in built.items()}
        checkpoint._swap(model, placeholders)
        names = [name for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, _Placeholder)]
        # their keys are in the checkpoint, not in the model being loaded: sparqle's to load
        ignored = {rf"^{re.escape(name)}\.[^.]+$" for name in names}
        model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | ignored
        # a weight tied to a converted module was untied by the conversion
        tied = getattr(model, "all_tied_weights_keys", None)
        if tied:
            inside = tuple(f"{name}." for name in names)
            model.all_tied_weights_keys = {t: s for t, s in tied.items()
                                           if not t.startswith(inside) and not s.startswith(inside)}
        return model

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs):
        checkpoint._swap(model, self._converted)
        self._converted = {}
        return model

    def get_state_dict_and_metadata(self, model: PreTrainedModel):
        tensors, modules = checkpoint.checkpoint_state(model)
        return tensors, checkpoint.file_metadata(modules, {})

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def _single_device(device_map) -> torch.device:
    """The one device of ``device_map`` (a device, or a dict of one device), else the CPU."""
    if isinstance(device_map, dict):
        devices = {str(d) for d in device_map.values()}
        device_map = devices.pop() if len(devices) == 1 else None
    if device_map is None or device_map in ("auto", "balanced", "sequential", "disk"):
        return torch.device("cpu")
    return torch.device(device_map if not isinstance(device_map, int) else f"cuda:{device_map}")


def _register() -> None:
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(SparqleConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(SparqleQuantizer)


def save_pretrained(model: PreTrainedModel, save_directory, **kwargs) -> None:
    """``model.save_pretrained(save_directory, **kwargs)`` for a model converted by sparqle:
    gives the model sparqle's quantizer and quantization_config first (so its own
    save_pretrained works from then on), and marks a tied weight that the conversion untied
    (an lm_head converted apart from the embedding) as untied in its config."""
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    config = SparqleConfig()
    model.config.quantization_config = config
    model.hf_quantizer = SparqleQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    untied = [target for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items()
              if _tensor(model, target) is None or _tensor(model, target) is not _tensor(model, source)]
    if untied and hasattr(model.config, "tie_word_embeddings"):
        model.config.tie_word_embeddings = False
        model.all_tied_weights_keys = {t: s for t, s in model.all_tied_weights_keys.items() if t not in untied}
    model.save_pretrained(save_directory, **kwargs)


def _tensor(model: nn.Module, key: str) -> Optional[torch.Tensor]:
    """The tensor at state_dict key ``key`` of ``model``, None if there is none (a converted
    module's weight is not a tensor)."""
    module, _, name = key.rpartition(".")
    try:
        found = getattr(model.get_submodule(module), name, None)
    except AttributeError:
        return None
    return found if isinstance(found, torch.Tensor) else None


_register()
