"""The prompt cache: model states after prompt prefixes that requests share, kept by CTranslate2, bounded by us.

CTranslate2 keeps the model state after a "static prompt" when a call asks it
to (``generate_batch(..., static_prompt=tokens, cache_static_prompt=True)``):
the next call with the same exact token list copies that state instead of
computing it. Its limits shape this module:

- the key is the exact token list; one static prompt per call, shared by the
  whole batch; a cached state cannot be extended, a longer prefix is computed
  from scratch;
- the cache belongs to the loaded model (every replica of a CPU generator
  shares it) and is never trimmed: it is freed only with the generator.

So this module keeps the list of what the engine holds (the mirror) and
decides, per batch, which prefix to use (the longest one held that the
prompts start with) and whether to store a new one:

- a *cache point* is a prompt prefix ending at a message boundary (the system
  message with the tool definitions; the conversation before the last user
  message). An automatic point is stored when nothing held covers the prompt;
  an explicit one (Anthropic ``cache_control``, OpenAI ``prompt_cache_key``)
  also when what is held covers less than half of it, i.e. when one reuse
  repays the longer computation (a held state cannot be extended);
- after a chat answer, an idle replica may *warm* the conversation so far, so
  the next turn only prefills its new message (``Engine.warm``);
- memory: every held state costs ``bytes_per_token`` per token (keys and
  values of every layer, float32 on CPU). When storing a prefix would exceed
  the budget, the engine loads a fresh generator in the background and swaps
  it in between batches (batches running on the old one finish there); the
  old generator, its states and its copy of the weights are freed with its
  last batch. The budget therefore covers the held states plus, during a swap,
  a second copy of the weights.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

MIN_PREFIX_TOKENS = 64  # a shorter prefix costs little to compute and is not worth a held state


# ----------------------------------------------------------------------------- sizes
def read_spec_summary(model_bin: str) -> dict[str, object]:
    """Layer count, attention width and scalar attributes of a CTranslate2 ``model.bin``, from its variable
    headers only (the weights are skipped, not read). See CTranslate2's ``model_spec.py`` ``_serialize``."""
    shapes: dict[str, tuple[int, ...]] = {}
    scalars: dict[str, float] = {}
    with open(model_bin, "rb") as f:

        def unpack(fmt: str):
            size = struct.calcsize(fmt)
            return struct.unpack(fmt, f.read(size))

        def string() -> str:
            (length,) = unpack("<H")
            return f.read(length)[:-1].decode("utf-8")

        (version,) = unpack("<I")
        if version < 5:
            raise ValueError(f"{model_bin}: binary version {version} is too old to read")
        string()  # spec name
        unpack("<I")  # spec revision
        (count,) = unpack("<I")
        for _ in range(count):
            name = string()
            (rank,) = unpack("<B")
            shape = unpack(f"<{rank}I") if rank else ()
            (dtype,) = unpack("<B")
            (size,) = unpack("<I")
            if size <= 8 and not rank:
                raw = f.read(size)
                scalars[name] = _scalar(raw, dtype)
            else:
                f.seek(size, os.SEEK_CUR)
            shapes[name] = tuple(shape)
    layers = sum(1 for name in shapes if name.startswith("decoder/layer_") and name.endswith("/self_attention/linear_1/weight"))
    width = shapes.get("decoder/layer_0/self_attention/linear_1/weight", (0, 0))[-1]  # heads x head size
    return {"layers": layers, "attention_width": width, "scalars": scalars,
            "embeddings": shapes.get("decoder/embeddings/weight", (0, 0))}  # vocabulary x hidden size


def _scalar(raw: bytes, dtype: int) -> float:
    # CTranslate2's DataType ids: 0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16
    formats = {0: "<f", 1: "<b", 2: "<h", 3: "<i"}
    fmt = formats.get(dtype)
    return struct.unpack(fmt, raw[: struct.calcsize(fmt)])[0] if fmt and len(raw) >= struct.calcsize(fmt) else 0


def state_item_bytes(device: str, compute_type: str) -> int:
    """Bytes of one state value: float32 on CPU (also with int8 weights); on CUDA, 16-bit unless the compute type
    keeps float32 activations."""
    if device != "cuda" or compute_type in ("int8", "int8_float32", "float32"):
        return 4
    return 2


def state_bytes_per_token(model_dir: str, device: str, compute_type: str = "int8") -> int:
    """Bytes a held state costs per prompt token: keys and values of every layer. CTranslate2 keeps grouped-query
    keys and values replicated to every query head (``replicate_heads``), and a single one for multi-query
    attention (``num_heads_kv`` 1)."""
    return state_bytes_of(read_spec_summary(os.path.join(model_dir, "model.bin")), device, compute_type)


def state_bytes_of(summary: dict[str, object], device: str, compute_type: str = "int8") -> int:
    """:func:`state_bytes_per_token` from a spec already read (:func:`read_spec_summary`)."""
    width = int(summary["attention_width"])
    scalars = summary["scalars"]
    heads = int(scalars.get("decoder/num_heads", 0) or 0)
    kv_heads = {int(v) for k, v in scalars.items() if k.endswith("num_heads_kv")}
    if kv_heads == {1} and heads:
        width //= heads
    return max(1, int(summary["layers"]) * 2 * width * state_item_bytes(device, compute_type))


# ----------------------------------------------------------------------------- the mirror
@dataclass
class HeldPrefix:
    tokens: tuple[int, ...]
    nbytes: int
    ready: bool = False  # False while the batch that stores it is still computing it
    hits: int = 0
    last_used: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Plan:
    """What one batch does with the cache: run after ``prefix`` (a held state, or one it stores now; with ``keep``
    False, a prefix computed apart for this batch only, so that its prefill is split where a cached one would be)."""

    prefix: tuple[int, ...] = ()
    store: bool = False
    generation: int = 0
    keep: bool = True

    @property
    def read(self) -> bool:
        return bool(self.prefix) and self.keep and not self.store

    @property
    def length(self) -> int:
        return len(self.prefix)


NO_PLAN = Plan()


class PromptCache:
    """What the engine's current generator holds, and the decisions about it. Called under the engine's
    scheduling lock (no lock of its own)."""

    def __init__(self, bytes_per_token: int, budget_bytes: int, weights_bytes: int = 0,
                 min_tokens: int = MIN_PREFIX_TOKENS):
        self.bytes_per_token = bytes_per_token
        self.budget_bytes = budget_bytes
        self.weights_bytes = weights_bytes  # a swap holds a second copy of them for a moment
        self.min_tokens = min_tokens
        self.held: dict[tuple[int, ...], HeldPrefix] = {}
        self._bytes = 0
        self.generation = 0  # which generator the mirror describes
        self.swapping = False  # a fresh generator is loading: store nothing more on the old one
        self.swap_wanted = False  # set by a decision that found the budget full; the engine starts the swap
        # counters, read by the metrics
        self.hits = 0
        self.misses = 0
        self.read_tokens = 0
        self.written_tokens = 0
        self.swaps = 0

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    @property
    def capacity(self) -> int:
        """Bytes of states the budget allows (the budget less the weights a swap briefly doubles)."""
        return max(0, self.budget_bytes - self.weights_bytes)

    @property
    def held_bytes(self) -> int:
        return self._bytes

    def _hold(self, tokens: tuple[int, ...], nbytes: int) -> None:
        self.held[tokens] = HeldPrefix(tokens, nbytes)
        self._bytes += nbytes

    def longest_held(self, ids: list[int]) -> HeldPrefix | None:
        """The longest held prefix that ``ids`` starts with and goes beyond (a call needs one token after it); one
        still being computed only when no computed one is there (waiting for it then beats computing it again, as
        its computation started earlier; with a computed one, the shorter rest to prefill is known to be quicker)."""
        ready = pending = None
        for tokens, held in self.held.items():
            n = len(tokens)
            if n < len(ids) and tuple(ids[:n]) == tokens:
                if held.ready and (ready is None or n > len(ready.tokens)):
                    ready = held
                elif not held.ready and (pending is None or n > len(pending.tokens)):
                    pending = held
        return ready or pending

    def plan(self, ids: list[int], points: tuple[int, ...], explicit: tuple[int, ...]) -> Plan | None:
        """The plan for a batch seeded by this prompt; None while the prefix it would use is still being computed
        by another batch (waiting for it is faster than computing it again)."""
        if not self.enabled:
            return NO_PLAN
        held = self.longest_held(ids)
        if held is not None and not held.ready:
            return None
        covered = len(held.tokens) if held else 0
        candidates = [(p, False) for p in points] + [(p, True) for p in explicit]
        wanted = [p for p, explicit_point in candidates
                  if covered < p < len(ids) and (covered == 0 or (explicit_point and covered < p / 2))]
        stored = self._store(tuple(ids[:max(wanted)])) if wanted else None
        if stored is not None:
            return stored
        if held:
            return self._use(held)
        if candidates:
            self.misses += 1
        return NO_PLAN

    def plan_at(self, ids: list[int], length: int) -> Plan | None:
        """The plan that splits the prompt's prefill exactly after ``length`` tokens (deterministic mode: greedy
        output then depends on the request alone, not on what the cache holds): read that prefix when held, else
        compute it and store it when the budget allows, else compute it for this batch only."""
        tokens = tuple(ids[:length])
        held = self.held.get(tokens)
        if held is not None:
            return self._use(held) if held.ready else None
        return self._store(tokens) or Plan(tokens, keep=False)

    def warm_plan(self, ids: list[int]) -> Plan:
        """The plan that stores ``ids`` as a whole (a conversation so far), unless held or over budget."""
        tokens = tuple(ids)
        plan = None if tokens in self.held else self._store(tokens)
        if plan is not None:
            self.misses -= 1  # computed ahead of any request: not a request's miss
        return plan or NO_PLAN

    def _store(self, tokens: tuple[int, ...]) -> Plan | None:
        """The plan that computes and holds ``tokens``; None when they are too few or too many, a swap is under way,
        or the budget has no room (a swap is then asked for)."""
        if not self.enabled or self.swapping or len(tokens) < self.min_tokens:
            return None
        nbytes = len(tokens) * self.bytes_per_token
        if nbytes > self.capacity:
            return None
        if self.held_bytes + nbytes > self.capacity:
            self.swap_wanted = True
            return None
        self._hold(tokens, nbytes)
        self.misses += 1
        return Plan(tokens, True, self.generation)

    def _use(self, held: HeldPrefix) -> Plan:
        held.hits += 1
        held.last_used = time.monotonic()
        self.hits += 1
        self.read_tokens += len(held.tokens)
        return Plan(held.tokens, False, self.generation)

    def retract(self, plan: Plan) -> None:
        """Undo a plan the engine will not run (see Engine._plan): a store is forgotten, a read uncounted."""
        if plan.store:
            self.forget(plan)
            self.misses -= 1
        elif plan.read:
            held = self.held.get(plan.prefix)
            if held is not None:
                held.hits -= 1
            self.hits -= 1
            self.read_tokens -= len(plan.prefix)

    def ready(self, plan: Plan) -> None:
        """The batch that stores ``plan`` passed its prefill: the state is held."""
        held = self.held.get(plan.prefix) if plan.generation == self.generation else None
        if held is not None and not held.ready:
            held.ready = True
            self.written_tokens += len(held.tokens)

    def forget(self, plan: Plan) -> None:
        """The batch that was to store ``plan`` failed before its state was held."""
        held = self.held.get(plan.prefix) if plan.generation == self.generation else None
        if held is not None and not held.ready:
            del self.held[plan.prefix]
            self._bytes -= held.nbytes

    def survivors(self) -> list[tuple[int, ...]]:
        """The most recently used prefixes that fit in half the capacity: warmed again after a swap."""
        keep, total = [], 0
        for held in sorted(self.held.values(), key=lambda h: h.last_used, reverse=True):
            if held.hits and total + held.nbytes <= self.capacity // 2:
                keep.append(held.tokens)
                total += held.nbytes
        return keep

    def swapped(self) -> None:
        """A fresh generator (nothing held) replaced the old one."""
        self.held.clear()
        self._bytes = 0
        self.generation += 1
        self.swapping = False
        self.swaps += 1


def release_freed_memory() -> None:
    """Give the memory that a dropped generator freed back to the system: CTranslate2 allocates through MKL's
    memory manager where it is built with MKL (its per-thread pools keep freed buffers for reuse), and glibc keeps
    freed heap pages; without this the old generator's held states would stay resident."""
    import ctypes
    import glob

    import ctranslate2

    libraries = glob.glob(os.path.join(os.path.dirname(ctranslate2.__file__), "..", "ctranslate2.libs", "libctranslate2*"))
    for library in libraries[:1]:
        try:
            ctypes.CDLL(library).mkl_free_buffers()
        except (OSError, AttributeError):
            pass
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
