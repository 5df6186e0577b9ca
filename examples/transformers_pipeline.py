"""Talk to a baked checkpoint with a stock transformers pipeline: no bake import, no hooks.

    python examples/transformers_pipeline.py out/cheerful "The bus was late again."
    python examples/transformers_pipeline.py out/cheerful --compare HuggingFaceTB/SmolLM2-135M-Instruct
    python examples/transformers_pipeline.py out/fantasy --no-chat "The old man smiled and began to tell his story:"

The steering is a bias in the weights, so the folder loads like any model;
--compare shows the base model's reply to the same prompt beside it.
"""

import argparse

from transformers import pipeline


def reply(pipe, prompt: str, tokens: int, chat: bool) -> str:
    """Greedy reply: the assistant turn in chat mode, the continuation otherwise."""
    if chat:
        out = pipe([{"role": "user", "content": prompt}], max_new_tokens=tokens, do_sample=False)
        return out[0]["generated_text"][-1]["content"].strip()
    return pipe(prompt, max_new_tokens=tokens, do_sample=False, return_full_text=False)[0]["generated_text"].strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="baked output folder (or any model folder / Hub id)")
    parser.add_argument("prompts", nargs="*", default=["Tell me about your day."])
    parser.add_argument("--compare", metavar="BASE", help="also show this model's reply (the base)")
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--no-chat", dest="chat", action="store_false", help="plain continuation, no chat template")
    args = parser.parse_args()

    models = {"steered": pipeline("text-generation", model=args.model)}
    if args.compare:
        models["base"] = pipeline("text-generation", model=args.compare)
    for prompt in args.prompts:
        print(f"> {prompt}")
        for name, pipe in models.items():
            print(f"[{name}] {reply(pipe, prompt, args.tokens, args.chat)}")
        print()


if __name__ == "__main__":
    main()
