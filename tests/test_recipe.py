"""The recipe schema, text sources and tokenization, on real files written to tmp_path."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from conftest import make_tokenizer

from bake.collection.texts import load_texts, tokenize
from bake.errors import BakeError
from bake.recipe import Background, ModelSample, Recipe, Steering, TextSource, load_recipe


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def _error(tmp_path: Path, text: str) -> str:
    """The BakeError message load_recipe gives for ``text``; it must be one line naming the file."""
    path = _write(tmp_path / "bad.yaml", text)
    with pytest.raises(BakeError) as info:
        load_recipe(path)
    msg = str(info.value)
    assert "\n" not in msg and "\r" not in msg, f"not a single line: {msg!r}"
    assert str(path) in msg or path.name in msg, f"message does not name the recipe: {msg!r}"
    return msg


# --- a valid recipe ---------------------------------------------------------------------------


def test_valid_recipe_parses_into_typed_objects_with_defaults(tmp_path):
    text = """
        model: some/model
        steering:
          - name: cheerful
            layer: 3
            target: data/happy.txt
          - name: calm.v2
            layer: 0
            site: resid_mid
            method: contrast
            coefficient: -2.5
            positive: ["the sun is bright"]
            negative: {file: neg.jsonl, field: text, limit: 3}
    """
    path = _write(tmp_path / "sub" / "r.yaml", text)
    recipe = load_recipe(path)

    assert isinstance(recipe, Recipe)
    assert recipe.model == "some/model"
    assert recipe.dtype == "auto"
    assert recipe.revision is None and recipe.base_model_id is None and recipe.output is None
    assert recipe.seed == 0 and recipe.max_tokens == 256
    # The default background is a model sample.
    assert isinstance(recipe.background, Background)
    assert isinstance(recipe.background.sample, ModelSample) and recipe.background.corpus is None
    assert recipe.background.sample.sequences == 128 and recipe.background.sample.tokens == 64
    assert len(recipe.verify.prompts) >= 1 and recipe.verify.tokens == 16 and recipe.verify.atol is None

    first, second = recipe.steering
    assert all(isinstance(s, Steering) for s in recipe.steering)
    assert (first.name, first.layer, first.method, first.site, first.coefficient) == (
        "cheerful",
        3,
        "mean-centred",
        "resid_post",
        1.0,
    )
    assert first.chat is False and first.background is None
    # Shorthand: a string is a file path.
    assert isinstance(first.target, TextSource)
    assert first.target.file == "data/happy.txt" and first.target.texts is None
    # An entry without its own background uses the recipe's.
    assert recipe.background_for(first) is recipe.background

    assert (second.name, second.layer, second.site, second.method, second.coefficient) == (
        "calm.v2",
        0,
        "resid_mid",
        "contrast",
        -2.5,
    )
    # Shorthand: a list is inline texts.
    assert second.positive.texts == ["the sun is bright"] and second.positive.file is None
    assert (second.negative.file, second.negative.field, second.negative.limit) == ("neg.jsonl", "text", 3)
    assert second.target is None

    # The text is kept verbatim and relative paths start at the recipe's folder.
    assert recipe.text == path.read_text()
    assert recipe.base_dir == path.resolve().parent
    assert recipe.resolve("data/happy.txt") == path.resolve().parent / "data" / "happy.txt"
    assert recipe.resolve(str(tmp_path / "abs.txt")) == tmp_path / "abs.txt"


def test_entry_background_and_corpus_shorthand(tmp_path):
    recipe = load_recipe(
        _write(
            tmp_path / "r.yaml",
            """
        model: m
        background: {corpus: bg.txt}
        steering:
          - name: a
            layer: 1
            target: [x]
            background: {sample: {sequences: 8, tokens: 12}}
          - name: b
            layer: 2
            target: [y]
    """,
        )
    )
    a, b = recipe.steering
    assert recipe.background.corpus.file == "bg.txt" and recipe.background.sample is None
    assert recipe.background_for(a).sample == ModelSample(sequences=8, tokens=12)
    assert recipe.background_for(b).corpus.file == "bg.txt"


# --- text sources ------------------------------------------------------------------------------


def _recipe_with(tmp_path: Path, target_yaml: str) -> Recipe:
    return load_recipe(
        _write(
            tmp_path / "recipes" / "r.yaml",
            f"""
        model: m
        steering:
          - name: a
            layer: 0
            target: {target_yaml}
    """,
        )
    )


def test_txt_source_one_text_per_line_blank_lines_skipped(tmp_path, monkeypatch):
    _write(tmp_path / "recipes" / "data" / "t.txt", "the happy dog\n\n   \n  a bright day  \nsad night\n")
    recipe = _recipe_with(tmp_path, "data/t.txt")
    monkeypatch.chdir(tmp_path)  # relative to the recipe's folder, not the working directory
    assert load_texts(recipe.steering[0].target, recipe) == ["the happy dog", "a bright day", "sad night"]


def test_jsonl_source_reads_field(tmp_path, monkeypatch):
    lines = [{"text": "the happy dog", "id": 1}, {"text": "a wonderful day", "other": "no"}, {"text": "sad night"}]
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "t.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    recipe = _recipe_with(tmp_path, "{file: t.jsonl, field: text}")
    monkeypatch.chdir(tmp_path)
    assert load_texts(recipe.steering[0].target, recipe) == ["the happy dog", "a wonderful day", "sad night"]


def test_csv_source_reads_column(tmp_path, monkeypatch):
    _write(
        tmp_path / "recipes" / "t.csv", 'id,body,label\n1,the happy dog,x\n2,"a day, very bright",y\n3,sad night,z\n'
    )
    recipe = _recipe_with(tmp_path, "{file: t.csv, column: body}")
    monkeypatch.chdir(tmp_path)
    assert load_texts(recipe.steering[0].target, recipe) == ["the happy dog", "a day, very bright", "sad night"]


def test_inline_texts_and_limit(tmp_path):
    recipe = _recipe_with(tmp_path, '["the happy dog", "", "a bright day", "sad night"]')
    assert load_texts(recipe.steering[0].target, recipe) == ["the happy dog", "a bright day", "sad night"]
    recipe = _recipe_with(tmp_path, '{texts: ["the happy dog", "", "a bright day", "sad night"], limit: 2}')
    assert load_texts(recipe.steering[0].target, recipe) == ["the happy dog", "a bright day"]


def test_limit_applies_to_files(tmp_path):
    _write(tmp_path / "recipes" / "t.txt", "one\n\ntwo\nthree\nfour\n")
    recipe = _recipe_with(tmp_path, "{file: t.txt, limit: 3}")
    assert load_texts(recipe.steering[0].target, recipe) == ["one", "two", "three"]


def test_absolute_path_is_used_as_is(tmp_path):
    data = _write(tmp_path / "elsewhere" / "t.txt", "the cat\n")
    recipe = _recipe_with(tmp_path, str(data))
    assert load_texts(recipe.steering[0].target, recipe) == ["the cat"]


@pytest.mark.parametrize(
    "name,content,source,needle",
    [
        ("missing.txt", None, {}, "not found"),
        ("t.csv", "a,b\n1,2\n", {"column": "body"}, "no column 'body'"),
        ("t.jsonl", '{"text": "ok"}\n{"text": \n', {"field": "text"}, "line 2 is not valid JSON"),
        ("t.jsonl", '{"text": "ok"}\n{"body": "x"}\n', {"field": "text"}, "line 2 has no field 'text'"),
    ],
)
def test_text_source_file_errors_are_one_line_bake_errors(tmp_path, name, content, source, needle):
    recipe = load_recipe(_write(tmp_path / "r.yaml", "model: m\nsteering: [{name: a, layer: 0, target: [x]}]\n"))
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(BakeError) as info:
        load_texts(TextSource(file=name, **source), recipe, what="steering.0.target")
    msg = str(info.value)
    assert needle in msg and "steering.0.target" in msg and str(tmp_path / name) in msg and "\n" not in msg


def test_csv_quoted_field_with_newline_keeps_it(tmp_path):
    (tmp_path / "t.csv").write_text('text\n"the happy\ndog"\nsad night\n', encoding="utf-8")
    texts = load_texts(TextSource(file=str(tmp_path / "t.csv"), column="text"))
    assert texts == ["the happy\ndog", "sad night"]


def test_csv_with_byte_order_mark(tmp_path):
    (tmp_path / "t.csv").write_bytes("text,label\nthe happy dog,1\nsad night,0\n".encode("utf-8-sig"))
    assert load_texts(TextSource(file=str(tmp_path / "t.csv"), column="text")) == ["the happy dog", "sad night"]


def test_jsonl_record_with_unicode_line_separator(tmp_path):
    records = [{"text": "the happy\u2028dog"}, {"text": "sad night"}]
    (tmp_path / "t.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
    )
    assert load_texts(TextSource(file=str(tmp_path / "t.jsonl"), field="text")) == ["the happy\u2028dog", "sad night"]


# --- errors name the field ----------------------------------------------------------------------

GOOD_ENTRY = "{name: a, layer: 1, target: [the dog]}"


@pytest.mark.parametrize(
    "text,path",
    [
        (f"model: m\nmodle: n\nsteering: [{GOOD_ENTRY}]\n", "modle"),
        ("model: m\nsteering:\n  - {name: a, layr: 1, layer: 1, target: [x]}\n", "steering.0.layr"),
        (
            f"model: m\nsteering:\n  - {GOOD_ENTRY}\n  - {{name: b, layer: 2, target: [x], coeficient: 2}}\n",
            "steering.1.coeficient",
        ),
        (
            "model: m\nsteering: [{name: a, layer: 1, target: {file: t.jsonl, field: text, feild: x}}]\n",
            "steering.0.target.feild",
        ),
        (
            f"model: m\nbackground: {{sample: {{sequencs: 3}}}}\nsteering: [{GOOD_ENTRY}]\n",
            "background.sample.sequencs",
        ),
        (f"model: m\nverify: {{tokns: 3}}\nsteering: [{GOOD_ENTRY}]\n", "verify.tokns"),
        (f"model: m\npreview: {{prompt: [x]}}\nsteering: [{GOOD_ENTRY}]\n", "preview.prompt"),
    ],
)
def test_unknown_field_is_named_with_its_dotted_path(tmp_path, text, path):
    msg = _error(tmp_path, text)
    assert f"{path}: unknown field" in msg


@pytest.mark.parametrize(
    "entry,path,needle",
    [
        ("{name: a, layer: 1, method: meen, target: [x]}", "steering.0.method", "mean-centred"),
        ("{name: a, layer: -1, target: [x]}", "steering.0.layer", "greater than or equal to 0"),
        ("{name: a, layer: 1.5, target: [x]}", "steering.0.layer", "integer"),
        ("{name: a, layer: 1, site: resid_pre, target: [x]}", "steering.0.site", "resid_post"),
        ("{name: a, layer: 1, target: t.jsonl}", "steering.0.target", "field"),
        ("{name: a, layer: 1, target: t.csv}", "steering.0.target", "column"),
        ("{name: a, layer: 1, target: t.json}", "steering.0.target", ".txt"),
        ("{name: a, layer: 1, target: {file: t.txt, texts: [x]}}", "steering.0.target", "exactly one"),
        (
            "{name: a, layer: 1, target: {texts: [x], limit: 0}}",
            "steering.0.target.limit",
            "greater than or equal to 1",
        ),
        ("{name: a, layer: 1}", "steering.0", "needs target"),
        ("{name: a, layer: 1, method: actadd, positive_prompt: happy}", "steering.0", "needs negative_prompt"),
        (
            "{name: a, layer: 1, method: actadd, positive_prompt: happy, negative_prompt: sad, target: [x]}",
            "steering.0",
            "does not use target",
        ),
        (
            "{name: a, layer: 1, method: contrast, positive: [a], negative: [b], target: [c]}",
            "steering.0",
            "does not use target",
        ),
        (
            "{name: a, layer: 1, method: mean, target: [c], background: {sample: {}}}",
            "steering.0",
            "does not use background",
        ),
        ("{name: a, layer: 1, method: contrast, positive: [a]}", "steering.0", "needs negative"),
        ("{name: a, layer: 1, coefficient: .nan, target: [x]}", "steering.0.coefficient", "finite"),
        ("{name: a, layer: 1, coefficient: .inf, target: [x]}", "steering.0.coefficient", "finite"),
        ("{name: a, layer: 1, coefficient: -.inf, target: [x]}", "steering.0.coefficient", "finite"),
        ("{name: 'a b', layer: 1, target: [x]}", "steering.0.name", "pattern"),
        ("{layer: 1, target: [x]}", "steering.0.name", "missing"),
    ],
)
def test_invalid_entry_error_names_the_field(tmp_path, entry, path, needle):
    msg = _error(tmp_path, f"model: m\nsteering:\n  - {entry}\n")
    assert f"{path}: " in msg, msg
    assert needle in msg, msg


def test_error_in_second_entry_names_its_index(tmp_path):
    msg = _error(tmp_path, f"model: m\nsteering:\n  - {GOOD_ENTRY}\n  - {{name: b, layer: -2, target: [x]}}\n")
    assert "steering.1.layer" in msg and "steering.0" not in msg


def test_duplicate_entry_names(tmp_path):
    msg = _error(
        tmp_path,
        "model: m\nsteering:\n  - {name: a, layer: 1, target: [x]}\n  - {name: b, layer: 2, target: [x]}\n"
        "  - {name: a, layer: 3, target: [y]}\n",
    )
    assert "unique" in msg and "repeated: a" in msg


@pytest.mark.parametrize(
    "text,needle",
    [
        ("steering: [{name: a, layer: 1, target: [x]}]\n", "model: required field is missing"),
        ("model: m\n", "steering: required field is missing"),
        ("model: m\nsteering: []\n", "steering: "),
        ("model: m\nsteering: abc\n", "steering: "),
        (f"model: m\ndtype: fp16\nsteering: [{GOOD_ENTRY}]\n", "dtype: "),
        (f"model: m\nbackground: {{}}\nsteering: [{GOOD_ENTRY}]\n", "background: give exactly one"),
        (f"model: m\nmax_tokens: 1\nsteering: [{GOOD_ENTRY}]\n", "max_tokens: "),
    ],
)
def test_top_level_errors_name_the_field(tmp_path, text, needle):
    assert needle in _error(tmp_path, text)


@pytest.mark.parametrize(
    "text", ["model: m\nsteering: [\n", "model: m\n  steering: a\n b: c\n", "model: m\n\tsteering: 1\n"]
)
def test_invalid_yaml(tmp_path, text):
    msg = _error(tmp_path, text)
    assert "not valid YAML" in msg and "line" in msg


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_not_a_mapping(tmp_path, text):
    assert "mapping" in _error(tmp_path, text)


def test_recipe_file_missing(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(BakeError) as info:
        load_recipe(path)
    msg = str(info.value)
    assert "not found" in msg and "nope.yaml" in msg and "\n" not in msg


def test_recipe_not_utf8(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"model: \xff\xfe\n")
    with pytest.raises(BakeError) as info:
        load_recipe(path)
    assert "cannot be read" in str(info.value) and "\n" not in str(info.value)


def test_several_problems_all_on_one_line(tmp_path):
    msg = _error(tmp_path, "modle: m\nsteering:\n  - {name: a, layer: -1, method: x, target: [x]}\n")
    for path in ("modle", "model", "steering.0.layer", "steering.0.method"):
        assert f"{path}: " in msg


def test_duplicate_yaml_key_is_an_error(tmp_path):
    msg = _error(
        tmp_path,
        "model: m\nsteering: [{name: a, layer: 1, target: [x]}]\nsteering: [{name: b, layer: 2, target: [y]}]\n",
    )
    assert "steering" in msg


def test_unknown_key_with_newline_still_one_line(tmp_path):
    _error(tmp_path, f'model: m\n"bad\\nkey": 1\nsteering: [{GOOD_ENTRY}]\n')


# --- tokenization ---------------------------------------------------------------------------------


def test_plain_tokenize_drops_first_position_and_special_tokens():
    tok = make_tokenizer()
    [ex] = tokenize(tok, ["the happy xyzzy dog"], max_tokens=256)
    assert tok.convert_ids_to_tokens(ex.input_ids) == ["<bos>", "the", "happy", "<unk>", "dog"]
    assert ex.counted == [False, True, True, False, True]
    assert ex.n_counted == 3
    [short] = tokenize(tok, ["the happy xyzzy dog"], max_tokens=3)
    assert short.input_ids == ex.input_ids[:3] and short.counted == [False, True, True]


def test_first_position_not_counted_without_bos():
    from tokenizers import processors

    tok = make_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    [one, two] = tokenize(tok, ["happy", "happy day"], max_tokens=256)
    assert one.input_ids == [tok.convert_tokens_to_ids("happy")] and one.counted == [False]
    assert two.counted == [False, True]


@pytest.mark.parametrize("reply", ["the happy dog is here", "tell me about your day", "yes <eos> the sun"])
def test_chat_counts_only_the_assistant_reply(reply):
    tok = make_tokenizer()
    special = set(tok.all_special_ids)
    prompt = "the happy dog is here"  # the same words in the prompt must not be counted
    [ex] = tokenize(tok, [reply], max_tokens=256, chat=True, chat_prompt=prompt)
    counted_ids = [t for t, c in zip(ex.input_ids, ex.counted) if c]
    reply_ids = tok(reply, add_special_tokens=False).input_ids
    assert counted_ids == [t for t in reply_ids if t not in special]
    assert not ex.counted[0]
    assert not any(c for t, c in zip(ex.input_ids, ex.counted) if t in special)
    # The counted tokens are the reply's own, at the end (before the closing <eos>), not the prompt's.
    n = len(reply_ids)
    assert ex.input_ids[-n - 1 : -1] == reply_ids
    assert ex.counted[: -n - 1] == [False] * (len(ex.input_ids) - n - 1)
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}], tokenize=False
    )
    assert ex.input_ids == tok(rendered, add_special_tokens=False).input_ids


def test_chat_with_a_template_that_opens_on_a_word_gets_no_start_token_unasked():
    """The reply's position in the rendered chat is not the ``start`` flag: a template that does not begin with a
    special token keeps its first word first (a stray start token would shift every position)."""
    tok = make_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    rendered = "user the dog assistant happy day "
    [plain] = tokenize(tok, ["happy day"], max_tokens=256, chat=True, chat_prompt="the dog")
    assert plain.input_ids == tok(rendered, add_special_tokens=False).input_ids
    reply = tok("happy day", add_special_tokens=False).input_ids
    assert [t for t, c in zip(plain.input_ids, plain.counted) if c] == reply
    [started] = tokenize(tok, ["happy day"], max_tokens=256, chat=True, chat_prompt="the dog", start=True)
    assert started.input_ids == [tok.bos_token_id, *plain.input_ids]


def test_chat_without_template_is_a_bake_error():
    tok = make_tokenizer()
    tok.chat_template = None
    with pytest.raises(BakeError) as info:
        tokenize(tok, ["the dog"], max_tokens=256, chat=True, chat_prompt="hi")
    assert "chat template" in str(info.value) and "\n" not in str(info.value)
