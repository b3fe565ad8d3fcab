"""Benchmark the processing layer against the raw `tokenizers` calls it wraps.

Run: python benchmarks/bench_processing.py  (about 10 s; no assertions)

Each ratio divides a row's time by its baseline row's time, both measured in this run:
- chat template + tokenize of a typical 3-message chat with the Qwen3 tokenizer, vs the raw
  ``tokenizers.Tokenizer.encode`` of the same prompt text;
- incremental detokenization, per token, vs a plain ``decode`` of one token.
- the built-in ChatML render of a one-message chat (the endpoint picker's short request),
  which skips jinja2 for a conversation without tools, vs the same template run by jinja2.
Extra rows show the built-in ByteTokenizer and the stop-string matcher.
"""

from __future__ import annotations

import gzip
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

import tokenizers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from interlock.processing import (
    CHATML_TEMPLATE,
    ByteTokenizer,
    ChatTemplate,
    IncrementalDetokenizer,
    StopStringMatcher,
    Tokenizer,
    load_tokenizer,
)

QWEN3_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tokenizers" / "qwen3"

MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful assistant. Answer concisely and cite the relevant "
        "section of the documentation when you can.",
    },
    {
        "role": "user",
        "content": "I'm deploying a small web service behind a load balancer and requests "
        "sometimes hang for exactly 60 seconds before failing. The service itself logs that "
        "it answered in under 50 ms. What should I look at first, and how would I confirm "
        "the cause?",
    },
    {
        "role": "assistant",
        "content": "A hang of exactly 60 seconds points at an idle or read timeout outside "
        "your service. Check, in order: (1) the load balancer's idle timeout versus your "
        "server's keep-alive timeout — if the server keeps connections open longer than the "
        "balancer, the balancer may reuse a connection the server already closed; (2) whether "
        "responses carry a correct Content-Length or use chunked encoding, since a missing "
        "terminator makes the client wait for more bytes; (3) health-check settings that take "
        "a target out of rotation mid-request. To confirm, capture traffic on the service "
        "host with tcpdump and compare the FIN/RST timing with the balancer's access logs.",
    },
]

COMPLETION = (
    "Sure! Here is a short overview.\n\n"
    "1. **Idle timeouts** — make the server's keep-alive (e.g. 75 s) longer than the load "
    "balancer's idle timeout (60 s).\n"
    "2. **Framing** — check `Content-Length`: `curl -v http://service/health` shows it.\n\n"
    "```python\nimport socket\nsock = socket.create_connection(('service', 80), timeout=5)\n"
    "sock.sendall(b'GET /health HTTP/1.1\\r\\nHost: service\\r\\n\\r\\n')\nprint(sock.recv(4096))\n"
    "```\n\n"
    "Also, in 中文: 检查负载均衡器的空闲超时。 Emoji check: 🚀👍🏽🫠. "
) * 4


def per_call_us(function: Callable[[], object], number: int, repeat: int = 5) -> float:
    """Best-of-``repeat`` time of one call, in microseconds."""
    return min(timeit.repeat(function, number=number, repeat=repeat)) / number * 1e6


def detokenize_all(tokenizer: Tokenizer, ids: list[int]) -> None:
    detokenizer = IncrementalDetokenizer(tokenizer)
    for token_id in ids:
        detokenizer.push([token_id])
    detokenizer.flush()


def main() -> None:
    rows: list[tuple[str, float, str]] = []  # (case, microseconds, ratio or "baseline")

    qwen3 = load_tokenizer(QWEN3_DIR) if (QWEN3_DIR / "tokenizer.json.gz").is_file() else None
    template = qwen3.chat_template if qwen3 is not None else None
    if qwen3 is not None and template is not None:
        raw = tokenizers.Tokenizer.from_str(
            gzip.decompress((QWEN3_DIR / "tokenizer.json.gz").read_bytes()).decode("utf-8")
        )
        prompt = template.render(MESSAGES)
        prompt_tokens = len(qwen3.encode(prompt))

        raw_encode = per_call_us(lambda: raw.encode(prompt, add_special_tokens=False).ids, 2000)
        render = per_call_us(lambda: template.render(MESSAGES), 2000)
        ours = per_call_us(lambda: qwen3.encode(template.render(MESSAGES)), 2000)
        rows += [
            (
                f"Qwen3 raw tokenizers encode of the prompt ({prompt_tokens} tokens)",
                raw_encode,
                "baseline",
            ),
            ("Qwen3 chat template render only", render, f"{render / raw_encode:.2f}x"),
            ("Qwen3 chat template + encode (3 messages)", ours, f"{ours / raw_encode:.2f}x"),
        ]

        ids = qwen3.encode(COMPLETION)
        raw_decode = per_call_us(lambda: [raw.decode([i]) for i in ids], 20) / len(ids)
        incremental = per_call_us(lambda: detokenize_all(qwen3, ids), 20) / len(ids)
        rows += [
            (f"Qwen3 raw decode of one token (x{len(ids)})", raw_decode, "baseline"),
            (
                "Qwen3 incremental detokenizer, per token",
                incremental,
                f"{incremental / raw_decode:.2f}x",
            ),
        ]
    else:
        print(f"(Qwen3 tokenizer or template not found at {QWEN3_DIR}; Qwen3 rows skipped)\n")

    # A trailing comment renders nothing but keeps the template off ChatML's shortcut.
    sandboxed = ChatTemplate(CHATML_TEMPLATE + "{#- rendered by jinja2 #}")
    chatml = ChatTemplate.chatml()
    hello = [{"role": "user", "content": "hello"}]
    assert chatml.render(hello) == sandboxed.render(hello)
    jinja_render = per_call_us(lambda: sandboxed.render(hello), 5000)
    shortcut = per_call_us(lambda: chatml.render(hello), 5000)
    rows += [
        ("ChatML render of one message, by jinja2", jinja_render, "baseline"),
        ("ChatML render of one message", shortcut, f"{shortcut / jinja_render:.2f}x"),
    ]

    byte_tokenizer = ByteTokenizer()
    byte_ids = byte_tokenizer.encode(COMPLETION)
    byte_decode = per_call_us(lambda: [byte_tokenizer.decode([i]) for i in byte_ids], 20)
    byte_decode /= len(byte_ids)
    byte_incremental = per_call_us(lambda: detokenize_all(byte_tokenizer, byte_ids), 20)
    byte_incremental /= len(byte_ids)
    rows += [
        (f"ByteTokenizer decode of one token (x{len(byte_ids)})", byte_decode, "baseline"),
        (
            "ByteTokenizer incremental detokenizer, per token",
            byte_incremental,
            f"{byte_incremental / byte_decode:.2f}x",
        ),
    ]

    pieces = [COMPLETION[i : i + 4] for i in range(0, len(COMPLETION), 4)]

    def match_all() -> None:
        matcher = StopStringMatcher(["</answer>", "\n\nUser:", "STOP"])
        for piece in pieces:
            matcher.push(piece)
        matcher.flush()

    rows.append(
        (
            "StopStringMatcher, per 4-char piece (3 stop strings)",
            per_call_us(match_all, 20) / len(pieces),
            "",
        )
    )

    width = max(len(name) for name, _, _ in rows)
    print(f"{'case':<{width}}  {'us/op':>9}  {'vs baseline':>12}")
    print("-" * (width + 25))
    for name, micros, ratio in rows:
        print(f"{name:<{width}}  {micros:>9.2f}  {ratio:>12}")


if __name__ == "__main__":
    main()
