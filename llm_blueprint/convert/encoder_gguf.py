"""GGUF files of llama.cpp's ``bert`` architecture (embedding models as ``convert_hf_to_gguf.py`` writes them)."""

from __future__ import annotations

ENCODER_ARCHITECTURES = {"bert": "embedding"}


def gguf_architecture(path: str) -> str | None:
    """``general.architecture`` of a GGUF file, or None when it cannot be read."""
    try:
        import gguf

        reader = gguf.GGUFReader(path)
        field = reader.get_field("general.architecture")
        return None if field is None else str(field.contents())
    except Exception:  # not a readable GGUF: the chat loader reports it
        return None


def gguf_encoder_kind(path: str) -> str | None:
    """``embedding`` for a GGUF encoder, None for anything else."""
    return ENCODER_ARCHITECTURES.get(gguf_architecture(path) or "")
