"""The Serve application over real HTTP: the official openai client, the native route, the
gate, and every bad input's 4xx. One Serve instance for the module on the shared Ray session."""

import json
import time
import urllib.error
import urllib.request

import pytest
from conftest import DEGENERATE_KEY

from bitlm import text_to_bits


def _post(url: str, body, raw: bool = False):
    data = body if raw else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_openai_completions_streamed_and_not_give_the_same_text(server):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["bitlm"]
    full = client.completions.create(model="bitlm", prompt="The quick", max_tokens=24, temperature=0.9, seed=5)
    chunks = list(
        client.completions.create(
            model="bitlm",
            prompt="The quick",
            max_tokens=24,
            temperature=0.9,
            seed=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert full.choices[0].text == streamed and len(full.choices[0].text) > 0
    assert full.usage.prompt_tokens == 9 and full.usage.completion_tokens == 24
    assert chunks[-1].usage.completion_tokens == 24 and chunks[-1].choices == []
    assert full.choices[0].finish_reason == "length"
    extra = full.model_extra["bitlm"]
    assert extra["gate"]["passed"] and 0 <= extra["telemetry"]["C"] <= 1 and extra["parity"]["ok"]


def test_openai_chat_streamed_and_not_give_the_same_text(server):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    messages = [{"role": "user", "content": "Say something about foxes."}]
    full = client.chat.completions.create(model="bitlm", messages=messages, max_tokens=20, temperature=0.7, seed=1)
    chunks = list(
        client.chat.completions.create(
            model="bitlm", messages=messages, max_tokens=20, temperature=0.7, seed=1, stream=True
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert full.choices[0].message.content == streamed and full.choices[0].message.role == "assistant"
    assert chunks[0].choices[0].delta.role == "assistant"


def test_gate_blocks_a_degenerate_output_with_content_filter(server):
    import openai

    client = openai.OpenAI(base_url=f"{server}/degenerate/v1", api_key=DEGENERATE_KEY)
    full = client.completions.create(model="degenerate", prompt="Hello", max_tokens=48, temperature=0.8, seed=0)
    assert full.choices[0].finish_reason == "content_filter" and full.choices[0].text == ""
    gate = full.model_extra["bitlm"]["gate"]
    assert not gate["passed"] and "C" in gate["failed"] and len(gate["attempts"]) == 2
    chunks = list(client.completions.create(model="degenerate", prompt="Hello", max_tokens=48, seed=0, stream=True))
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert "\x00" * 8 not in "".join(c.choices[0].text for c in chunks if c.choices)


def test_an_api_key_guards_every_route_but_health(server):
    """The /degenerate app runs with an API key: the official client without it (or with
    another) gets 401, health answers anyone, and a browser logs in once with ?key=."""
    import urllib.request

    import openai

    for key in ("wrong", ""):
        client = openai.OpenAI(base_url=f"{server}/degenerate/v1", api_key=key or "x", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            client.completions.create(model="degenerate", prompt="Hello", max_tokens=4)
        assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
    status, body = _post(f"{server}/degenerate/generate", {"text": "Hi", "max_new_bytes": 2})
    assert status == 401
    with urllib.request.urlopen(f"{server}/degenerate/health", timeout=30) as r:
        assert r.status == 200
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
    with opener.open(f"{server}/degenerate/?key={DEGENERATE_KEY}", timeout=30) as r:  # redirected, cookie set
        assert r.status == 200 and r.url == f"{server}/degenerate/" and "<html" in r.read().decode().lower()
    with opener.open(f"{server}/degenerate/v1/models", timeout=30) as r:
        assert r.status == 200
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="anything")  # the "bitlm" app takes no key
    assert client.models.list().data[0].id == "bitlm"


def test_generate_returns_text_bits_telemetry_and_parity(server):
    status, body = _post(f"{server}/generate", {"text": "The lazy", "max_new_bytes": 12, "seed": 2})
    assert status == 200
    assert len(body["bytes"]) == 12 and all(0 <= b[k] <= 1 for b in body["bytes"] for k in "KCS")
    assert body["parity"]["ok"] and len(body["bits"]) == 12 * 9
    assert body["gate"]["passed"] and body["text"]
    status, again = _post(f"{server}/generate", {"bits": text_to_bits("The lazy"), "max_new_bytes": 12, "seed": 2})
    assert status == 200 and again["text"] == body["text"]


@pytest.mark.parametrize(
    "route,body,status,needle",
    [
        ("/v1/completions", {"model": "bitlm", "prompt": "hi", "seed": True}, 400, "seed"),
        ("/v1/completions", {"model": "bitlm", "prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
        ("/v1/completions", {"model": "bitlm", "prompt": "hi", "temperature": 3}, 400, "temperature"),
        ("/v1/completions", {"model": "bitlm", "prompt": "hi", "top_p": 0}, 400, "top_p"),
        ("/v1/completions", {"model": "bitlm", "prompt": "hi", "max_tokens": 65}, 400, "max_tokens"),
        ("/v1/completions", {"model": "bitlm", "prompt": "x" * 300}, 413, "at most 256"),
        ("/v1/completions", {"model": "bitlm", "prompt": ""}, 400, "empty"),
        ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "does not exist"),
        ("/v1/completions", {"model": "bitlm", "prompt": ["a", "b"]}, 400, "prompt"),
        ("/v1/completions", {"prompt": "hi"}, 400, "model"),
        ("/v1/chat/completions", {"model": "bitlm", "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"model": "bitlm", "messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
        ("/generate", {"bits": [0, 1, 2]}, 400, "bits"),
        ("/generate", {"bits": [0] * 8 + [1]}, 400, "parity"),
        ("/generate", {}, 400, "exactly one"),
    ],
)
def test_bad_input_gets_a_4xx_with_a_message(server, route, body, status, needle):
    got, payload = _post(server + route, body)
    assert got == status
    assert needle in payload["error"]["message"]


@pytest.mark.parametrize(
    "body,needle",
    [
        ({"model": "bitlm", "prompt": "hi", "seed": 2**64}, "seed"),
        ({"model": "bitlm", "prompt": "hi", "seed": -(2**70)}, "seed"),
        ({"model": "bitlm", "prompt": "caf\udcff"}, "lone surrogate"),
        ({"model": "bitlm", "prompt": "hi", "stop": ["\ud800"]}, "lone surrogate"),
    ],
)
def test_numbers_out_of_range_and_strings_utf8_cannot_hold_are_400s(server, body, needle):
    raw = json.dumps(body).encode()  # json.dumps writes the lone surrogate as the escape "\udcff"
    status, payload = _post(f"{server}/v1/completions", raw, raw=True)
    assert status == 400 and needle in payload["error"]["message"], payload
    status, payload = _post(f"{server}/generate", json.dumps({"text": "caf\udcff"}).encode(), raw=True)
    assert status == 400 and "lone surrogate" in payload["error"]["message"]


def test_malformed_json_is_a_400(server):
    status, payload = _post(f"{server}/v1/completions", b'{"model": "bitlm", "prompt": ', raw=True)
    assert status == 400 and "malformed JSON" in payload["error"]["message"]


def test_concurrent_requests_decode_together_and_each_gets_its_own_answer(server):
    """Requests in flight at once share the replica's decoding steps (its /health says how many
    rows decoded together), and each answer is the one it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    bodies = [
        {"model": "bitlm", "prompt": "The quick", "max_tokens": 48, "temperature": 0.9, "seed": s} for s in range(6)
    ]

    def text(body):
        status, payload = _post(f"{server}/v1/completions", body)
        assert status == 200
        return payload["choices"][0]["text"]

    alone = [text(b) for b in bodies]
    seen = json.loads(urllib.request.urlopen(f"{server}/health").read())["batches"]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(text, bodies))
    health = json.loads(urllib.request.urlopen(f"{server}/health").read())
    assert together == alone
    assert max(health["batch_sizes"][seen - health["batches"] :]) >= 3 and health["rows_per_step"] > 1


def test_health_page_and_openapi(server):
    health = json.loads(urllib.request.urlopen(f"{server}/health").read())
    assert health["status"] == "ok" and health["quantization"] == "int8"
    page = urllib.request.urlopen(f"{server}/").read().decode()
    assert "<canvas" in page and "/v1/completions" in page and "https://" not in page  # no CDN: works offline
    spec = json.loads(urllib.request.urlopen(f"{server}/openapi.json").read())
    responses = spec["paths"]["/v1/completions"]["post"]["responses"]
    assert {"200", "400", "404", "413"} <= responses.keys()


def test_gate_thresholds_change_without_a_restart(server, checkpoints, tmp_path):
    """`serve deploy` of serve/config.yaml's form with new gate settings reconfigures the
    running replica (user_config) instead of replacing it."""
    import os
    import subprocess

    import ray
    import yaml

    root = __import__("pathlib").Path(__file__).resolve().parent.parent
    config = yaml.safe_load((root / "serve" / "config.yaml").read_text())
    app = config["applications"][0]
    app.update(name="reconf", route_prefix="/reconf")
    app["args"].update(checkpoint=str(checkpoints / "good"), model_name="reconf")
    dashboard = "http://" + ray._private.worker.global_worker.node.address_info["webui_url"]
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PYTHONPATH": str(root)}

    def deploy(gate: dict) -> None:
        app["deployments"][0]["user_config"] = {"gate": gate}
        path = tmp_path / "serve.yaml"
        path.write_text(yaml.safe_dump({"applications": [app]}))
        done = subprocess.run(
            [str(root / ".venv" / "bin" / "serve"), "deploy", str(path), "--address", dashboard],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=root,
        )
        assert done.returncode == 0, done.stdout + done.stderr

    def wait_running() -> dict:
        for _ in range(120):
            try:
                return json.loads(urllib.request.urlopen(f"{server}/reconf/health", timeout=5).read())
            except OSError:
                time.sleep(1)
        raise AssertionError("the reconf app never became healthy")

    open_gate = {"c_floor": 0.0, "s_floor": 0.0, "burn_in": 2, "max_retries": 0}
    try:
        _reconfigure(deploy, wait_running, server, open_gate)
    finally:
        from ray import serve

        serve.delete("reconf")  # its replicas hold CPUs that later tests' Ray Data tasks need


def _reconfigure(deploy, wait_running, server, open_gate) -> None:
    deploy(open_gate)
    before = wait_running()
    status, body = _post(f"{server}/reconf/generate", {"text": "The", "max_new_bytes": 24, "seed": 0})
    assert status == 200 and body["gate"]["passed"]
    deploy({**open_gate, "c_floor": 1.01})
    for _ in range(60):  # the new user_config reaches the replica asynchronously
        status, body = _post(f"{server}/reconf/generate", {"text": "The", "max_new_bytes": 24, "seed": 0})
        if not body["gate"]["passed"]:
            break
        time.sleep(1)
    assert body["finish_reason"] == "content_filter" and body["gate"]["c_floor"] == 1.01
    assert wait_running()["pid"] == before["pid"]  # the same replica process, reconfigured


def test_a_replica_killed_mid_stream_ends_the_stream_with_an_error_and_serve_recovers(server):
    """Kill the model replica while it streams: the client gets an error event (the official
    client raises it), never a stream that stops as if it had finished; Serve starts a new
    replica and later requests succeed. Last in the module: it takes the replica away."""
    import openai
    import ray

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)

    def replica():
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
        name = next(n for n in names if n.startswith("SERVE_REPLICA::bitlm#BitLMModel#"))
        return ray.get_actor(name, namespace="serve")

    outcomes = []
    for attempt in range(4):  # a kill can land after a short stream already finished: try again
        stream = client.completions.create(model="bitlm", prompt="The quick", max_tokens=64, seed=attempt, stream=True)
        chunks = iter(stream)
        next(chunks)
        ray.kill(replica(), no_restart=True)
        try:
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
            outcomes.append(("finished", finish))
        except openai.APIError as e:
            outcomes.append(("error", e.body.get("code") if isinstance(e.body, dict) else e.body))
        for _ in range(180):  # Serve restores the replica
            try:
                out = client.completions.create(model="bitlm", prompt="The", max_tokens=8, seed=0)
                break
            except openai.APIError:
                time.sleep(1)
        assert out.choices[0].finish_reason in ("length", "stop", "content_filter")
        if outcomes[-1][0] == "error":
            break
    assert ("error", "replica_failed") in outcomes, outcomes
    assert all(finish in ("length", "stop", "content_filter") for kind, finish in outcomes if kind == "finished")
