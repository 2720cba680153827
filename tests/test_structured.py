"""Structured output through the engine: every finished output follows its schema, choice or
JSON grammar, and an unconstrained sequence beside them is untouched."""

import json
import random

import jsonschema
import pytest

from vlm_core.engine.engine import EngineConfig
from vlm_core.engine.sampling import SamplingParams
from vlm_core.engine.structured import StructuredOutput
from vlm_core.errors import InputError

WORDS = ["red", "blue", "green", "circle", "square", "left", "right"]


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A JSON schema of objects, arrays, enums, integers, numbers, booleans and short strings."""
    kinds = ["enum", "integer", "boolean", "string", "number"] + (["object", "array"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "enum":
        return {"enum": rng.sample(WORDS, rng.randint(2, 4))}
    if kind == "integer":
        return {"type": "integer", "minimum": 0, "maximum": rng.choice([9, 99, 500])}
    if kind == "number":
        return {"type": "number", "minimum": -5, "maximum": 5}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 6)}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": 1, "maxItems": rng.randint(1, 3)}
    keys = rng.sample(["name", "kind", "count", "left", "size", "tags", "box"], rng.randint(1, 3))
    return {"type": "object", "properties": {k: random_schema(rng, depth + 1) for k in keys},
            "required": keys, "additionalProperties": False}


def schema_for(i: int) -> dict:
    rng = random.Random(i)
    keys = rng.sample(["answer", "colour", "shapes", "count", "where"], rng.randint(1, 3))
    return {"type": "object", "properties": {k: random_schema(rng) for k in keys}, "required": keys,
            "additionalProperties": False}


def test_thirty_schemas_beside_an_unconstrained_sequence(vlm, images):
    engine = vlm.engine(EngineConfig(num_blocks=512, max_num_seqs=32))
    free = vlm.request("Describe the image.", {"image": images[:1]}, SamplingParams(max_new_tokens=20,
                                                                                      ignore_eos=True))
    alone = vlm.generate(free).token_ids
    schemas = [schema_for(i) for i in range(30)]
    for i, schema in enumerate(schemas):
        params = SamplingParams(max_new_tokens=160, temperature=0.7, seed=i,
                                structured=StructuredOutput("json_schema", json.dumps(schema)))
        engine.add_request(f"s{i}", vlm.request("Describe the image as JSON.", {"image": images[:1]}, params))
    engine.add_request("free", free)
    got = engine.run_to_completion()
    assert [t for o in got["free"] for t in o.token_ids] == alone
    finished = 0
    for i, schema in enumerate(schemas):
        text = "".join(o.text for o in got[f"s{i}"])
        if got[f"s{i}"][-1].finish_reason == "stop":
            jsonschema.validate(json.loads(text), schema)
            finished += 1
        else:   # cut by max_new_tokens: still a prefix the grammar allowed
            assert text.startswith("{")
    assert finished == 30       # seeded: every one of them reaches its end here


def test_json_object_choice_and_regex(vlm, images):
    def run(kind, spec="", **kw):
        params = SamplingParams(max_new_tokens=80, temperature=0.8, seed=3, structured=StructuredOutput(kind, spec),
                                **kw)
        return vlm.generate(vlm.request("What colour is the circle?", {"image": images[:1]}, params))

    out = run("choice", json.dumps(["red", "green", "blue"]))
    assert out.text in ("red", "green", "blue") and out.finish_reason == "stop"
    out = run("regex", r"(yes|no), [0-9]{2}")
    assert out.finish_reason == "stop" and out.text[:2] in ("ye", "no") and out.text[-2:].isdigit()
    out = run("json_object")
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.text), dict)
    else:
        assert out.text.startswith("{")


def test_bad_specs_and_tokenizers_that_cannot_spell_json(vlm):
    req = vlm.request("Hi")
    with pytest.raises(InputError, match="cannot be compiled"):
        vlm.engine().add_request("x", type(req)(req.prompt, (), SamplingParams(
            structured=StructuredOutput("json_schema", "{not json"))))
    with pytest.raises(InputError, match="must be one of"):
        StructuredOutput("yaml", "")

    from vlm_core.default_model import default_model_dir
    from vlm_core.vlm import VLM

    word_level = VLM.from_pretrained(default_model_dir("awq"))
    r = word_level.request("Hi")
    with pytest.raises(InputError, match="cannot spell JSON"):
        word_level.engine().add_request("y", type(r)(r.prompt, (), SamplingParams(
            structured=StructuredOutput("json_object"))))


def test_a_grammar_the_vocabulary_cannot_spell_is_refused():
    """A regex of characters the default model's word-level vocabulary has no token for."""
    from vlm_core.default_model import default_model_dir
    from vlm_core.vlm import VLM

    word_level = VLM.from_pretrained(default_model_dir("awq"))
    r = word_level.request("Hi")
    with pytest.raises(InputError, match="allows no token"):
        word_level.engine().add_request("z", type(r)(r.prompt, (), SamplingParams(
            structured=StructuredOutput("regex", "h\x9a`\u00e4\\\\\u00d8"))))
    ok = word_level.generate(r, sampling=SamplingParams(max_new_tokens=4, structured=StructuredOutput(
        "choice", '["red", "blue"]')))
    assert ok.text in ("red", "blue")
