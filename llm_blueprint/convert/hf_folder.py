"""A Hugging Face model folder: ``config.json``, ``*.safetensors`` (sharded or not), tokenizer files.

Tensors are read one at a time from the safetensors files without torch:
``safetensors``' numpy API reads float32 and float16; bfloat16, which numpy
has no type for, is widened to float32 from the memory-mapped bytes at the
offsets the file's header gives.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from typing import Any

import numpy as np

from ..errors import ConversionError
from .hf_tokenizer import write_tokenizer_files
from .model_config import FAMILIES, ROPE_SCALINGS, DecoderConfig, RopeScaling, llama3_frequency_factors, longrope_attention_factor
from .source import ModelSource, Vocabulary

# config.json model_type -> family
MODEL_TYPES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "phi": "phi",
    "phi3": "phi3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",  # the multimodal checkpoint: its text model is converted
    "gemma4_text": "gemma4",
    "gemma4": "gemma4",  # the multimodal checkpoint: its text model is converted
}
# transformers' config-class defaults for keys a config.json may leave out.
CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "max_position_embeddings": 2048},
    "mistral": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                "max_position_embeddings": 131072, "sliding_window": 4096},
    "qwen2": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "max_position_embeddings": 32768},
    "qwen3": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "max_position_embeddings": 32768, "head_dim": 128},
    "phi": {"rope_theta": 10000.0, "layer_norm_eps": 1e-5, "tie_word_embeddings": False, "max_position_embeddings": 2048,
            "partial_rotary_factor": 0.5, "qk_layernorm": False},
    "phi3": {"rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "max_position_embeddings": 4096},
    "gemma": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "max_position_embeddings": 8192,
              "head_dim": 256},
    "gemma2": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "max_position_embeddings": 8192,
               "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 4096,
               "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    "gemma3": {"rope_theta": 1_000_000.0, "rope_local_base_freq": 10000.0, "rms_norm_eps": 1e-6,
               "tie_word_embeddings": True, "max_position_embeddings": 131072, "head_dim": 256,
               "query_pre_attn_scalar": 256, "sliding_window": 4096, "sliding_window_pattern": 6},
    "gemma4": {"rms_norm_eps": 1e-6, "tie_word_embeddings": True, "max_position_embeddings": 131072, "head_dim": 256,
               "sliding_window": 512, "global_head_dim": 512, "hidden_size_per_layer_input": 256,
               "num_kv_shared_layers": 0, "attention_k_eq_v": False, "enable_moe_block": False},
}
# What Gemma 4 checkpoints may use that CTranslate2 4.8 does not run (its own converter refuses the first two too).
GEMMA4_UNSUPPORTED = {
    "num_kv_shared_layers": "key/value states shared between layers (E2B, E4B)",
    "hidden_size_per_layer_input": "per-layer input embeddings (E2B, E4B)",
    "enable_moe_block": "mixture-of-experts blocks (26B-A4B)",
    "attention_bias": "attention biases",
}
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh",
               "gelu_new": "gelu_tanh", "gelu": "gelu"}
# Where multimodal checkpoints keep the text model's tensors.
NAME_PREFIXES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."), ("model.language_model.", "model."))
FLOAT_DTYPES = ("F32", "F16", "BF16")
# Integer buffers that checkpoints carry beside the weights (transformers registers them as module buffers and older
# versions save them): index tables, not weights; the converter computes positions itself.
BUFFER_SUFFIXES = ("position_ids", "token_type_ids")


def is_integer_buffer(name: str, dtype: str) -> bool:
    """A saved index buffer (``embeddings.position_ids``, I64), skipped rather than read as a weight."""
    return dtype not in FLOAT_DTYPES and name.rsplit(".", 1)[-1] in BUFFER_SUFFIXES


def _read_json(path: str, kind: type = dict) -> Any:
    """A JSON file's value, which must be a ``kind`` (an object unless told)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConversionError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, kind):
        raise ConversionError(f"{path}: expected a JSON {'object' if kind is dict else 'list'}")
    return data


class SafetensorsFile:
    """One ``.safetensors`` file: its header, and its tensors read on demand."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                (header_size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_size))
        except (OSError, ValueError, struct.error) as exc:
            raise ConversionError(f"cannot read safetensors file {path}: {exc}") from exc
        header.pop("__metadata__", None)
        self.data_start = 8 + header_size
        self.entries: dict[str, dict[str, Any]] = header
        size = os.path.getsize(path)
        end = max((int(e["data_offsets"][1]) for e in header.values()), default=0)
        if self.data_start + end > size:
            raise ConversionError(f"{path}: tensors end at byte {self.data_start + end} but the file has {size} bytes "
                                  "(the file is truncated)")
        self._numpy = None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.entries[name]["shape"])

    def read(self, name: str) -> np.ndarray:
        entry = self.entries[name]
        dtype, shape = entry["dtype"], tuple(entry["shape"])
        if dtype == "BF16":
            begin, end = (int(o) for o in entry["data_offsets"])
            raw = np.memmap(self.path, dtype="<u2", mode="r", offset=self.data_start + begin, shape=((end - begin) // 2,))
            return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
        if self._numpy is None:
            from safetensors import safe_open

            self._numpy = safe_open(self.path, framework="numpy")
        return np.asarray(self._numpy.get_tensor(name), dtype=np.float32)


class HFFolder(ModelSource):
    """A Hugging Face model folder of a supported family."""

    format = "huggingface"

    def __init__(self, path: str, hf_config: dict[str, Any], family: str, files: dict[str, SafetensorsFile]):
        self.path = path
        self.hf_config = hf_config
        self._files = files
        self._stored_names = {self._canonical(name): name for name in files}
        self.config = self._read_config(family)

    @classmethod
    def open(cls, path: str) -> HFFolder:
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise ConversionError(f"{path}: not a Hugging Face model folder (no config.json)")
        hf_config = _read_json(config_path)
        model_type = hf_config.get("model_type")
        architectures = ", ".join(hf_config.get("architectures") or []) or "unknown"
        if model_type not in MODEL_TYPES:
            supported = ", ".join(sorted(MODEL_TYPES))
            raise ConversionError(
                f"{path}: unsupported model_type {model_type!r} (architecture {architectures}); supported: {supported}"
            )
        family = MODEL_TYPES[model_type]
        if "text_config" in hf_config:  # multimodal checkpoint: the text model's hyperparameters
            hf_config = {**hf_config, **hf_config["text_config"]}
        quantized = hf_config.get("quantization_config")
        if quantized:
            method = quantized.get("quant_method", "unknown") if isinstance(quantized, dict) else quantized
            raise ConversionError(
                f"{path}: {method!r}-quantized checkpoints are not supported; convert the original "
                "(float16/bfloat16/float32) weights or a GGUF file"
            )
        return cls(path, hf_config, family, cls._index_tensors(path))

    @staticmethod
    def _index_tensors(path: str) -> dict[str, SafetensorsFile]:
        index_path = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            weight_map = _read_json(index_path).get("weight_map") or {}
            shard_names = sorted(set(weight_map.values()))
        else:
            weight_map = None
            shard_names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(path, "*.safetensors")))
        if not shard_names:
            bins = glob.glob(os.path.join(path, "*.bin")) + glob.glob(os.path.join(path, "*.pth"))
            hint = " (PyTorch .bin checkpoints need torch; save the model as safetensors)" if bins else ""
            raise ConversionError(f"{path}: no .safetensors weights found{hint}")
        files: dict[str, SafetensorsFile] = {}
        for shard_name in shard_names:
            shard_path = os.path.join(path, shard_name)
            if not os.path.isfile(shard_path):
                raise ConversionError(f"{path}: weight shard {shard_name} named by the index is missing")
            shard = SafetensorsFile(shard_path)
            for name, entry in shard.entries.items():
                if is_integer_buffer(name, entry["dtype"]):
                    continue
                # Other towers of multimodal checkpoints (vision...) may hold anything: they are not read.
                if HFFolder._canonical(name).startswith(("model.", "lm_head.")) and entry["dtype"] not in FLOAT_DTYPES:
                    raise ConversionError(
                        f"{shard_path}: tensor {name!r} has dtype {entry['dtype']}; readable: {', '.join(FLOAT_DTYPES)}"
                    )
                files[name] = shard
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(files))
            if missing:
                raise ConversionError(f"{path}: tensors named by the index are missing from the shards: {missing[:5]}")
        return files

    @staticmethod
    def _canonical(name: str) -> str:
        for prefix, replacement in NAME_PREFIXES:
            if name.startswith(prefix):
                return replacement + name[len(prefix):]
        return name

    # Hyperparameters ---------------------------------------------------------
    def _get(self, key: str) -> Any:
        """``config.json``'s value, or transformers' default when the key is absent (an explicit null stays:
        Mistral's ``"sliding_window": null`` means no window)."""
        if key in self.hf_config:
            return self.hf_config[key]
        return CONFIG_DEFAULTS[self.family].get(key)

    def _read_config(self, family: str) -> DecoderConfig:
        self.family = family
        hf = self.hf_config
        name = FAMILIES[family]
        try:
            num_layers = int(hf["num_hidden_layers"])
            hidden = int(hf["hidden_size"])
            num_heads = int(hf["num_attention_heads"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConversionError(f"{self.path}: config.json lacks {exc}") from None
        head_dim = int(self._get("head_dim") or hidden // num_heads)
        # transformers 5 saves partial_rotary_factor inside rope_parameters; a default applies only when neither has it
        partial = float(hf.get("partial_rotary_factor") or (hf.get("rope_parameters") or {}).get("partial_rotary_factor")
                        or self._get("partial_rotary_factor") or 1.0)
        rotary_dim = int(head_dim * partial)
        activation = ACTIVATIONS.get(self._get("hidden_activation") or self._get("hidden_act") or "silu")
        if family == "gemma" and activation == "gelu":  # transformers: the releases' legacy "gelu" means tanh
            activation = "gelu_tanh"
        if activation is None or (activation != "silu" and not family.startswith(("gemma", "phi"))):
            raise ConversionError(f"{self.path}: {name} with activation {hf.get('hidden_act')!r} is not supported")
        vocab_rows, width = self.shape("model.embed_tokens.weight")
        if width != hidden:
            raise ConversionError(f"{self.path}: embed_tokens is {width} wide but hidden_size is {hidden}")
        config = DecoderConfig(
            family=family,
            num_layers=num_layers,
            hidden_size=hidden,
            num_heads=num_heads,
            num_kv_heads=int(self._get("num_key_value_heads") or num_heads),
            head_dim=head_dim,
            vocab_size=vocab_rows,
            context_length=int(self._get("max_position_embeddings")),
            rms_norm_eps=float(self._get("layer_norm_eps" if family == "phi" else "rms_norm_eps")),
            rope_theta=0.0,
            rotary_dim=rotary_dim if rotary_dim != head_dim else None,
            activation=activation,
            tie_word_embeddings=bool(self._get("tie_word_embeddings")) or not self.has_tensor("lm_head.weight"),
            name=hf.get("_name_or_path") or os.path.basename(os.path.normpath(self.path)),
        )
        config.rope_theta, config.rope_scaling = self._rope(config, rotary_dim)
        self._read_attention_window(config)
        if family == "phi" and self._get("qk_layernorm"):
            raise ConversionError(f"{self.path}: Phi with qk_layernorm is not supported by CTranslate2")
        if family == "gemma4":
            self._read_gemma4(config)
        elif family.startswith("gemma"):
            scalar = self._get("query_pre_attn_scalar")  # Gemma (1) has none: the head size
            config.query_pre_attn_scalar = float(scalar) if scalar else None
            config.attn_logit_softcapping = self._get("attn_logit_softcapping")
            config.final_logit_softcapping = self._get("final_logit_softcapping")
        return config

    def _read_gemma4(self, config: DecoderConfig) -> None:
        for key, what in GEMMA4_UNSUPPORTED.items():
            if self._get(key):
                raise ConversionError(f"{self.path}: Gemma 4 with {what} ({key}={self._get(key)!r}) cannot run in "
                                      "CTranslate2 4.8; the dense Gemma 4 models (31B) can")
        if self._get("use_bidirectional_attention") == "all":
            raise ConversionError(f"{self.path}: a bidirectional Gemma 4 (an encoder) is not a chat model")
        # The global layers' shape: config.json says it with global_* keys (as released) or, as transformers 5 saves
        # it, per layer (per_layer_config); transformers applies num_global_key_value_heads with attention_k_eq_v only.
        sliding = config.sliding_layers or ()
        overrides = {}
        for index, values in (self.hf_config.get("per_layer_config") or {}).items():
            if int(index) < len(sliding) and not sliding[int(index)]:
                overrides = values
                break
        config.global_head_dim = int(overrides.get("head_dim") or self._get("global_head_dim"))
        config.attention_k_eq_v = bool(self._get("attention_k_eq_v"))
        global_kv = overrides.get("num_key_value_heads")
        if global_kv is None and config.attention_k_eq_v:
            global_kv = self._get("num_global_key_value_heads")
        config.global_kv_heads = int(global_kv or config.num_kv_heads)
        # transformers: rotary frequencies 1 / theta^(2i / head) for i < fraction * head / 2, none beyond
        fraction = getattr(self, "_proportional_fraction", 1.0)
        config.global_rotary_dim = 2 * int(fraction * config.global_head_dim // 2)
        config.query_pre_attn_scalar = 1.0  # Gemma 4 does not scale attention scores (its Q/K norms do)
        config.final_logit_softcapping = self._get("final_logit_softcapping")

    def _rope_parameters(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(global, sliding-layer) rotary parameters from ``rope_parameters`` (transformers 5) or
        ``rope_theta``/``rope_scaling`` (transformers 4)."""
        hf = self.hf_config
        params = dict(hf.get("rope_parameters") or {})
        local = {}
        if "full_attention" in params:
            local = params.get("sliding_attention") or {}
            params = dict(params["full_attention"])
        params.update(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", self._get("rope_theta"))
        if self._get("rope_local_base_freq") is not None:
            local = {"rope_theta": self._get("rope_local_base_freq"), **local}
        return params, local

    def _rope(self, config: DecoderConfig, rotary_dim: int) -> tuple[float, RopeScaling | None]:
        params, local = self._rope_parameters()
        theta = float(params["rope_theta"])
        if local.get("rope_theta") is not None:
            config.local_rope_theta = float(local["rope_theta"])
        kind = params.get("rope_type") or params.get("type") or "default"
        if kind == "default":
            return theta, None
        if kind == "proportional" and config.family == "gemma4":  # Gemma 4's global layers: see _read_gemma4
            self._proportional_fraction = float(params.get("partial_rotary_factor", 1.0))
            return theta, None
        if kind == "linear":
            return theta, RopeScaling("linear", factor=float(params["factor"]))
        if kind == "llama3":
            factors = llama3_frequency_factors(
                theta, rotary_dim, float(params["factor"]), float(params.get("low_freq_factor", 1.0)),
                float(params.get("high_freq_factor", 4.0)), int(params["original_max_position_embeddings"]),
            )
            return theta, RopeScaling("frequency_factors", long_factor=factors, short_factor=factors)
        if kind in ("su", "longrope"):
            long_factor = np.asarray(params["long_factor"], dtype=np.float32)
            short_factor = np.asarray(params["short_factor"], dtype=np.float32)
            if len(long_factor) != rotary_dim // 2 or len(short_factor) != rotary_dim // 2:
                raise ConversionError(f"{self.path}: longrope factors must have {rotary_dim // 2} values")
            max_positions = config.context_length
            original = self.hf_config.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
            if original:
                stretch = max_positions / int(original)
            else:  # transformers' fallback: the scaling's own factor over the whole context
                original, stretch = max_positions, float(params.get("factor", 1.0))
            attention_factor = params.get("attention_factor")
            if attention_factor is None:
                attention_factor = longrope_attention_factor(stretch, int(original))
            return theta, RopeScaling(
                "longrope", long_factor=long_factor, short_factor=short_factor,
                original_context=int(original), attention_factor=float(attention_factor),
            )
        raise ConversionError(
            f"{self.path}: {FAMILIES[config.family]} rope scaling {kind!r} is not supported by CTranslate2; "
            f"supported: {', '.join(ROPE_SCALINGS)}"
        )

    def _read_attention_window(self, config: DecoderConfig) -> None:
        family, hf = config.family, self.hf_config
        if family in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
            raise ConversionError(f"{self.path}: {FAMILIES[family]} with use_sliding_window is not supported")
        if family not in ("mistral", "gemma2", "gemma3", "gemma4"):
            # Phi-3 declares a window that neither CTranslate2's nor llama.cpp's converter applies.
            return
        config.sliding_window = int(self._get("sliding_window") or 0)
        layer_types = hf.get("layer_types")
        if layer_types:
            config.sliding_layers = tuple(t == "sliding_attention" for t in layer_types)
        elif family == "gemma2":
            config.sliding_layers = tuple(i % 2 == 0 for i in range(config.num_layers))
        elif family == "gemma3":
            pattern = int(self._get("sliding_window_pattern"))
            config.sliding_layers = tuple((i + 1) % pattern != 0 for i in range(config.num_layers))
        elif family == "gemma4":  # transformers: 5 sliding to 1 global, the last layer always global
            config.sliding_layers = tuple((i + 1) % 6 != 0 and i < config.num_layers - 1 for i in range(config.num_layers))
        if family == "gemma4" and layer_types:
            config.sliding_layers = config.sliding_layers[:-1] + (False,)

    # Tensors -----------------------------------------------------------------
    def has_tensor(self, name: str) -> bool:
        return name in self._stored_names

    def shape(self, name: str) -> tuple[int, ...]:
        stored = self._stored(name)
        return self._files[stored].shape(stored)

    def _stored(self, name: str) -> str:
        try:
            return self._stored_names[name]
        except KeyError:
            raise ConversionError(f"{self.path}: tensor {name!r} is missing") from None

    def tensor(self, name: str) -> np.ndarray:
        stored = self._stored(name)
        array = self._files[stored].read(stored)
        return array if array.flags.writeable else array.copy()

    # Tokenizer ---------------------------------------------------------------
    def write_tokenizer_files(self, out_dir: str) -> Vocabulary:
        return write_tokenizer_files(self.path, out_dir, self.hf_config, self.config.vocab_size)

