"""The registered sampling model under load, served by ``mlflow models serve`` on 127.0.0.1.

One small model (the debug preset, 40 steps on the session's tiny dataset) is registered in
the session's private MLflow store and served for the module; the helpers are the serving
benchmark's (benchmarks/bench_serve.py), so the benchmark's checks are tested too.
Request format (MLflow 3, ``mlflow/pyfunc/scoring_server/__init__.py``): a JSON object with
exactly one of ``inputs``, ``instances``, ``dataframe_split``, ``dataframe_records``, and an
optional ``params`` object; the answer is ``{"predictions": [...]}``.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import sample_checkpoint

from benchmarks.bench_serve import (
    PROMPTS,
    check_answer,
    invoke,
    listening_addresses,
    load,
    model_alphabet,
    request,
    serve,
    train_and_register,
)
from fundamentallm.mlflow_model import MAX_NEW_TOKENS, MAX_PROMPT_CHARS, MAX_PROMPTS, MAX_REQUEST_NEW_TOKENS

pytestmark = pytest.mark.reliability

MODEL_NAME = "serve-test"
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def served(tiny_dataset, mlflow_store, tmp_path_factory):
    import mlflow

    from fundamentallm.tracking import tracking_uri

    root = tmp_path_factory.mktemp("serve")
    model_uri = train_and_register(tiny_dataset, root / "run", MODEL_NAME, steps=40)
    best = root / "run" / "best.pt"
    assert model_uri == f"models:/{MODEL_NAME}@champion"
    mlflow.set_tracking_uri(tracking_uri())
    alphabet = model_alphabet(model_uri)
    with serve(model_uri, root / "server.log", tracking_uri=tracking_uri()) as server:
        yield server, best, alphabet
    # The server is gone once the block ends, whatever the tests did.
    assert server.process.poll() is not None
    assert listening_addresses(server.port) == []


def test_a_few_hundred_requests_from_8_threads_every_answer_checked(served):

    server, best, alphabet = served
    phase = load(server.port, 240, 8, NEW_TOKENS, alphabet)
    assert len(phase.latencies) == 240
    assert phase.problems == [], "\n".join(phase.problems[:20])
    # Every (prompt, seed) pair was asked several times and answered with one text each time.
    assert set(phase.texts) == {(p, s) for p in PROMPTS for s in range(5)}
    assert all(len(texts) == 1 for texts in phase.texts.values())
    # The seed matters: the answers are not one constant string.
    assert len({text for texts in phase.texts.values() for text in texts}) > len(PROMPTS)
    # The server answers what sampling the trained best checkpoint directly gives for the same request.
    for (prompt, seed), texts in list(phase.texts.items())[:6]:
        assert sample_checkpoint(best, [prompt], max_new_tokens=NEW_TOKENS, seed=seed) == list(texts)
    print(
        f"\n240 requests, 8 threads: {phase.requests_per_s:.1f} requests/s, p50 {phase.percentile(50) * 1000:.0f} ms, "
        f"p90 {phase.percentile(90) * 1000:.0f} ms, p99 {phase.percentile(99) * 1000:.0f} ms"
    )


def test_the_answer_check_rejects_wrong_answers():
    alphabet = frozenset("abc ")
    ok = json.dumps({"predictions": ["abc ", "cab "]})
    assert check_answer(200, ok, ["x", "y"], 4, alphabet) == ([], ["abc ", "cab "])
    wrong = [
        (500, ok, ["x", "y"]),  # not HTTP 200
        (200, "not json", ["x", "y"]),
        (200, json.dumps({"predictions": ["abc "]}), ["x", "y"]),  # one text for two prompts
        (200, json.dumps({"predictions": ["abc", "cab "]}), ["x", "y"]),  # three characters, not four
        (200, json.dumps({"predictions": ["abcd", "cab "]}), ["x", "y"]),  # "d" is not in the vocabulary
        (200, json.dumps({"predictions": [4, "cab "]}), ["x", "y"]),
    ]
    for status, body, prompts in wrong:
        assert check_answer(status, body, prompts, 4, alphabet)[0], body


def _body(inputs, **params) -> bytes:
    return json.dumps({"inputs": inputs, "params": params}).encode("utf-8")


BAD_REQUESTS = [
    ("too many prompts", _body(["the "] * (MAX_PROMPTS + 1)), f"{MAX_PROMPTS + 1} prompts in one request; at most 64"),
    (
        "a prompt one character too long",
        _body(["x" * (MAX_PROMPT_CHARS + 1)], max_new_tokens=4),
        f"prompt 0 has {MAX_PROMPT_CHARS + 1} characters; at most {MAX_PROMPT_CHARS}",
    ),
    (
        "a 4 MB prompt",
        _body(["the ", "a" * 4_000_000], max_new_tokens=4),
        f"prompt 1 has 4000000 characters; at most {MAX_PROMPT_CHARS}",
    ),
    (
        "max_new_tokens beyond the bound",
        _body(["the "], max_new_tokens=MAX_NEW_TOKENS + 1),
        f"max_new_tokens must be between 0 and {MAX_NEW_TOKENS}; got {MAX_NEW_TOKENS + 1}",
    ),
    (
        "max_new_tokens of a trillion",
        _body(["the "], max_new_tokens=10**12),
        f"max_new_tokens must be between 0 and {MAX_NEW_TOKENS}; got 1000000000000",
    ),
    (
        "too much to generate in one request",
        _body(["the "] * 3, max_new_tokens=MAX_NEW_TOKENS),
        f"3 prompts x {MAX_NEW_TOKENS} new characters is more than the {MAX_REQUEST_NEW_TOKENS} characters",
    ),
    ("negative max_new_tokens", _body(["the "], max_new_tokens=-1), "max_new_tokens must be between 0 and"),
    ("non-numeric max_new_tokens", _body(["the "], max_new_tokens="lots"), "'max_new_tokens'"),
    ("fractional max_new_tokens", _body(["the "], max_new_tokens=7.5), "'max_new_tokens'"),
    ("null max_new_tokens", _body(["the "], max_new_tokens=None), "max_new_tokens must be an integer; got None"),
    ("non-numeric temperature", _body(["the "], temperature="hot"), "'temperature'"),
    ("negative temperature", _body(["the "], temperature=-1), "temperature must not be negative"),
    ("underflowing temperature", _body(["the "], temperature=1e-300), "temperature must be 0 (greedy) or at least"),
    ("top_p of 0", _body(["the "], top_p=0), "top_p must be in (0, 1]"),
    ("a seed beyond 64 bits", _body(["the "], seed=2**70), "seed must be a 64-bit integer"),
    ("params not an object", json.dumps({"inputs": ["the "], "params": [1]}).encode(), "must be a dictionary"),
    ("malformed JSON", b'{"inputs": ["the "', "valid JSON"),
    ("not UTF-8", b'{"inputs": ["\xff"]}', "UnicodeDecodeError"),
    ("a JSON list", b'["the "]', "must be a JSON dictionary"),
    ("no inputs", json.dumps({"prompts": ["the "]}).encode(), "exactly one of the input fields"),
    ("no prompts", _body([], max_new_tokens=4), "missing inputs"),
]


def _refused(port: int, body: bytes) -> tuple[int, str]:
    # The request's own 120 s timeout is the hang guard: a server that started sampling a
    # trillion characters before refusing would not answer within it.
    return request(port, "POST", "/invocations", body)


@pytest.mark.parametrize(("case", "body", "message"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_a_bad_request_gets_a_4xx_that_says_what_is_wrong(served, case, body, message):
    server, _, alphabet = served
    status, text = _refused(server.port, body)
    assert 400 <= status < 500, (case, status, text[-2000:])
    error = json.loads(text)
    assert message in error["message"], (case, error["message"][-2000:])
    # The server carries on: the next good request is answered in full.
    status, text = invoke(server.port, ["the "], {"max_new_tokens": NEW_TOKENS, "seed": 1})
    assert check_answer(status, text, ["the "], NEW_TOKENS, alphabet)[0] == []
    assert server.process.poll() is None


def test_bad_and_good_requests_mixed_under_load(served):
    server, _, alphabet = served
    bad = [(body, message) for _, body, message in BAD_REQUESTS if len(body) < 100_000] * 2
    good = [([["the king"], ["and ", "the king"], ["x y z"]][i % 3], i % 4) for i in range(24)]

    def send_bad(item):
        body, message = item
        status, text = _refused(server.port, body)
        return 400 <= status < 500 and message in json.loads(text)["message"]

    def send_good(item):
        prompts, seed = item
        status, text = invoke(server.port, prompts, {"max_new_tokens": NEW_TOKENS, "seed": seed})
        return check_answer(status, text, prompts, NEW_TOKENS, alphabet)

    with ThreadPoolExecutor(8) as pool:
        bad_results = pool.map(send_bad, bad)
        good_results = pool.map(send_good, good)
        refused = list(bad_results)
        answered = list(good_results)
    assert all(refused), [message for (_, message), ok in zip(bad, refused, strict=True) if not ok]
    assert all(problems == [] for problems, _ in answered), answered
    texts: dict[tuple[str, int], set[str]] = {}
    for (prompts, seed), (_, predictions) in zip(good, answered, strict=True):
        for prompt, text in zip(prompts, predictions, strict=True):
            texts.setdefault((prompt, seed), set()).add(text)
    assert all(len(t) == 1 for t in texts.values()), texts


def test_an_unknown_parameter_is_ignored_not_obeyed(served):
    # MLflow drops parameters the signature does not declare (with a warning in the server log):
    # a client asking for a billion samples still gets one text per prompt.
    server, _, alphabet = served
    prompts = ["the ", "a "]
    status, text = invoke(server.port, prompts, {"max_new_tokens": NEW_TOKENS, "num_samples": 10**9})
    assert check_answer(status, text, prompts, NEW_TOKENS, alphabet)[0] == []


def test_the_server_listens_on_loopback_only(served):
    server, _, _ = served
    addresses = listening_addresses(server.port)
    assert addresses == ["0100007F"], addresses  # 127.0.0.1, little-endian hex as in /proc/net/tcp
