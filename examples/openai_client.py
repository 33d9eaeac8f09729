"""Talk to `llamahot serve` with nothing but the standard library (any OpenAI client works too).

    llamahot serve MODEL.gguf --hot-experts 44 --port 8000      # in one terminal
    python examples/openai_client.py "Write a haiku about caches" [--url http://127.0.0.1:8000/v1]
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.request


def chat(url: str, prompt: str, max_tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0.7}
    request = urllib.request.Request(f"{url}/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt")
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    try:
        reply = chat(args.url, args.prompt, args.max_tokens)
    except OSError as exc:
        print(f"could not reach {args.url} ({exc}); start a server with `llamahot serve MODEL.gguf`", file=sys.stderr)
        return 1
    print(reply["choices"][0]["message"]["content"])
    print(f"[{reply['usage']['completion_tokens']} tokens, model {reply['model']}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
