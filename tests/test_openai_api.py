"""The OpenAI-compatible API, driven by the official ``openai`` client against a real server
serving the scripted checkpoint of ``djinn.testing.scripted`` (greedy output follows a script:
``hello world ...`` after ``assistant``, a Hermes tool call when tools are offered)."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest

from djinn.client import connect
from djinn.testing.scripted import CALL, TOOLS, build_model_dir
from tests.serving import serving_config, start_server


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("scripted"))


@pytest.fixture(scope="module")
def server(model_dir):
    srv = start_server(serving_config(model_dir), overrides=["tcp"], http_port=0)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def api(server, model_dir):
    return openai.OpenAI(base_url=server.http_url, api_key="unused", max_retries=0)


def native(server, inputs, n: int) -> list[int]:
    with connect(server.url("tcp")) as client, client.model().session() as session:
        return session.generate(inputs, max_new_tokens=n).tokens


def test_models_and_health(server, api, model_dir):
    assert [m.id for m in api.models.list().data] == [model_dir]
    with urllib.request.urlopen(server.http_url.removesuffix("/v1") + "/health") as resp:
        assert json.load(resp)["status"] == "ok"
    with urllib.request.urlopen(server.http_url.removesuffix("/v1") + "/metrics/vmu") as resp:
        assert json.load(resp)["model"] == model_dir
    with urllib.request.urlopen(server.http_url.removesuffix("/v1") + "/metrics") as resp:
        assert b"djinn_device_bytes" in resp.read()


def test_completion_equals_the_native_greedy_output(server, api, model_dir):
    out = api.completions.create(model=model_dir, prompt="the weather is", max_tokens=6, temperature=0)
    tokenizer = server.model.loaded.tokenizer
    expected = native(server, tokenizer("the weather is")["input_ids"], 6)
    assert out.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
    assert out.choices[0].text == "hello world hello world hello world"
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 6


def test_chat_equals_the_native_greedy_output(server, api, model_dir):
    messages = [{"role": "user", "content": "what is the weather in paris"}]
    out = api.chat.completions.create(model=model_dir, messages=messages, max_tokens=5, temperature=0)
    tokenizer = server.model.loaded.tokenizer
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = native(server, tokenizer(prompt, add_special_tokens=False)["input_ids"], 5)
    assert out.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    assert out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def test_streaming_equals_the_whole_response(api, model_dir):
    messages = [{"role": "user", "content": "hello"}]
    whole = api.chat.completions.create(model=model_dir, messages=messages, max_tokens=7, temperature=0)
    chunks = list(api.chat.completions.create(model=model_dir, messages=messages, max_tokens=7, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 7
    streamed = "".join(c.choices[0].text for c in api.completions.create(
        model=model_dir, prompt="the", max_tokens=4, temperature=0, stream=True))
    assert streamed == "hello world hello world"


def test_stop_strings_and_logprobs(api, model_dir):
    out = api.completions.create(model=model_dir, prompt="the", max_tokens=8, temperature=0, stop=["world hello"])
    assert out.choices[0].text == "hello "
    assert out.choices[0].finish_reason == "stop"
    out = api.chat.completions.create(model=model_dir, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                      temperature=0, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert [c.token for c in content] == ["hello", "world", "hello"]
    assert all(c.logprob <= 0 and c.top_logprobs[0].token == c.token for c in content)


def test_sampling_is_seeded(api, model_dir):
    def once() -> str:
        return api.completions.create(model=model_dir, prompt="the", max_tokens=6, temperature=1.5, top_p=0.9,
                                      seed=11).choices[0].text

    assert once() == once()


def test_a_second_turn_reuses_the_session_kv(server, api, model_dir):
    first = [{"role": "user", "content": "what is the weather"}]
    turn1 = api.chat.completions.create(model=model_dir, messages=first, max_tokens=4, temperature=0,
                                        extra_body={"djinn": {"session_id": "reuse"}})
    assert turn1.usage.prompt_tokens_details.cached_tokens == 0
    second = [*first, {"role": "assistant", "content": turn1.choices[0].message.content},
              {"role": "user", "content": "in paris"}]
    turn2 = api.chat.completions.create(model=model_dir, messages=second, max_tokens=4, temperature=0,
                                        extra_body={"djinn": {"session_id": "reuse"}})
    fresh = api.chat.completions.create(model=model_dir, messages=second, max_tokens=4, temperature=0)
    assert turn2.choices[0].message.content == fresh.choices[0].message.content
    assert turn2.usage.prompt_tokens_details.cached_tokens >= turn1.usage.prompt_tokens - 1
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0
    # a changed history is cut back to the common prefix, and the output stays exact
    edited = [{"role": "user", "content": "what is sunny"}]
    turn3 = api.chat.completions.create(model=model_dir, messages=edited, max_tokens=4, temperature=0,
                                        extra_body={"djinn": {"session_id": "reuse"}})
    fresh3 = api.chat.completions.create(model=model_dir, messages=edited, max_tokens=4, temperature=0)
    assert turn3.choices[0].message.content == fresh3.choices[0].message.content
    assert 0 < turn3.usage.prompt_tokens_details.cached_tokens < turn3.usage.prompt_tokens
    info = api.get("/djinn/sessions/reuse", cast_to=object)
    assert info["session_id"] == "reuse" and info["tokens"] == turn3.usage.prompt_tokens + 4 - 0


def test_phase_after_puts_the_session_in_io_wait(api, model_dir):
    api.completions.create(model=model_dir, prompt="the", max_tokens=2, temperature=0,
                           extra_body={"djinn": {"session_id": "phased", "phase_after": "IO_WAIT",
                                                 "expected_resume_s": 5.0}})
    assert api.get("/djinn/sessions/phased", cast_to=object)["phase"] == "IO_WAIT"
    api.post("/djinn/sessions/phased/phase", body={"phase": "COMPUTE"}, cast_to=object)
    assert api.get("/djinn/sessions/phased", cast_to=object)["phase"] == "COMPUTE"
    api.delete("/djinn/sessions/phased", cast_to=object)
    with pytest.raises(openai.NotFoundError):
        api.get("/djinn/sessions/phased", cast_to=object)


def test_a_tool_call_enters_io_wait_and_the_tool_result_resumes(server, api, model_dir):
    messages = [{"role": "user", "content": "what is the weather in paris"}]
    out = api.chat.completions.create(model=model_dir, messages=messages, tools=TOOLS, max_tokens=20,
                                      temperature=0, extra_headers={"X-Djinn-Session-Id": "agent"})
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "paris"}
    session = api.get("/djinn/sessions/agent", cast_to=object)
    assert session["phase"] == "IO_WAIT"
    kernel_session = server.call(lambda: next(s for s in server.kernel.sessions.values()
                                              if s.info.phase.value == "IO_WAIT"))
    assert kernel_session.info.expected_resume_at is None  # no duration of get_weather seen yet
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    again = api.chat.completions.create(model=model_dir, messages=messages, tools=TOOLS, max_tokens=20,
                                        temperature=0, extra_headers={"X-Djinn-Session-Id": "agent"})
    assert again.choices[0].finish_reason == "tool_calls"
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    # the second call's IO_WAIT carries the learned duration of get_weather as its hint
    assert server.call(lambda: kernel_session.info.phase.value) == "IO_WAIT"
    assert server.call(lambda: kernel_session.info.expected_resume_at) is not None
    streamed = list(api.chat.completions.create(model=model_dir, messages=messages[:1], tools=TOOLS,
                                                max_tokens=20, temperature=0, stream=True))
    calls = [tc for c in streamed if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls and calls[0].function.name == "get_weather"
    assert streamed[-1].choices[0].finish_reason == "tool_calls"


def test_bad_requests_get_error_objects_and_the_server_serves_on(server, api, model_dir):
    with pytest.raises(openai.NotFoundError) as info:
        api.completions.create(model="no-such-model", prompt="the", max_tokens=2)
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        api.completions.create(model=model_dir, prompt="the", max_tokens=2, n=2)
    assert info.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError):
        api.completions.create(model=model_dir, prompt=[1.5], max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        api.completions.create(model=model_dir, prompt="the", max_tokens=2, temperature=-1)
    with pytest.raises(openai.BadRequestError):
        api.chat.completions.create(model=model_dir, messages=[], max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        api.completions.create(model=model_dir, prompt="the", extra_body={"djinn": {"phase_after": "IOWAIT"}})
    request = urllib.request.Request(server.http_url + "/completions", data=b"{not json", method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(request)
    assert raw.value.code == 400 and "error" in json.load(raw.value)
    assert api.completions.create(model=model_dir, prompt="the", max_tokens=2, temperature=0).choices[0].text


def test_a_token_requires_a_bearer_header(model_dir):
    srv = start_server(serving_config(model_dir), overrides=["tcp"], http_port=0, token="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.http_url, api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=srv.http_url, api_key="s3cret", max_retries=0)
        assert good.models.list().data[0].id == model_dir
    finally:
        srv.stop()


def test_an_idle_session_expires(model_dir):
    import attrs

    config = serving_config(model_dir)
    config = attrs.evolve(config, server=attrs.evolve(config.server, http_session_ttl_s=0.2))
    srv = start_server(config, overrides=["tcp"], http_port=0)
    try:
        api = openai.OpenAI(base_url=srv.http_url, api_key="unused", max_retries=0)
        api.completions.create(model=model_dir, prompt="the", max_tokens=1,
                               extra_body={"djinn": {"session_id": "brief"}})
        deadline = __import__("time").monotonic() + 20
        while srv.call(lambda: len(srv.kernel.sessions)) and __import__("time").monotonic() < deadline:
            __import__("time").sleep(0.05)
        with pytest.raises(openai.NotFoundError):
            api.get("/djinn/sessions/brief", cast_to=object)
    finally:
        srv.stop()


def test_native_generate_stops_at_eos_unless_ignored_and_at_stop_strings(server):
    tokenizer = server.model.loaded.tokenizer
    prompt = tokenizer("what :")["input_ids"]
    eos = tokenizer.eos_token_id
    with connect(server.url("tcp")) as client, client.model().session() as session:
        out = session.generate(prompt, max_new_tokens=20)
        assert out.finish_reason == "stop" and out.tokens[-1] == eos and len(out.tokens) == len(CALL) + 3
        longer = client.model().session().generate(prompt, max_new_tokens=20, ignore_eos=True)
        assert longer.finish_reason == "length" and len(longer.tokens) == 20
        assert longer.tokens[: len(out.tokens)] == out.tokens
        text = client.model().session().generate("the", max_new_tokens=10, stop=["world"])
        assert text.finish_reason == "stop" and text.text.endswith("world") and len(text.tokens) == 2


def test_a_streamed_completion_of_a_model_without_a_tokenizer_carries_every_token_id():
    srv = start_server(serving_config("random:tiny-llama"), overrides=["tcp"], http_port=0)
    try:
        client = openai.OpenAI(base_url=srv.http_url, api_key="unused", max_retries=0)
        whole = client.completions.create(model="random:tiny-llama", prompt=[5, 6, 7], max_tokens=5, temperature=0)
        chunks = list(client.completions.create(model="random:tiny-llama", prompt=[5, 6, 7], max_tokens=5,
                                                temperature=0, stream=True))
        streamed = [t for c in chunks if c.choices for t in (c.choices[0].model_extra.get("token_ids") or [])]
        assert streamed == whole.choices[0].model_extra["token_ids"] == native(srv, [5, 6, 7], 5)
        assert sum(1 for c in chunks if c.choices and c.choices[0].model_extra.get("token_ids")) == 5
    finally:
        srv.stop()
