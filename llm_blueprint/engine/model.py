"""Loading a CTranslate2 model directory: generator, tokenizer, chat template, end tokens."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import platform
from dataclasses import dataclass
from typing import Any

from ..errors import ChatTemplateError, InvalidRequest, ModelLoadError
from .chat_template import ChatTemplate
from .memory import resident_bytes
from .tokenizer import Tokenizer, load_tokenizer, load_vocabulary

log = logging.getLogger(__name__)

# Turn terminators of common chat formats. Any of them present in the
# vocabulary ends a generation: none of them is ever meant to appear in text.
# End-of-turn tokens by name, as llama.cpp knows them (Gemma 4: <turn|>, and <|tool_response> after a tool call).
KNOWN_TERMINATORS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "<|eom_id|>",
                     "<|end_of_text|>", "<turn|>", "<|tool_response>")
DEFAULT_COMPUTE_TYPES = {"cpu": "int8", "cuda": "int8_float16"}
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")
FALLBACK_CONTEXT_LENGTH = 2048
MODEL_FILES = ("model.bin", "config.json")


@dataclass
class ModelOptions:
    """How to load a model (device, compute type, threads, context, chat template). ``None`` means "decide from the model and the machine"."""

    device: str = "auto"
    compute_type: str | None = None
    inter_threads: int = 1
    intra_threads: int = 0
    context_length: int | None = None
    chat_template: str | None = None  # template text or a path to a .jinja file


EngineOptions = ModelOptions  # its former name (it configures the Model, not the Engine)


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """Special tokens in tokenizer_config.json are strings or AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def resolve_device(device: str) -> str:
    import ctranslate2

    if device == "auto":
        return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    if device not in ("cpu", "cuda"):
        raise ModelLoadError(f"unknown device {device!r}; use cpu, cuda or auto")
    return device


# glibc's mallopt parameter, and the thresholds tried (newer glibc takes 512 MB; older ones cap it at 32 MB).
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLDS = (512 * 2**20, 32 * 2**20)


def keep_buffers_in_heap() -> int:
    """Raise glibc's mmap threshold for this process so that the engine's large buffers are reused from the heap.

    CTranslate2 grows each layer's key/value buffers every step (about 22 MB a layer for 8 prompts of 1,150 tokens on
    the default model). glibc serves blocks above its mmap threshold with fresh ``mmap`` calls (and page faults on
    every page) until its dynamic threshold has grown past them, and always above 32 MB, the ceiling of that
    adjustment: measured, the first long-context batch of a process ran 0.8 s a step instead of 0.33 s. A fixed
    threshold of 512 MB keeps them in the heap (freed memory at the top of the heap is still given back).
    Returns the threshold set, 0 where none was (not glibc, or the user set ``MALLOC_MMAP_THRESHOLD_``: theirs stands).
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or platform.libc_ver()[0] != "glibc":
        return 0
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return 0
    for threshold in MMAP_THRESHOLDS:
        if mallopt(M_MMAP_THRESHOLD, threshold) == 1:
            return threshold
    return 0


def has_chat_template(model_dir: str) -> bool:
    """Whether a CTranslate2 model directory ships a chat template (chat_template.jinja or tokenizer_config.json's)."""
    if os.path.isfile(os.path.join(model_dir, "chat_template.jinja")):
        return True
    template = _read_json(os.path.join(model_dir, "tokenizer_config.json")).get("chat_template")
    return bool(template) and (isinstance(template, list) or bool(str(template).strip()))


class Model:
    """A loaded model directory. Thread-safe for concurrent generation calls."""

    def __init__(self, path: str, options: ModelOptions | None = None):

        options = options or ModelOptions()
        self.path = os.path.abspath(path)
        if not os.path.isdir(self.path):
            raise ModelLoadError(f"model directory not found: {self.path}")
        missing = [name for name in MODEL_FILES if not os.path.isfile(os.path.join(self.path, name))]
        if missing:
            raise ModelLoadError(f"{self.path}: not a CTranslate2 model directory (missing {', '.join(missing)})")

        self.ct2_config = _read_json(os.path.join(self.path, "config.json"))
        self.tokenizer_config = _read_json(os.path.join(self.path, "tokenizer_config.json"))
        self.generation_config = _read_json(os.path.join(self.path, "generation_config.json"))
        self.metadata = _read_json(os.path.join(self.path, "llm_blueprint.json"))
        self.vocabulary = load_vocabulary(self.path)

        specials = self._special_tokens()
        self.bos_token = specials["bos_token"]
        self.eos_token = specials["eos_token"]
        add_bos = self.tokenizer_config.get("add_bos_token", False)
        self.tokenizer: Tokenizer = load_tokenizer(self.path, self.vocabulary, self.bos_token, bool(add_bos))
        self.chat_template = self._load_chat_template(options.chat_template, specials)
        if self.chat_template is None:
            log.warning("%s has no chat template (a base model?): chat requests get 400 until LLM_CHAT_TEMPLATE gives "
                        "one (docs/converting-models.md); /v1/completions works without one", self.path)
        self.end_tokens = self._end_tokens()
        self.end_token_ids = {self.tokenizer.token_to_id(t) for t in self.end_tokens}
        self.context_length = self._context_length(options.context_length)
        self.sampling = self._recommended_sampling()
        self.sliding_window = self._smallest_window()
        # No token covers more characters than its vocabulary string has, so a
        # text longer than this cannot fit and is refused without tokenizing it.
        self.max_prompt_chars = self.context_length * max(len(t) for t in self.vocabulary)

        self.device = resolve_device(options.device)
        self.compute_type = options.compute_type or DEFAULT_COMPUTE_TYPES[self.device]
        self.inter_threads = options.inter_threads
        self.intra_threads = options.intra_threads
        resident = resident_bytes()
        self.generator = self.new_generator()
        # What the weights take once loaded (on CPU with MKL about twice model.bin: it keeps packed int8 copies);
        # a prompt cache swap holds a second copy for a moment, so its budget reserves this.
        self.loaded_bytes = max(0, resident_bytes() - resident) if self.device == "cpu" else 0
        log.info(
            "loaded model %s on %s (%s), context %d, end tokens %s",
            self.path, self.device, self.compute_type, self.context_length, self.end_tokens,
        )
        if self.device == "cpu" and self.compute_type.startswith("int8"):
            from .cpu_backend import describe, int8_products_may_saturate

            (log.warning if int8_products_may_saturate() else log.info)("%s", describe())

    def new_generator(self):
        """A CTranslate2 generator of this model with its settings (the prompt cache swaps in a fresh one to free
        the states it holds)."""
        import ctranslate2

        try:
            generator = ctranslate2.Generator(self.path, device=self.device, compute_type=self.compute_type,
                                              inter_threads=self.inter_threads, intra_threads=self.intra_threads)
        except (RuntimeError, ValueError) as exc:
            raise ModelLoadError(f"CTranslate2 cannot load {self.path} on {self.device}/{self.compute_type}: {exc}") from exc
        self._warm_replicas(generator)
        return generator

    def _warm_replicas(self, generator) -> None:
        """Run one tiny generation on every replica, so that what each replica's threads set up on their first call
        is there when the model is ready: not in the first requests' latency, and in the memory measured after
        loading (``loaded_bytes``). A replica's first call keeps about 30 MB for good (SmolLM2, oneDNN): a worker
        of two replicas warmed by one request grew by 10 % under its first burst and never gave it back, as
        memory the first burst took (bench/peer.py's idle figure)."""
        token = self.bos_token if self.bos_token in self.vocabulary else self.vocabulary[0]
        replicas = max(1, self.inter_threads)
        # One example per job (max_batch_size 1): the pool hands the jobs to its idle replicas, one each.
        results = generator.generate_batch([[token]] * replicas, max_length=2, max_batch_size=1, beam_size=1,
                                           include_prompt_in_result=False, asynchronous=True)
        for result in results:
            result.result()

    @property
    def weights_bytes(self) -> int:
        """Memory one loaded copy of the weights takes: measured at load (CPU), at least ``model.bin``'s size."""
        return max(os.path.getsize(os.path.join(self.path, "model.bin")), self.loaded_bytes)

    # Loading helpers ---------------------------------------------------------
    def _special_tokens(self) -> dict[str, str | None]:
        tokens = {name: _token_text(self.tokenizer_config.get(name)) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
        tokens["bos_token"] = tokens["bos_token"] or self.ct2_config.get("bos_token")
        tokens["eos_token"] = tokens["eos_token"] or self.ct2_config.get("eos_token")
        return tokens

    def _load_chat_template(self, override: str | None, specials: dict[str, str | None]) -> ChatTemplate | None:
        source = None
        if override:
            if os.path.isfile(override):
                with open(override, encoding="utf-8") as f:
                    source = f.read()
            else:
                source = override
        elif os.path.isfile(os.path.join(self.path, "chat_template.jinja")):
            with open(os.path.join(self.path, "chat_template.jinja"), encoding="utf-8") as f:
                source = f.read()
        else:
            template = self.tokenizer_config.get("chat_template")
            if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
                named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
                template = named.get("default") or next(iter(named.values()), None)
            source = template if isinstance(template, str) and template.strip() else None
        return ChatTemplate(source, specials) if source else None

    def _end_tokens(self) -> list[str]:
        ends: list[str] = []
        if self.eos_token:
            ends.append(self.eos_token)
        eos_ids = self.generation_config.get("eos_token_id")
        for token_id in eos_ids if isinstance(eos_ids, list) else [eos_ids]:
            if isinstance(token_id, int) and 0 <= token_id < len(self.vocabulary):
                ends.append(self.vocabulary[token_id])
        ends.extend(t for t in KNOWN_TERMINATORS if self.tokenizer.token_to_id(t) is not None)
        return list(dict.fromkeys(ends))

    def _recommended_sampling(self) -> dict[str, float]:
        """The sampling the model ships in generation_config.json (temperature, top_p, top_k, repetition_penalty);
        ``do_sample: false`` means greedy."""
        config = self.generation_config
        sampling: dict[str, float] = {}
        for key in SAMPLING_KEYS:
            value = config.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
                sampling[key] = int(value) if key == "top_k" else float(value)
        if config.get("do_sample") is False:
            sampling["temperature"] = 0.0
        return sampling

    def _smallest_window(self) -> int:
        """The smallest sliding window of the model's attention layers (0: none): after a static prompt longer than
        this, the engine decodes one token at a time (see ct2_batch)."""
        from .prompt_cache import read_spec_summary

        try:
            scalars = read_spec_summary(os.path.join(self.path, "model.bin"))["scalars"]
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read {self.path}/model.bin: {exc}") from exc
        windows = [int(v) for k, v in scalars.items() if k.endswith("sliding_window") and int(v) > 0]
        return min(windows, default=0)

    def _context_length(self, override: int | None) -> int:
        if override:
            return int(override)
        for value in (
            self.metadata.get("context_length"),
            self.generation_config.get("max_length") if "max_length" in self.generation_config else None,
            self.tokenizer_config.get("model_max_length"),
        ):
            if isinstance(value, (int, float)) and 0 < value < 10_000_000:
                return int(value)
        log.warning("%s: context length unknown, assuming %d (set LLM_CONTEXT_LENGTH)", self.path, FALLBACK_CONTEXT_LENGTH)
        return FALLBACK_CONTEXT_LENGTH

    # Prompts -----------------------------------------------------------------
    @property
    def name(self) -> str:
        return os.path.basename(self.path.rstrip(os.sep))

    def render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    add_generation_prompt: bool = True, **extra: Any) -> str:
        """The chat rendered as prompt text by the model's template."""
        if self.chat_template is None:
            raise ChatTemplateError(
                f"model {self.name!r} has no chat template, so it serves raw completions only; "
                "use /v1/completions or configure LLM_CHAT_TEMPLATE",
                param="messages",
            )
        return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools, **extra)

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, **extra: Any) -> list[int]:
        """Token ids of the rendered chat (the template writes its own BOS)."""
        return self.encode_text(self.render_chat(messages, tools=tools, **extra), "messages")

    def encode_text(self, text: str, param: str = "messages") -> list[int]:
        """Token ids of already rendered prompt text (control tokens as written, no BOS added)."""
        self._check_length(text, param)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a raw completion prompt (BOS added when the model wants one)."""
        self._check_length(text, "prompt")
        return self.tokenizer.encode(text, add_special_tokens=True)

    def _check_length(self, text: str, param: str) -> None:
        if len(text) > self.max_prompt_chars:
            raise InvalidRequest(
                f"This model's maximum context length is {self.context_length} tokens, and the prompt's "
                f"{len(text)} characters cannot fit in it. Please reduce the length of the prompt.",
                param=param, code="context_length_exceeded",
            )

    def close(self) -> None:
        """Release the generator (its native threads and memory)."""
        generator = self.__dict__.pop("generator", None)
        if generator is not None:
            del generator
