"""bake from Python, end to end: recipe -> vectors -> verified checkpoint -> a reply from it.

python examples/python_api.py                       # recipes/quickstart.yaml -> out/api-cheerful
python examples/python_api.py recipes/formal.yaml out/api-formal
"""

import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

import bake

recipe_path = sys.argv[1] if len(sys.argv) > 1 else "recipes/quickstart.yaml"
out = sys.argv[2] if len(sys.argv) > 2 else "out/api-cheerful"

recipe = bake.load_recipe(recipe_path)
vectors = bake.compute_vectors(recipe)  # mean-centred: mean(target) - mean(background), times the coefficient
for entry in vectors.meta["entries"]:
    print(
        f"vector {entry['name']}: layer {entry['layer']}, coefficient {entry['coefficient']}, "
        f"norm {entry['norm']:.2f} ({entry['relative_norm']:.3f} of the mean residual norm)"
    )

# Writes the checkpoint only if, reloaded from disk, it matches the hook-steered base.
result = bake.fold(
    recipe.model, vectors, out, force=True, verify=recipe.verify, base_model_id=recipe.base_model_id, recipe=recipe
)
print(f"verified: max |logit difference| {result.verification['max_abs_logit_diff']:.1e}, wrote {result.path}")

# The result is a plain checkpoint: stock transformers, no bake.
model = AutoModelForCausalLM.from_pretrained(out)
tokenizer = AutoTokenizer.from_pretrained(out)
prompt = recipe.preview.prompts[0]
if recipe.preview.chat and tokenizer.chat_template:
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
    )
else:
    inputs = tokenizer(prompt, return_tensors="pt")
ids = model.generate(**inputs, max_new_tokens=recipe.preview.tokens, do_sample=False)
print(f"> {prompt}\n{tokenizer.decode(ids[0, inputs['input_ids'].shape[1] :], skip_special_tokens=True).strip()}")
