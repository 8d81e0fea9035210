"""What every converter shares: the quantizations, the metadata file and the converter's version."""

from __future__ import annotations

from ..errors import ConversionError

QUANTIZATIONS = ("int8", "int8_float16", "int8_float32", "int8_bfloat16", "float16", "bfloat16", "float32")
METADATA_FILE = "llm_blueprint.json"
CONVERTER_VERSION = 2


def check_quantization(quantization: str) -> None:
    if quantization not in QUANTIZATIONS:
        raise ConversionError(f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
    if "bfloat16" in quantization:
        from ctranslate2.specs import model_spec

        if not model_spec.torch_is_available:
            raise ConversionError(
                f"quantization {quantization!r} needs torch (CTranslate2 writes bfloat16 through it); "
                "use float16 or int8_float16"
            )
