"""``tokmask serve``: a real uvicorn process on a loopback port, talked to with httpx; the batcher alone."""
import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

from tokmask_peft.inference import Classifier
from tokmask_peft.runs import TOKMASK_CONFIG, read_run_config, weight_record
from tokmask_peft.storage import write_json
from tokmask_peft.serving import AdapterPool, Batcher
from tokmask_peft.sweeps import sweep

TEXTS = ["the good movie really", "el perro malo", "nice day", "casa agua amigo dia sol muy"]
KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory, tiny_model, toy_data):
    """A sentiment sweep (rates 0, 0.3), a token-task sweep (rate 0) on the same base, and a run whose
    adapter weights are NaN (recorded as such, so it loads and fails only when it predicts)."""
    from tokmask_peft.config import Recipe

    out = tmp_path_factory.mktemp("served")
    for task, rates in (("sequence", [0.0, 0.3]), ("token", [0.0])):
        sweep(Recipe.from_dict({
            "model": {"name": tiny_model("qwen"), "task": task, "lora_r": 8, "lora_dropout": 0.0},
            "data": {"train": str(toy_data["train"]), "dev": str(toy_data["dev"]), "max_length": 16},
            "train": {"epochs": 2, "batch_size": 16, "lr": 1e-2, "output_dir": str(out / task)},
            "sweep": {"rates": rates, "seeds": [0]}}))
    broken = out / "broken"
    shutil.copytree(out / "sequence" / "mask_0.30" / "seed_0", broken)
    from safetensors.torch import load_file, save_file

    weights = load_file(broken / "adapter_model.safetensors")
    save_file({k: torch.full_like(v, float("nan")) for k, v in weights.items()}, broken / "adapter_model.safetensors")
    config = read_run_config(broken)
    write_json(broken / TOKMASK_CONFIG, {**config, "weights": weight_record(broken)})
    return {"sa": out / "sequence", "lid": out / "token", "broken": broken}


def start_server(specs: list[str], *options: str, env: dict | None = None):
    """``tokmask serve`` in its own process on a free loopback port; returns (process, base url)."""
    command = [sys.executable, "-m", "tokmask_peft.cli", "serve", *specs, "--port", "0", *options]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **(env or {})})
    line = process.stdout.readline()  # printed once the adapters are loaded and the port is bound
    match = re.search(r"listening on (http://\S+)", line)
    if not match:
        process.kill()
        raise AssertionError(f"server did not start: {line}{process.stderr.read()}")
    url = match.group(1)
    for _ in range(100):
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError("server never became healthy")


@pytest.fixture(scope="module")
def server(sweeps):
    specs = [f"sa={sweeps['sa']}", f"lid={sweeps['lid']}", f"broken={sweeps['broken']}"]
    process, url = start_server(specs, "--max-batch", "8", "--max-wait-ms", "50", "--max-inputs", "4",
                                "--max-body-bytes", "4096", "--read-timeout", "1", env={"TOKMASK_API_KEY": KEY})
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:
        yield client
    process.terminate()
    process.wait(timeout=30)


def batch_count(client) -> float:
    text = client.get("/metrics").text
    return float(re.search(r"^tokmask_batch_texts_count (\S+)$", text, re.M).group(1))


@pytest.mark.slow
def test_answers_equal_classifier_predict(server, sweeps):
    clf = Classifier.from_run(sweeps["sa"] / "mask_0.30" / "seed_0", device="cpu")
    response = server.post("/predict", json={"inputs": TEXTS, "adapter": "sa/mask_0.30"})
    assert response.status_code == 200 and response.headers["x-tokmask-adapter"] == "sa/mask_0.30"
    for got, want in zip(response.json(), clf.predict(TEXTS)):
        assert got[0]["label"] == want["label"]
        assert [g["score"] for g in got] == sorted((g["score"] for g in got), reverse=True)
        for item in got:
            assert item["score"] == pytest.approx(want["probs"][item["label"]], abs=1e-5)
    raw = server.post("/predict", json={"inputs": TEXTS[0], "adapter": "sa/mask_0.30", "raw_scores": True}).json()
    logits = clf.logits(TEXTS[:1])[0]
    assert {d["label"]: d["score"] for d in raw} == pytest.approx(dict(zip(clf.labels, logits.tolist())), abs=1e-4)

    lid = Classifier.from_run(sweeps["lid"] / "mask_0.00" / "seed_0", device="cpu")
    words = server.post("/predict", json={"inputs": TEXTS, "adapter": "lid"}).json()
    for got, want, text in zip(words, lid.predict(TEXTS), TEXTS):
        assert [w["word"] for w in got] == text.split() and [w["label"] for w in got] == want["labels"]


@pytest.mark.slow
def test_adapters_default_and_names(server, sweeps):
    listing = server.get("/adapters").json()
    by_name = {a["name"]: a for a in listing["adapters"]}
    assert set(by_name) == {"sa/mask_0.00", "sa/mask_0.30", "lid/mask_0.00", "broken"}  # a run is its NAME
    assert by_name["lid/mask_0.00"]["task"] == "token" and by_name["sa/mask_0.30"]["labels"] == ["negative", "positive"]
    # adapters of one base share it, the token tagger (its own head and labels) included
    assert len({a["base"] for a in by_name.values()}) == 1
    best = [a["name"] for a in listing["adapters"] if a["best_of_sweep"] and a["name"].startswith("sa/")]
    assert listing["default"] == best[0] and "weighted_f1" in by_name[best[0]]["dev"]
    single = server.post("/predict", json={"inputs": "nice day"})  # one string in, one list out
    assert single.headers["x-tokmask-adapter"] == listing["default"] and isinstance(single.json()[0], dict)
    assert server.post("/predict", json={"inputs": "nice day", "adapter": "sa"}).headers["x-tokmask-adapter"] == best[0]
    assert server.post("/predict", json={"inputs": ["x"], "adapter": 0.3}).status_code == 422  # two have 0.3
    assert server.post("/predict", json={"inputs": ["x"], "adapter": 0.7}).status_code == 404


@pytest.mark.slow
def test_concurrent_requests_get_their_own_adapters_answers(server):
    names = ["sa/mask_0.00", "sa/mask_0.30", "lid/mask_0.00"]
    expected = {(n, t): server.post("/predict", json={"inputs": t, "adapter": n}).json() for n in names for t in TEXTS}
    before = batch_count(server)

    async def hammer():
        async with httpx.AsyncClient(base_url=str(server.base_url), headers=AUTH, timeout=60) as client:
            jobs = [(n, t) for _ in range(4) for n in names for t in TEXTS]
            replies = await asyncio.gather(*(client.post("/predict", json={"inputs": t, "adapter": n})
                                             for n, t in jobs))
            return jobs, replies

    jobs, replies = asyncio.run(hammer())
    for (name, text), reply in zip(jobs, replies):
        assert reply.headers["x-tokmask-adapter"] == name
        got, want = reply.json(), expected[(name, text)]
        assert [g.get("label") for g in got] == [w.get("label") for w in want]
        assert [g["score"] for g in got] == pytest.approx([w["score"] for w in want], abs=1e-5)
    forward_passes = batch_count(server) - before
    assert forward_passes < len(jobs) / 2  # 48 single-text requests were grouped


@pytest.mark.slow
@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 422, '"inputs"'),
    (b'{"input": "typo"}', 422, '"inputs"'),
    (b'{"inputs": []}', 422, "non-empty list"),
    (b'{"inputs": ["fine", "  "]}', 422, "inputs[1] is empty"),
    (b'{"inputs": [["a", "b"]]}', 422, "trained on single texts, not pairs"),
    (b'{"inputs": [3]}', 422, "inputs[0]"),
    (b'{"inputs": "x", "adapter": "nope"}', 404, "no adapter 'nope'"),
    (b'{"inputs": "x", "adapter": [1]}', 422, "name or a masking rate"),
    (b'{"inputs": "x", "raw_scores": "yes"}', 422, "raw_scores"),
    (b'{"inputs": ["a", "b", "c", "d", "e"]}', 413, "limit is 4"),
    (json.dumps({"inputs": " ".join(["palabra"] * 40)}).encode(), 413, "max_length (16 tokens)"),
    (json.dumps({"inputs": "x" * 5000}).encode(), 413, "over the limit of 4096"),
    (b'{"inputs": ' + b"[" * 1000 + b"]" * 1000 + b"}", 400, "nested too deeply"),
    (b'{"inputs": ["fine", "\\ud800 lone"]}', 422, "inputs[1] is not valid Unicode"),
    (b'{"inputs": "x", "adapter": ' + b"9" * 400 + b"}", 422, "not a masking rate"),
])
def test_bad_requests_get_a_clear_4xx_and_the_server_goes_on(server, body, status, message):
    before = batch_count(server)
    response = server.post("/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert message in response.json()["error"] and response.json()["error_type"]
    assert batch_count(server) == before  # refused before the model
    assert server.post("/predict", json={"inputs": "nice day"}).status_code == 200


@pytest.mark.slow
def test_truncation_on_request_is_reported(server):
    long = " ".join(["palabra"] * 40)
    response = server.post("/predict", json={"inputs": ["nice day", long], "truncate": True})
    assert response.status_code == 200 and response.headers["x-tokmask-truncated"] == "1"
    words = server.post("/predict", json={"inputs": long, "adapter": "lid", "truncate": True}).json()
    assert len(words) == 40 and words[0]["label"] is not None and words[-1]["label"] is None


@pytest.mark.slow
def test_slow_clients_are_cut_off_and_others_are_served_meanwhile(server):
    """200 half-sent requests no longer stay open forever: unfinished headers are closed after
    --read-timeout (1 s here), an unfinished body is answered 408, and /health answers throughout."""
    host, port = server.base_url.host, server.base_url.port
    stalled_headers = [socket.create_connection((host, port)) for _ in range(20)]
    for s in stalled_headers:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")  # headers never finished
    stalled_body = socket.create_connection((host, port))
    stalled_body.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                         "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"inp".encode())
    assert server.get("/health").status_code == 200
    for s in [*stalled_headers, stalled_body]:
        s.settimeout(10)
    answer = b""
    while b"--read-timeout" not in answer and (chunk := stalled_body.recv(4096)):
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b"--read-timeout" in answer
    for s in stalled_headers:
        assert s.recv(4096) == b""  # closed by the server
        s.close()
    stalled_body.close()
    assert server.post("/predict", json={"inputs": "nice day"}).status_code == 200


@pytest.mark.slow
def test_model_error_is_500_and_the_next_request_works(server):
    response = server.post("/predict", json={"inputs": TEXTS, "adapter": "broken"})
    assert response.status_code == 500 and "non-finite" in response.json()["error"]
    assert server.post("/predict", json={"inputs": TEXTS, "adapter": "sa/mask_0.30"}).status_code == 200
    assert server.get("/health").status_code == 200


@pytest.mark.slow
def test_api_key_guards_every_route_but_health(server):
    url = str(server.base_url)
    before = batch_count(server)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        assert httpx.post(f"{url}/predict", json={"inputs": "x"}, headers=headers).status_code == 401
        assert httpx.get(f"{url}/adapters", headers=headers).status_code == 401
        assert httpx.get(f"{url}/metrics", headers=headers).status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200
    assert batch_count(server) == before  # the model was never reached
    metrics = server.get("/metrics").text
    assert 'tokmask_requests_total{route="/predict",status="401"} 3.0' in metrics


@pytest.mark.slow
def test_open_server_on_loopback_and_bad_command_lines(sweeps):
    process, url = start_server([str(sweeps["sa"] / "mask_0.00" / "seed_0")])
    try:
        reply = httpx.post(f"{url}/predict", json={"inputs": ["nice day"]})  # no key configured: open
        assert reply.status_code == 200 and reply.headers["x-tokmask-adapter"] == "mask_0.00"
    finally:
        process.terminate()
        process.wait(timeout=30)
    missing = subprocess.run([sys.executable, "-m", "tokmask_peft.cli", "serve", str(sweeps["sa"] / "nope")],
                             capture_output=True, text=True)
    assert missing.returncode == 1 and "no such run or sweep" in missing.stderr
    empty = subprocess.run([sys.executable, "-m", "tokmask_peft.cli", "serve", str(sweeps["sa"]), "--api-key", ""],
                           capture_output=True, text=True)
    assert empty.returncode == 1 and "the API key is empty" in empty.stderr  # not an open server


def test_pool_refuses_two_adapters_of_one_name(sweeps):
    with pytest.raises(ValueError, match="name them apart with NAME=PATH"):
        AdapterPool([f"a={sweeps['sa']}/mask_0.00/seed_0", f"a={sweeps['sa']}/mask_0.30/seed_0"], device="cpu")


def test_batcher_groups_by_adapter_and_isolates_failures():
    calls = []

    def forward(key, texts):
        calls.append((key, list(texts)))
        if key == "bad":
            raise RuntimeError("boom")
        return [f"{key}:{t}" for t in texts]

    async def scenario():
        batcher = Batcher(forward, max_batch=4, max_wait_s=0.05)
        batcher.start()
        jobs = [("a", [f"t{i}"]) for i in range(6)] + [("b", ["u0", "u1"]), ("bad", ["v"]), ("b", ["u2"])]
        results = await asyncio.gather(*(batcher.submit(k, t) for k, t in jobs), return_exceptions=True)
        await batcher.stop()
        return jobs, results

    jobs, results = asyncio.run(scenario())
    for (key, texts), result in zip(jobs, results):
        if key == "bad":
            assert isinstance(result, RuntimeError)
        else:
            assert result == [f"{key}:{t}" for t in texts]  # each request gets its own answers
    assert all(len(texts) <= 4 for _, texts in calls)
    assert [len(t) for k, t in calls if k == "a"] == [4, 2]  # six waiting singles: one full batch, then the rest
    assert [t for k, t in calls if k == "b"] == [["u0", "u1", "u2"]]


def test_a_batch_is_sorted_by_length_and_cut_by_the_token_budget():
    batcher = Batcher(lambda key, items: items, max_batch=4, max_wait_s=0, max_batch_tokens=20, length=len)
    items = ["x" * n for n in (3, 12, 2, 5, 4, 25, 5, 6)]
    passes = batcher.passes(items)
    assert sorted(i for p in passes for i in p) == list(range(len(items)))  # every input, once
    for p in passes:
        lengths = [len(items[i]) for i in p]
        assert lengths == sorted(lengths) and len(p) <= 4
        assert len(p) * max(lengths) <= 20 or len(p) == 1  # an input over the budget goes alone
    assert [[len(items[i]) for i in p] for p in passes] == [[2, 3, 4, 5], [5, 6], [12], [25]]


def test_parse_predict_accepts_tei_shapes_and_names_what_is_wrong():
    from tokmask_peft.server import parse_predict
    from tokmask_peft.serving import RequestError

    assert parse_predict(b'{"inputs": "hi"}', 4)[1:] == (["hi"], True)
    assert parse_predict(b'{"inputs": [["a"], "b"], "truncate": true}', 4)[1:] == (["a", "b"], False)
    for body, status, message in [(b"{", 400, "not valid JSON"), (b'{"text": "x"}', 422, '"inputs"'),
                                  (b'{"inputs": []}', 422, "non-empty list"), (b'{"inputs": [" "]}', 422, "empty"),
                                  (b'{"inputs": ["a", "b", "c"]}', 413, "limit is 2"),
                                  (b'{"inputs": "a", "raw_scores": 1}', 422, "raw_scores")]:
        with pytest.raises(RequestError, match=message) as raised:
            parse_predict(body, 2)
        assert raised.value.status == status


def test_guard_asks_for_the_key_everywhere_but_health_and_counts_requests():
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from tokmask_peft.server import Guard, Telemetry

    async def ok(request):
        return PlainTextResponse("ok")

    telemetry = Telemetry()
    app = Guard(Starlette(routes=[Route("/health", ok), Route("/adapters", ok)]), KEY, telemetry)
    client = TestClient(app)
    assert client.get("/health").status_code == 200
    refused = client.get("/adapters")
    assert refused.status_code == 401 and refused.json()["error_type"] == "Unauthorized"
    assert client.get("/adapters", headers={"Authorization": "bearer wrong"}).status_code == 401
    assert client.get("/adapters", headers=AUTH).status_code == 200
    assert telemetry.registry.get_sample_value("tokmask_requests_total", {"route": "/adapters", "status": "401"}) == 2


@pytest.mark.slow
def test_long_inputs_are_tokenised_off_the_event_loop(sweeps, monkeypatch):
    """One client's long texts must not stall the others: /health answers while they are tokenised."""
    import threading

    from starlette.testclient import TestClient

    import tokmask_peft.server as server_module
    from tokmask_peft.server import create_app

    real, started = server_module.prepare, threading.Event()

    def slow_prepare(served, texts):
        started.set()
        time.sleep(3)  # as a 1 MB text takes
        return real(served, texts)

    monkeypatch.setattr(server_module, "prepare", slow_prepare)
    with TestClient(create_app(AdapterPool([str(sweeps["sa"])]))) as client:
        slow = threading.Thread(target=client.post, args=("/predict",), kwargs={"json": {"inputs": "x " * 50}})
        slow.start()
        assert started.wait(30)
        began = time.perf_counter()
        assert client.get("/health").status_code == 200
        assert time.perf_counter() - began < 1.5
        slow.join()
        for path, method, status, kind in (("/nope", "GET", 404, "NotFound"), ("/health", "POST", 405,
                                                                                "MethodNotAllowed")):
            answer = client.request(method, path)  # the router's own answers, in the documented shape
            assert answer.status_code == status and answer.json()["error_type"] == kind, answer.text


def test_keys_are_checked_at_start():
    from tokmask_peft.server import check_api_key

    assert check_api_key(None) is None and check_api_key("s3cret") == "s3cret"
    for bad, message in (("", "empty"), ("  ", "empty"), ("clé", "ASCII")):
        with pytest.raises(ValueError, match=message):
            check_api_key(bad)
