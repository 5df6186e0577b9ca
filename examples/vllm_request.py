"""Ask a baked model served by vLLM (or any OpenAI-compatible server) for a chat reply.

    vllm serve out/cheerful --served-model-name cheerful          # in another terminal
    python examples/vllm_request.py "The bus was late again."      # --url, --model to change

Standard library only, so it runs anywhere; the request is the plain
OpenAI chat-completions one, so the `openai` client works the same way.
"""

import argparse
import json
import urllib.request


def chat(url: str, model: str, prompt: str, tokens: int) -> str:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 0,
    }
    request = urllib.request.Request(
        url.rstrip("/") + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)["choices"][0]["message"]["content"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", default="Tell me about your day.")
    parser.add_argument("--url", default="http://localhost:8000")
    parser.add_argument(
        "--model", default="cheerful", help="the --served-model-name (default: the path given to vllm serve)"
    )
    parser.add_argument("--tokens", type=int, default=60)
    args = parser.parse_args()
    print(chat(args.url, args.model, args.prompt, args.tokens))
