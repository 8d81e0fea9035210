"""``llm-blueprint`` console script: convert models (GGUF files, Hugging Face folders), prepare the default model, serve."""

from __future__ import annotations

import argparse
import os
import sys

from .errors import LLMBlueprintError


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert_model

    out = convert_model(args.source, args.out_dir, quantization=args.quantization, force=args.force)
    print(out)
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from .engine.default_model import prepare_default_model

    print(prepare_default_model(args.cache_dir))
    return 0


def _serve(args: argparse.Namespace) -> int:
    """Prepare the model once, then exec gunicorn with the settings shipped in the package (gevent worker)."""
    # Convert once, before the workers start; they find the result in the cache.
    if not os.environ.get("LLM_MODEL_PATH"):
        from .engine.default_model import prepare_default_model

        prepare_default_model()
    else:
        from .convert.model_cache import prepare_model_dir

        prepare_model_dir(os.environ["LLM_MODEL_PATH"], os.environ.get("LLM_CACHE_DIR"),
                          os.environ.get("LLM_COMPUTE_TYPE"))
    argv = [sys.executable, "-m", "gunicorn", "--config", "python:llm_blueprint.gunicorn_conf",
            "--bind", args.bind, "--workers", str(args.workers), args.app]
    os.execvp(argv[0], argv)
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llm-blueprint", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a .gguf file or a Hugging Face folder into a CTranslate2 model directory")
    p.add_argument("source", help="a .gguf file, or a Hugging Face folder (config.json, *.safetensors, tokenizer files)")
    p.add_argument("out_dir", help="directory to create")
    p.add_argument("--quantization", default="int8",
                   choices=["int8", "int8_float16", "int8_float32", "int8_bfloat16", "float16", "bfloat16", "float32"])
    p.add_argument("--force", action="store_true", help="replace out_dir if it exists")
    p.set_defaults(func=_convert)

    p = sub.add_parser("prepare", help="convert the embedded default model into the cache and print its path")
    p.add_argument("--cache-dir", default=None)
    p.set_defaults(func=_prepare)

    p = sub.add_parser("serve", help="serve the API with gunicorn -k gevent (default model unless LLM_MODEL_PATH)")
    p.add_argument("--bind", default=os.environ.get("LLM_BIND", "127.0.0.1:8000"))
    p.add_argument("--workers", type=int, default=int(os.environ.get("LLM_WORKERS", "1")))
    p.add_argument("--app", default="llm_blueprint.wsgi:app", help="WSGI app to serve, module:name (found from the current directory)")
    p.set_defaults(func=_serve)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LLMBlueprintError as exc:
        print(f"llm-blueprint: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
