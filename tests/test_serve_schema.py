"""Schema-driven fuzzing of the endpoint: schemathesis reads the app's own OpenAPI schema (request
bodies included) and sends generated bodies, valid and invalid, to every operation in-process
(tiny demo model, few new tokens, a fixed seed and a bounded number of examples). No answer may
be a 5xx, every status must be one the schema documents for that route, and no stream may carry
an internal error."""

import dataclasses

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import status_code_conformance  # noqa: E402

from greencode.config import load_config  # noqa: E402
from greencode.serve import create_app, load_run  # noqa: E402
from greencode.serve.demo import build_demo_run  # noqa: E402
from greencode.utils import REPO_ROOT  # noqa: E402

SMOKE = REPO_ROOT / "configs" / "smoke.yaml"
EXAMPLES = 40  # per operation and mode


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    cfg = load_config(SMOKE, ["hardware.num_threads=1", "serve.max_new_tokens_cap=4", "serve.default_max_new_tokens=2",
                              "serve.max_request_bytes=16384"])
    cfg = dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, api_key=None))
    run = load_run(cfg, build_demo_run(cfg, tmp_path_factory.mktemp("schema_run"), p_exit=0.7))
    return create_app(cfg, model=run.model, tokenizer=run.tokenizer, policy=run.policy)


def no_internal_error_in_stream(ctx, response, case):
    """A stream answers 200 before it runs; a crash would then only show in-band."""
    assert "internal_error" not in response.text, response.text[-400:]


def test_the_schema_describes_the_request_bodies(app):
    schema = app.openapi()
    for path in ("/api/generate", "/generate", "/generate_stream", "/", "/models/{model_id}", "/v1/completions",
                 "/api/show"):
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        refs = [body] if "$ref" in body else body["anyOf"]
        for ref in refs:
            assert ref["$ref"].split("/")[-1] in schema["components"]["schemas"]
    oa = schema["components"]["schemas"]["OpenAIRequest"]
    assert {"prompt", "max_tokens", "logprobs", "stream", "stop"} <= set(oa["properties"]) and oa["required"] == [
        "prompt"]


def test_fuzzed_bodies_get_no_5xx_and_only_documented_statuses(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12
    statuses: dict[str, set] = {}
    for op in operations:
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if op.method.upper() == "POST" else [])
        for mode in modes:
            seen = statuses.setdefault(f"{op.label} {mode.value}", set())

            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case):
                response = case.call()
                seen.add(response.status_code)
                case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                                         no_internal_error_in_stream])

            check()
    # the fuzzer got past validation: generation routes answered real completions to valid bodies
    for label in ("POST /api/generate", "POST /generate", "POST /generate_stream", "POST /v1/completions"):
        assert 200 in statuses[f"{label} positive"], statuses
        assert statuses[f"{label} negative"] <= {400, 422}, statuses
