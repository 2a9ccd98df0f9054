"""bitlm: a bit-native transformer language model (BitTransformerLM) in plain PyTorch.

Every name of the original user guide is importable from here (``from bitlm import
BitTransformerLM, text_to_bits, train_loop, ...``). The names are loaded when first used
(PEP 562), so ``import bitlm.config`` and the other torch-free modules do not import torch:
the platform's data preparation, run in every Ray Data worker, never pays for it.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "bits": (
        "ParityError",
        "bits_to_bytes",
        "bits_to_text",
        "bytes_to_bits",
        "compress_bits",
        "decompress_bits",
        "enforce_parity",
        "parity_ok",
        "text_to_bits",
    ),
    "checkpoint": ("CheckpointError",),
    "config": ("ConfigError", "DataConfig", "ExperimentConfig", "ModelConfig", "TrainConfig", "load_config"),
    "corpus": ("builtin_corpus", "builtin_split", "byte_windows"),
    "generate": ("generate_bits", "iter_generate", "sample_text"),
    "loop": ("TrainHistory", "example_training_step", "train_loop"),
    "model": (
        "BitTransformerLM",
        "KVCache",
        "infer_long_sequence",
        "load_pretrained",
        "save_pretrained",
        "set_dropout",
    ),
    "objectives": ("bits_per_byte", "evaluate"),
    "optim": ("configure_optimizer",),
    "quantization": ("convert_qat_fx", "prepare_qat_fx", "quantize_dynamic"),
    "safety": ("SafetyError", "SafetyGate", "hil_safe_inference", "safe_sample_with_retry"),
    "scale": ("expand_model", "expand_optimizer"),
    "telemetry": (
        "detect_metric_drift",
        "lz_code_rate",
        "lz_complexity",
        "lz_complexity_logits",
        "negentropy",
        "negentropy_logits",
        "symbiosis_score",
    ),
    "torch_utils": ("GeneratorDeviceError", "cpu_autocast"),
    "trainer": ("Trainer",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__version__ = "0.1.0"
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'bitlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
