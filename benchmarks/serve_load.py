#!/usr/bin/env python
"""Load benchmark of ``vlmkit serve``: 1 client vs N concurrent clients, with the openai client.

    python benchmarks/serve_load.py FOLDER [--clients 1 8] [--requests 16] [--max-tokens 64]
                                           [--max-batch 8] [--int8] [--image] [--json out.json]

Starts ``vlmkit serve FOLDER`` in a subprocess on a free 127.0.0.1 port (its own process, so the
clients' Python does not share its interpreter lock), warms it up, then for each client count
sends the same ``--requests`` streaming chat requests from that many threads, each thread one
request after another (greedy, ``max_tokens`` each; ``--image`` adds a 512x384 image to every
prompt). Per request it
records the time to the first content chunk (TTFT), the completion tokens (``usage``) and the
per-token latency ``(last chunk - first chunk) / (tokens - 1)``. Per client count it prints the
aggregate output tokens/s (all completion tokens / wall time), the p50/p95 TTFT and per-token
latency, and finally the N-client / 1-client throughput ratio.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: Prompts the SmolLM2-weights test folder answers at length (others it ends at once): each runs
#: to max_tokens, so both phases decode the same number of tokens.
PROMPTS = [
    "Describe a walk through a busy market in the morning.",
    "Tell me about the history of bread in a few paragraphs.",
    "Describe a sunrise over the ocean.",
    "Describe a quiet library at night.",
    "Tell me about the history of the bicycle.",
    "Describe a forest after the rain.",
    "Describe a train journey through the mountains.",
    "Tell me about the history of tea.",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: str, port: int, max_batch: int, int8: bool) -> subprocess.Popen:
    import httpx

    args = ["serve", folder, "--port", str(port), "--max-batch", str(max_batch), "--max-queue", "256",
            "--model-name", "bench"] + (["--int8"] if int8 else [])  # fmt: skip
    code = "import sys; from vlmkit.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit("the server did not start within 300 s")


def _image_url() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.radial_gradient("L").convert("RGB").resize((512, 384)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def one_request(client, prompt: str, max_tokens: int, image: str | None) -> dict:
    content = [{"type": "text", "text": prompt}]
    if image:
        content.insert(0, {"type": "image_url", "image_url": {"url": image}})
    start = time.perf_counter()
    first = last = None
    tokens = 0
    stream = client.chat.completions.create(model="bench", messages=[{"role": "user", "content": content}],
                                            max_tokens=max_tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True})  # fmt: skip
    for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter()
            first = first or last
    end = time.perf_counter()
    first, last = first or end, last or end
    return {"ttft": first - start, "tpot": (last - first) / (tokens - 1) if tokens > 1 else None, "tokens": tokens,
            "seconds": end - start}  # fmt: skip


def run_phase(base_url: str, clients: int, total: int, max_tokens: int, image: str | None) -> dict:
    """``total`` requests (prompt ``i % len(PROMPTS)``), shared out over ``clients`` threads."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    results: list[dict] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        for i in range(k, total, clients):
            out = one_request(client, PROMPTS[i % len(PROMPTS)], max_tokens, image)
            with lock:
                results.append(out)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    tpots = [r["tpot"] for r in results if r["tpot"] is not None]
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_p50": _pct(results, "ttft", 50), "ttft_p95": _pct(results, "ttft", 95),
            "tpot_p50": _quantile(tpots, 50), "tpot_p95": _quantile(tpots, 95)}  # fmt: skip


def _quantile(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _pct(results: list[dict], key: str, q: int) -> float:
    return _quantile([r[key] for r in results], q)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="checkpoint folder (or anything `vlmkit serve` takes)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="client counts to run (default 1 8)")
    parser.add_argument("--requests", type=int, default=16, help="requests per phase, the same set in each (default 16)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request (default 64)")
    parser.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch (default 8)")
    parser.add_argument("--int8", action="store_true", help="serve with --int8")
    parser.add_argument("--image", action="store_true", help="add a 512x384 image to every prompt")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    port = _free_port()
    server = start_server(args.folder, port, args.max_batch, args.int8)
    base = f"http://127.0.0.1:{port}/v1"
    image = _image_url() if args.image else None
    try:
        run_phase(base, 2, 1, 8, image)  # warm-up
        phases = [run_phase(base, c, args.requests, args.max_tokens, image) for c in args.clients]
    finally:
        server.terminate()
        server.wait(30)
    print(f"{'clients':>7} {'requests':>8} {'tokens':>7} {'wall s':>7} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p95':>9} "
          f"{'tok ms p50':>10} {'tok ms p95':>10}")  # fmt: skip
    for p in phases:
        print(f"{p['clients']:>7} {p['requests']:>8} {p['tokens']:>7} {p['wall_s']:>7.2f} {p['tokens_per_s']:>7.1f} "
              f"{p['ttft_p50']:>8.3f}s {p['ttft_p95']:>8.3f}s {1000 * p['tpot_p50']:>10.1f} {1000 * p['tpot_p95']:>10.1f}")  # fmt: skip
    if len(phases) > 1:
        ratio = phases[-1]["tokens_per_s"] / phases[0]["tokens_per_s"]
        print(f"aggregate tokens/s, {phases[-1]['clients']} clients vs {phases[0]['clients']}: {ratio:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "phases": phases}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
