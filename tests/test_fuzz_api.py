"""Fuzzing the HTTP API on 127.0.0.1: schema-generated and malformed requests never get a 5xx, and it keeps serving.

Two parts, both against the live Ray Serve endpoint with the tiny llama backbone:
- hypothesis draws request bodies from the app's own OpenAPI schema (`/openapi.json`): each property is a
  value of its declared type (enums, `examples` as seeds) or any JSON value, properties are dropped or added;
- a seeded generator sends 1,000 malformed requests (random and non-UTF-8 bytes, truncated JSON, wrong
  types, lone surrogates, deep nesting, wrong methods and content types), then one valid request.
Both print their figures (`pytest -s`).
"""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collectors.build import build_database
from inference_workers.deployment import Limits, build_app, delete_app, run_app
from raee.spec import ModelSpec
from raee.tasks import Dataset, get_task
from tests.figures import report
from tests.fixtures_models import SENTENCES
from tests.fixtures_ray import ACTOR_CPUS, serve_config, tiny_llama_models

pytestmark = [pytest.mark.serve, pytest.mark.reliability]

APP, ROUTE = "raee-fuzz", "/fuzz"
LIMITS = Limits(max_batch_size=8, batch_wait_timeout_s=0.0, max_texts=4, max_text_chars=200)
TIMEOUT_S = 30
N_MALFORMED = 1000
N_SCHEMA_EXAMPLES = 80
VALID = {"task": "sst2", "texts": ["a gripping film .", "dull and slow ."]}


@pytest.fixture(scope="module")
def fuzz_url_reused(tmp_path_factory, serve_url_reused):
    """Base URL of an sst2-only app (tiny llama, Milvus Lite) under /fuzz on the session's Serve."""
    backbone, encoder = tiny_llama_models()
    uri = str(tmp_path_factory.mktemp("fuzz") / "exit.db")
    task = get_task("sst2")
    labels = np.random.default_rng(0).integers(0, 2, size=len(SENTENCES))
    summary = build_database(backbone, encoder, task, db_uri=uri,
                             dataset=Dataset(task, "train", tuple(SENTENCES), labels), show_progress=False)
    config = serve_config(uri, {task: summary.collection}, policy="raee", knobs={"k": 4, "tau": 0.6})
    run_app(build_app(ModelSpec(factory=tiny_llama_models), config, cpus_per_replica=ACTOR_CPUS, limits=LIMITS),
            name=APP, route_prefix=ROUTE)
    yield serve_url_reused + ROUTE
    delete_app(APP)


# ---- requests drawn from the OpenAPI schema ---------------------------------------------------------------

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
                           max_leaves=8)


def _resolve(schema: dict, components: dict) -> dict:
    while "$ref" in schema:
        schema = components[schema["$ref"].rsplit("/", 1)[1]]
    return schema


def from_schema(schema: dict, components: dict) -> st.SearchStrategy:
    """Values of a JSON schema's declared type (enums and `examples` included), bounded in size."""
    schema = _resolve(schema, components)
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "anyOf" in schema:
        return st.one_of([from_schema(s, components) for s in schema["anyOf"]])
    kind = schema.get("type")
    if kind == "string":
        seeds = [e for e in schema.get("examples", []) if isinstance(e, str)]
        text = st.text(max_size=250)
        return st.sampled_from(seeds) | text if seeds else text
    if kind == "array":
        seeds = [e for e in schema.get("examples", []) if isinstance(e, list)]
        items = st.lists(from_schema(schema.get("items", {}), components), max_size=6)
        return st.sampled_from(seeds) | items if seeds else items
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        return st.integers()
    if kind == "number":
        return st.floats(allow_nan=False)
    if kind == "object":
        return objects(schema, components)
    return JSON_VALUES


def objects(schema: dict, components: dict) -> st.SearchStrategy:
    """Objects of a schema: each property typed or any JSON value, some dropped, sometimes an extra one."""
    properties = schema.get("properties", {})

    @st.composite
    def draw(draw_) -> dict:
        body = {}
        for name, sub in properties.items():
            choice = draw_(st.sampled_from(["typed", "typed", "typed", "any", "missing"]))
            if choice == "typed":
                body[name] = draw_(from_schema(sub, components))
            elif choice == "any":
                body[name] = draw_(JSON_VALUES)
        if draw_(st.booleans()):
            body[draw_(st.text(max_size=8))] = draw_(JSON_VALUES)
        return body

    return draw()


@pytest.fixture(scope="module")
def classify_bodies_reused(fuzz_url_reused) -> st.SearchStrategy:
    """Request bodies for POST /v1/classify drawn from the served OpenAPI schema."""
    spec = requests.get(f"{fuzz_url_reused}/openapi.json", timeout=TIMEOUT_S).json()
    components = spec["components"]["schemas"]
    schema = spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert _resolve(schema, components)["required"] == ["task", "texts"]
    return from_schema(schema, components)


def test_schema_generated_requests_never_get_5xx(fuzz_url_reused, classify_bodies_reused):
    statuses: Counter[int] = Counter()
    session = requests.Session()

    @settings(max_examples=N_SCHEMA_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(body=classify_bodies_reused)
    def post(body: dict) -> None:
        reply = session.post(f"{fuzz_url_reused}/v1/classify", json=body, timeout=TIMEOUT_S)
        statuses[reply.status_code] += 1
        assert reply.status_code < 500, (body, reply.text)
        if reply.status_code == 200:
            assert len(reply.json()["predictions"]) == len(body["texts"])
        else:
            assert "detail" in reply.json()

    post()
    for path in ("/healthz", "/v1/tasks", "/openapi.json"):
        reply = session.get(f"{fuzz_url_reused}{path}", timeout=TIMEOUT_S)
        statuses[reply.status_code] += 1
        assert reply.status_code == 200, reply.text
    n_2xx = sum(n for s, n in statuses.items() if s < 300)
    n_4xx = sum(n for s, n in statuses.items() if 400 <= s < 500)
    report(f"schema fuzz: {sum(statuses.values())} requests, {n_2xx} 2xx, {n_4xx} 4xx, 0 5xx; "
          f"by status {dict(sorted(statuses.items()))}")
    assert n_2xx > 0 and n_4xx > 0  # both valid and invalid requests were tried


# ---- malformed requests -----------------------------------------------------------------------------------


def _malformed(rng: random.Random) -> tuple[str, str, bytes, str]:
    """(method, path, body, content type) of one malformed request."""
    valid = json.dumps(VALID).encode()
    kind = rng.randrange(12)
    path, method, ctype = "/v1/classify", "POST", "application/json"
    if kind == 0:  # random bytes, often not UTF-8
        body = rng.randbytes(rng.randrange(1, 200))
    elif kind == 1:  # valid JSON cut short
        body = valid[: rng.randrange(1, len(valid))]
    elif kind == 2:  # non-UTF-8 bytes inside a JSON string
        body = b'{"task": "sst2", "texts": ["caf' + rng.randbytes(3) + b'\xe9\xff"]}'
    elif kind == 3:  # a lone surrogate: valid JSON, not encodable text; in a text, the task, an invalid field
        body = rng.choice([b'{"task": "sst2", "texts": ["bad \\ud800 text"]}', b'{"task": "\\udfff", "texts": ["a"]}',
                           b'{"task": "sst2", "texts": "\\ud800"}',
                           b'{"task": "sst2", "texts": ["a"], "policy": "\\ud800"}'])
    elif kind == 4:  # wrong types
        body = json.dumps(rng.choice([
            {"task": 7, "texts": ["fine"]}, {"task": "sst2", "texts": [1, 2]}, {"task": "sst2", "texts": None},
            {"task": ["sst2"], "texts": "fine"}, {"task": "sst2", "texts": ["fine"], "explain": "maybe"},
            [VALID], "sst2", 3.5, None, {"task": "sst2", "texts": [{"text": "fine"}]},
        ])).encode()
    elif kind == 5:  # deep nesting
        depth = rng.choice([100, 1000, 5000])
        body = b'{"task": "sst2", "texts": ' + b"[" * depth + b"]" * depth + b"}"
    elif kind == 6:  # huge numbers, NaN, duplicate keys
        body = rng.choice([b'{"task": 1e999999, "texts": ["a"]}', b'{"task": NaN, "texts": ["a"]}',
                           b'{"task": "sst2", "task": "nope", "texts": ["a"]}', b"9" * 5000])
    elif kind == 7:  # wrong content type
        body, ctype = valid, rng.choice(["text/plain", "application/x-www-form-urlencoded", "application/xml", ""])
    elif kind == 8:  # wrong method
        body, method = valid, rng.choice(["GET", "PUT", "DELETE", "PATCH"])
    elif kind == 9:  # unknown path
        body, path = valid, rng.choice(["/v1/classify/x", "/v2/classify", "/%ff", "/v1/../../etc/passwd"])
    elif kind == 10:  # empty body
        body = b""
    else:  # a valid body with one character changed
        i = rng.randrange(len(valid))
        body = valid[:i] + bytes([rng.randrange(256)]) + valid[i + 1 :]
    return method, path, body, ctype


def test_malformed_requests_get_4xx_then_a_valid_one_succeeds(fuzz_url_reused):
    rng = random.Random(6)
    statuses: Counter[int] = Counter()
    failures = []
    session = requests.Session()
    for _ in range(N_MALFORMED):
        method, path, body, ctype = _malformed(rng)
        headers = {"content-type": ctype} if ctype else {}
        reply = session.request(method, f"{fuzz_url_reused}{path}", data=body, headers=headers, timeout=TIMEOUT_S)
        statuses[reply.status_code] += 1
        if reply.status_code >= 500:
            failures.append((method, path, body[:80], reply.status_code, reply.text[:200]))
    reply = session.post(f"{fuzz_url_reused}/v1/classify", json=VALID, timeout=TIMEOUT_S)
    n_4xx = sum(n for s, n in statuses.items() if 400 <= s < 500)
    n_5xx = sum(n for s, n in statuses.items() if s >= 500)
    n_2xx = sum(n for s, n in statuses.items() if s < 300)  # a changed character can leave the body valid
    report(f"malformed: {N_MALFORMED} requests sent, {n_4xx} 4xx, {n_5xx} 5xx, {n_2xx} 2xx; "
          f"by status {dict(sorted(statuses.items()))}; "
          f"then a valid request: {reply.status_code}")
    assert failures == []
    assert reply.status_code == 200, reply.text
    assert [p["label_word"] for p in reply.json()["predictions"]] and len(reply.json()["predictions"]) == 2
