"""Chat with a steered GGUF in llama.cpp (through llama-cpp-python): no control-vector flags.

    bake run recipes/quickstart.yaml -o out/cheerful.gguf          # the steering as bias tensors
    python examples/llama_cpp_chat.py out/cheerful.gguf "The bus was late again."
    python examples/llama_cpp_chat.py out/cheerful.gguf --compare SmolLM2-135M-Instruct.Q4_1.gguf

Needs `pip install -e ".[llama-cpp]"` (compiles llama.cpp). The same file runs in
llama-cli / llama-server / Ollama; see examples/README.md.
"""

import argparse

from llama_cpp import Llama


def reply(llm: Llama, prompt: str, tokens: int) -> str:
    """Greedy reply through the chat template stored in the GGUF."""
    out = llm.create_chat_completion(
        [{"role": "user", "content": prompt}], max_tokens=tokens, temperature=0.0, top_k=1, seed=0
    )
    return out["choices"][0]["message"]["content"].strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf", help="a steered .gguf (bake run ... -o OUT.gguf)")
    parser.add_argument("prompts", nargs="*", default=["Tell me about your day."])
    parser.add_argument("--compare", metavar="BASE_GGUF", help="also show the unsteered GGUF's reply")
    parser.add_argument("--tokens", type=int, default=40)
    args = parser.parse_args()

    models = {"steered": args.gguf} | ({"base": args.compare} if args.compare else {})
    llms = {name: Llama(model_path=path, n_ctx=512, seed=0, verbose=False) for name, path in models.items()}
    for prompt in args.prompts:
        print(f"> {prompt}")
        for name, llm in llms.items():
            print(f"[{name}] {reply(llm, prompt, args.tokens)}")
        print()


if __name__ == "__main__":
    main()
