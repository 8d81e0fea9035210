"""The only caller of CTranslate2's ``generate_batch``: one engine call for a batch of rows, with CTranslate2's quirks
kept here, where they are checked, so that the rest of the engine sees each row's new tokens and nothing else.

CTranslate2 (4.8) facts this module is built on (read in its ``src/models/language_model.cc`` and
``src/decoding.cc``, and measured):

- With ``include_prompt_in_result=False`` it prefills every row up to the shortest one and feeds the rest of the
  longer rows one token per step ("forced" tokens, no callback). But it does so only when the shortest row has two
  tokens or more: when one row is a single token, nothing is prefilled, ``return_prefix`` stays on, and the forced
  tokens of the longer rows come back through the callback as if generated, counted in ``max_length``. Taken as
  new tokens, they repeat the end of the row: an answer that restarted its batch emitted its own last tokens a
  second time (issue #29). Here those *echoes* are recognised (each one must equal the row's own token, else the
  row fails) and never reach the caller.
- After a static prompt longer than a sliding window, the multi-token forward of the rows overruns the attention
  scores of the windowed layers: the length mask counts every position since the start (step + t + 1) while those
  layers keep only the window's keys, and CPU softmax reads and writes ``lengths[i]`` values of a row that holds
  window + rows' length. The overrun writes past the scores buffer: glibc's heap is corrupted and the worker
  aborts later, in another allocation (issue #35). Decoding one token at a time is not masked and keeps windowed
  caches right, so after such a static prompt every row is fed one token per step (all echoes, checked).
- A batch's rows are sorted by length inside CTranslate2 with an unstable sort; the step's logits matrix (with
  ``return_logits_vocab``) is handed whole to the first callback of the step, rows in that internal order. The
  callbacks of a step arrive in that order too, and the rows still forcing tokens (no callback) come first (they
  are the longest), so a callback's matrix row is the number of rows still forcing plus the callbacks before it
  in this step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


class InvariantViolation(RuntimeError):
    """A row's tokens did not continue exactly from what was fed (a CTranslate2 behaviour this module does not
    know): that row ends with an error, never with spliced text."""


@dataclass
class Sampling:
    """CTranslate2's sampling options, shared by every row of a call."""

    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    def options(self) -> dict:
        if self.greedy:
            return {"sampling_topk": 1, "repetition_penalty": self.repetition_penalty}
        return {"sampling_topk": self.top_k if self.top_k > 1 else 0, "sampling_topp": self.top_p,
                "sampling_temperature": self.temperature, "repetition_penalty": self.repetition_penalty}


@dataclass
class BatchCall:
    """One ``generate_batch`` call: rows (each a whole context: prompt + tokens generated so far), the first
    ``static`` tokens of which they all share and are fed as CTranslate2's static prompt (held in its cache with
    ``keep``), and each row's budget of new tokens."""

    rows: list[list[int]]
    max_new: list[int]
    min_new: list[int]
    end_tokens: list[str]
    sampling: Sampling = field(default_factory=Sampling)
    static: int = 0
    keep: bool = False
    return_scores: bool = False
    want_logits: bool = False
    window: int = 0  # the model's smallest sliding window (0: none)
    keys: list | None = None  # what each row is to the caller (its entries), for whoever watches the calls

    def __post_init__(self) -> None:
        head = self.rows[0][: self.static]
        if any(len(row) <= self.static or row[: self.static] != head for row in self.rows):
            raise InvariantViolation("the static prompt is not a strict prefix of every row")

    @property
    def rest(self) -> list[list[int]]:
        return [row[self.static:] for row in self.rows]

    @property
    def one_by_one(self) -> bool:
        """Feed every row one token per step: its multi-token forward would overrun a windowed layer (above)."""
        return bool(self.window) and self.static > self.window and min(map(len, self.rest)) >= 2

    @property
    def echoes(self) -> list[int]:
        """How many of each row's tokens CTranslate2 hands back through the callback before its new ones."""
        rest = self.rest
        if self.one_by_one or min(map(len, rest)) == 1:
            return [len(r) - 1 for r in rest]
        return [0] * len(rest)

    @property
    def first_new_steps(self) -> list[int]:
        """The decoding step at which each row's first new token comes: the step after its last own token."""
        rest = self.rest
        if any(self.echoes):
            return [len(r) - 1 for r in rest]
        shortest = min(map(len, rest))
        return [len(r) - shortest for r in rest]


# ``on_token(row, step, logits_row)`` for every new token of a row; True stops that row. ``logits_row``: the row's
# logits of the step when ``want_logits``.
TokenCallback = Callable[[int, object, "np.ndarray | None"], bool]


class _StepRows:
    """Which row of a step's logits matrix a callback's row is, and the matrix (see the module's docstring)."""

    def __init__(self, call: BatchCall, echoes: list[int]):
        shortest = min(map(len, call.rest))
        # steps during which a row is fed its own tokens without a callback (never while it echoes)
        self._silent = [0] * len(call.rows) if any(echoes) else [len(r) - shortest for r in call.rest]
        self._alive = [True] * len(call.rows)
        self._step = -1
        self._calls = 0
        self._matrix = None
        self._view = None  # keeps the matrix's memory alive

    def row(self, step):
        if step.step != self._step:
            self._step, self._calls, self._matrix = step.step, 0, None
            view = step.logits
            shape = list(getattr(view, "shape", None) or [])
            if shape and shape[0]:
                matrix = np.asarray(view)
                self._view, self._matrix = view, matrix.reshape(-1, matrix.shape[-1])
        silent = sum(1 for i, alive in enumerate(self._alive) if alive and self._silent[i] > step.step)
        index = silent + self._calls
        self._calls += 1
        if self._matrix is None or index >= len(self._matrix):
            return None
        return self._matrix[index]

    def ended(self, row: int) -> None:
        self._alive[row] = False


def run(generator, vocabulary: list[str], call: BatchCall, on_token: TokenCallback,
        on_violation: Callable[[int, str], None]) -> None:
    """Run ``call`` on ``generator``; ``on_token`` gets each row's new tokens only (never an echo of its own).

    A row whose echo differs from its own token is stopped and reported to ``on_violation`` (its entry ends with an
    error); the other rows go on."""
    rest = call.rest
    echoes = call.echoes
    first_new = call.first_new_steps
    seen = [0] * len(rest)
    stopped = [False] * len(rest)
    rows = _StepRows(call, echoes) if call.want_logits else None

    def violated(i: int, problem: str) -> bool:
        stopped[i] = True
        if rows is not None:
            rows.ended(i)
        on_violation(i, f"{problem} (row of {len(call.rows[i])} tokens, {call.static} of them static, "
                        f"batch of {len(rest)})")
        return True

    def callback(step) -> bool:
        i = step.batch_id
        row = rows.row(step) if rows is not None else None
        if stopped[i]:
            return True
        if seen[i] < echoes[i]:
            seen[i] += 1
            if step.token_id != rest[i][seen[i]]:
                return violated(i, f"CTranslate2 gave token {step.token_id} where the row's own token "
                                   f"{rest[i][seen[i]]} was to be fed back")
            return False
        if step.step != first_new[i] + (seen[i] - echoes[i]):
            return violated(i, f"a new token came at step {step.step}, not right after the row's "
                               f"{seen[i] - echoes[i]} new tokens from step {first_new[i]}")
        seen[i] += 1
        stop = on_token(i, step, row)
        if stop or step.is_last:
            stopped[i] = True
            if rows is not None:
                rows.ended(i)
        return stop

    min_length = max(call.min_new) + max(echoes) if max(call.min_new) else 0
    options = dict(
        max_length=max(min_length, *(n + e for n, e in zip(call.max_new, echoes, strict=True))),
        min_length=min_length,
        include_prompt_in_result=call.one_by_one,
        end_token=call.end_tokens,
        return_scores=call.return_scores,
        return_logits_vocab=call.want_logits,
        callback=callback,
        **call.sampling.options(),
    )
    if call.static:
        options.update(static_prompt=[vocabulary[t] for t in call.rows[0][: call.static]],
                       cache_static_prompt=call.keep)
    generator.generate_batch([[vocabulary[t] for t in r] for r in rest], **options)


def hold(generator, vocabulary: list[str], ids: list[int]) -> None:
    """Compute the state after ``ids`` and keep it in CTranslate2's cache (a warm-up: nothing is generated; the
    single token after the static prompt is decoded alone, so no windowed layer is overrun)."""
    generator.generate_batch([[vocabulary[ids[-1]]]], static_prompt=[vocabulary[t] for t in ids],
                             cache_static_prompt=True, max_length=1, sampling_topk=1, callback=lambda step: True)


DEFAULT_SEED = 2**32 - 1  # CTranslate2's "no seed": random_device on next use


def run_seeded(model, seed_lock, seed: int, call: BatchCall, on_token, on_violation) -> None:
    """A reproducible sampled run. CTranslate2's RNG is per native thread and seeded once, from a global seed, at
    its first use: the run goes on a fresh generator (new threads) created after setting the seed; ``seed_lock``
    is held until the first token has been sampled. A run that continues a completion (a constrained resume) is
    given a seed mixed from the request's and the tokens so far, so it neither repeats the first run's random
    draws nor depends on anything but the request."""
    import ctranslate2

    seed_lock.acquire()
    released = [False]

    def release() -> None:
        if not released[0]:
            released[0] = True
            ctranslate2.set_random_seed(DEFAULT_SEED)
            seed_lock.release()

    def first_then_on_token(i, step, row):
        release()
        return on_token(i, step, row)

    try:
        ctranslate2.set_random_seed(seed % DEFAULT_SEED)
        generator = ctranslate2.Generator(model.path, device=model.device, compute_type=model.compute_type,
                                          inter_threads=1, intra_threads=model.intra_threads)
        run(generator, model.vocabulary, call, first_then_on_token, on_violation)
        del generator
    finally:
        release()
