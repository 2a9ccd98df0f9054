"""bitlm: a bit-native transformer language model (BitTransformerLM) in plain PyTorch.

Every name of the original user guide is importable from here (``from bitlm import
BitTransformerLM, text_to_bits, train_loop, ...``).
"""

from .bits import (
    ParityError,
    bits_to_bytes,
    bits_to_text,
    bytes_to_bits,
    compress_bits,
    decompress_bits,
    enforce_parity,
    parity_ok,
    text_to_bits,
)
from .checkpoint import CheckpointError
from .config import ConfigError, DataConfig, ExperimentConfig, ModelConfig, TrainConfig, load_config
from .corpus import builtin_corpus, builtin_split, byte_windows
from .generate import generate_bits, iter_generate, sample_text
from .loop import TrainHistory, example_training_step, train_loop
from .model import BitTransformerLM, KVCache, infer_long_sequence, load_pretrained, save_pretrained, set_dropout
from .objectives import bits_per_byte, evaluate
from .optim import configure_optimizer
from .quantization import convert_qat_fx, prepare_qat_fx, quantize_dynamic
from .safety import SafetyError, SafetyGate, hil_safe_inference, safe_sample_with_retry
from .scale import expand_model, expand_optimizer
from .telemetry import (
    detect_metric_drift,
    lz_complexity,
    lz_complexity_logits,
    negentropy,
    negentropy_logits,
    symbiosis_score,
)
from .torch_utils import GeneratorDeviceError, cpu_autocast
from .trainer import Trainer

__version__ = "0.1.0"

__all__ = [
    "cpu_autocast",
    "expand_optimizer",
    "expand_model",
    "quantize_dynamic",
    "prepare_qat_fx",
    "convert_qat_fx",
    "BitTransformerLM",
    "CheckpointError",
    "ConfigError",
    "DataConfig",
    "GeneratorDeviceError",
    "ExperimentConfig",
    "KVCache",
    "ModelConfig",
    "ParityError",
    "SafetyError",
    "SafetyGate",
    "TrainConfig",
    "TrainHistory",
    "Trainer",
    "bits_per_byte",
    "bits_to_bytes",
    "bits_to_text",
    "builtin_corpus",
    "builtin_split",
    "byte_windows",
    "bytes_to_bits",
    "compress_bits",
    "configure_optimizer",
    "decompress_bits",
    "detect_metric_drift",
    "enforce_parity",
    "evaluate",
    "example_training_step",
    "generate_bits",
    "hil_safe_inference",
    "infer_long_sequence",
    "iter_generate",
    "load_config",
    "load_pretrained",
    "lz_complexity",
    "lz_complexity_logits",
    "negentropy",
    "negentropy_logits",
    "parity_ok",
    "safe_sample_with_retry",
    "sample_text",
    "save_pretrained",
    "set_dropout",
    "symbiosis_score",
    "text_to_bits",
    "train_loop",
]
