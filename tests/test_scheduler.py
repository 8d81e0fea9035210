"""The scheduling policy, without a model: which entries batch together, how a burst is shared, when a batch
restarts for arrivals, and that under random load every completion ends exactly once.

The scheduler decides and never runs anything (engine/scheduler.py), so a fake runner drives it here: it steps
each batch's entries with the real per-token code (completion.Entry) and hands the batch back as the engine's
workers do.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from llm_blueprint.engine.completion import Job
from llm_blueprint.engine.handoff import Channel
from llm_blueprint.engine.scheduler import BatchingOptions, BatchState, Scheduler
from llm_blueprint.events import Done, Finish, GenerationRequest


class FakeTokenizer:
    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


class FakeModel:
    end_token_ids = {0}
    tokenizer = FakeTokenizer()


@dataclass
class Step:
    step: int
    token_id: int = 5
    log_prob: float = -0.1
    is_last: bool = False


def job(prompt: int, max_tokens: int = 8, temperature: float = 0.0, seed: int | None = None, n: int = 1) -> Job:
    request = GenerationRequest(prompt_ids=list(range(1, prompt + 1)), max_tokens=max_tokens,
                                temperature=temperature, seed=seed, n=n)
    return Job(FakeModel(), request, Channel())


def events(j: Job) -> list:
    out = []
    while True:
        try:
            out.append(j.channel.get(timeout=0))
        except Exception:
            return out


def scheduler(replicas: int = 1, **options) -> Scheduler:
    return Scheduler(BatchingOptions(gather_seconds=0, **options), replicas)


def test_compatible_entries_batch_together_and_the_others_wait():
    s = scheduler()
    greedy = [job(40), job(42), job(41)]
    sampled, long = job(40, temperature=0.7), job(200)
    for j in [*greedy, sampled, long]:
        s.submit(j.entries)
    batch, state = s.take_batch(generator=None)
    assert {e.job for e in batch} == set(greedy)
    assert s.pending == [sampled.entries[0], long.entries[0]]
    assert s.batches_running == 1 and s.states == [state] and state.entries == batch
    batch, _ = s.take_batch(generator=None)  # the oldest waiting entry seeds the next batch
    assert batch == sampled.entries


def test_a_seeded_sampled_request_runs_alone():
    s = scheduler()
    seeded = job(40, temperature=0.8, seed=7, n=2)
    s.submit(seeded.entries)
    s.submit(job(40, temperature=0.8).entries)
    batch, _ = s.take_batch(generator=None)
    assert batch == seeded.entries and len(s.pending) == 1


def test_a_burst_is_shared_evenly_between_replicas():
    s = scheduler(replicas=2)
    for _ in range(16):
        s.submit(job(40).entries)
    first, _ = s.take_batch(generator=None)
    second, _ = s.take_batch(generator=None)
    assert len(first) == len(second) == 8 and not s.pending
    s = scheduler(replicas=2)
    for _ in range(6):
        s.submit(job(40).entries)
    first, _ = s.take_batch(generator=None)
    assert len(first) == 3  # the other replica takes the other half


def test_a_young_batch_restarts_for_arrivals_and_its_entries_queue_first():
    s = scheduler(join_tokens=16)
    running = [job(40), job(41)]
    for j in running:
        s.submit(j.entries)
    batch, state = s.take_batch(generator=None)
    arrivals = [job(40) for _ in range(6)]
    for j in arrivals:
        s.submit(j.entries)
    assert s.should_restart(batch, state, Step(step=1))
    survivors, merged, following = s.settle(batch, state)
    assert survivors == batch and merged == [] and following is None
    assert s.pending[:2] == batch and s.restarts["young"] == 2 and s.batches_running == 0
    again, _ = s.take_batch(generator=None)
    assert set(batch) <= set(again) and len(again) == 8


def test_no_restart_while_a_replica_is_idle():
    s = scheduler(join_tokens=16)
    s.submit(job(40).entries)
    batch, state = s.take_batch(generator=None)
    s.submit(job(40).entries)
    s.set_idle(+1)
    assert not s.should_restart(batch, state, Step(step=1))


def _older_batch(s: Scheduler, max_tokens: int, joiner_prompt: int, joiners: int = 3):
    s.submit(job(40, max_tokens=max_tokens).entries)
    s.submit(job(40, max_tokens=max_tokens).entries)
    batch, state = s.take_batch(generator=None)
    state.first_step_at, state.steps = time.monotonic() - 1.0, 10  # 10 steps of 0.1 s
    s.prefill_seconds_per_token = 1e-4
    for entry in batch:
        for step in range(10):
            entry.on_step(Step(step=step))
    waiting = [job(joiner_prompt, max_tokens=max_tokens) for _ in range(joiners)]
    for j in waiting:
        s.submit(j.entries)
    return batch, state, waiting


def test_an_older_batch_merges_when_that_saves_more_waiting_than_it_costs():
    s = scheduler(join_tokens=4, length_tolerance=0.0)
    batch, state, waiting = _older_batch(s, max_tokens=400, joiner_prompt=60)
    assert s.should_restart(batch, state, Step(step=10))
    assert state.joiners == [j.entries[0] for j in waiting]
    survivors, merged, following = s.settle(batch, state)
    assert merged == survivors + state.joiners and following.entries == merged
    assert not s.pending and s.restarts["merged"] == 2 and s.states == [following]


def test_an_older_batch_near_its_end_does_not_merge():
    s = scheduler(join_tokens=4)
    batch, state, _ = _older_batch(s, max_tokens=12, joiner_prompt=400)  # 2 tokens left, 360 tokens to re-read
    assert not s.should_restart(batch, state, Step(step=10))


def test_restarts_are_bounded_per_entry():
    s = scheduler(join_tokens=4, max_restarts=1)
    batch, state, _ = _older_batch(s, max_tokens=400, joiner_prompt=60)
    for entry in batch:
        entry.restarts = 1
    assert not s.should_restart(batch, state, Step(step=10))


def run_simulation(seed: int, replicas: int = 1) -> tuple[list[Job], Scheduler, list[list]]:
    """One worker's loop over random arrivals: take a batch, step it (arrivals keep coming), hand it back."""
    rng = random.Random(seed)
    s = scheduler(replicas=replicas, max_batch_size=rng.choice([2, 4, 8]), join_tokens=rng.choice([0, 3, 16]),
                  max_restarts=rng.choice([0, 1, 2]), max_young_restarts=rng.choice([1, 3, 8]))
    s.prefill_seconds_per_token = 1e-4
    plan = [(rng.randrange(60), job(rng.randrange(5, 80), max_tokens=rng.randrange(1, 30),
                                   temperature=rng.choice([0.0, 0.0, 0.7]), n=rng.choice([1, 1, 2])))
            for _ in range(rng.randrange(5, 25))]
    arrivals = sorted(plan, key=lambda item: item[0])
    jobs = [j for _, j in plan]
    tick, batches = 0, []

    def arrive() -> None:
        while arrivals and arrivals[0][0] <= tick:
            s.submit(arrivals.pop(0)[1].entries)

    while arrivals or s.pending:
        arrive()
        batch, state = s.take_batch(generator=None)
        tick += 1
        while batch:
            batches.append(list(batch))
            state.first_step_at = time.monotonic() - 0.01
            for step in range(1000):
                arrive()
                tick += 1
                live = [e for e in batch if not e.finished]
                if not live:
                    break
                state.steps = step + 1  # as the engine's per-token callback counts them
                for entry in live:
                    entry.on_step(Step(step=step))
                if s.should_restart(batch, state, Step(step=step)):
                    break
            survivors, merged, following = s.settle(batch, state)
            for entry in batch:
                if entry not in survivors:
                    entry.finish("length")
            batch, state = merged, following
    return jobs, s, batches


def test_under_random_arrivals_every_completion_ends_once_with_its_budget():
    restarts = {"young": 0, "merged": 0}
    for seed in range(60):
        jobs, s, batches = run_simulation(seed)
        options = s.options
        restarts = {k: v + s.restarts[k] for k, v in restarts.items()}
        for j in jobs:
            got = events(j)
            finishes = [e for e in got if isinstance(e, Finish)]
            assert sorted(f.index for f in finishes) == list(range(j.request.n)), seed  # each entry ends once
            assert all(f.reason == "length" and f.completion_tokens == j.request.max_tokens for f in finishes), seed
            assert isinstance(got[-1], Done) and sum(isinstance(e, Done) for e in got) == 1, seed
            for entry in j.entries:
                assert len(entry.generated) == j.request.max_tokens, seed  # nothing lost or repeated over restarts
                assert entry.restarts <= options.max_restarts and entry.young_restarts <= options.max_young_restarts
        for batch in batches:
            assert len({e.job.sampling_key for e in batch}) == 1, seed  # one sampling setting per batch
            assert len(set(map(id, batch))) == len(batch), seed
        assert not s.pending and not s.states and s.batches_running == 0, seed
    assert restarts["young"] > 20 and restarts["merged"] > 5  # the runs went through both kinds of restart


def test_the_state_of_a_batch_starts_empty():
    state = BatchState()
    assert not state.restart and state.entries is None and state.plan.length == 0
