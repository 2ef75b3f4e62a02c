#!/usr/bin/env python3
"""Drives `caldera serve` (SmolLM2-135M-Instruct, CPU backend, 4 slots) with the official
`openai` Python SDK: models, chat (plain and streamed), completions, a tool-call round
trip (the tool's result fed back), concurrent requests, and errors mapped to the SDK's
exception types. SmolLM2's tool skill is weak, so the protocol is checked, not the
model's choices.

Needs `pip install openai` and a built binary (`cargo build -p caldera`; CALDERA_BIN
overrides target/debug/caldera). Ends with "N passed, M failed"; exit code 1 on failure.
"""

import concurrent.futures
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve_harness  # noqa: E402

import openai  # noqa: E402

KEY = "sdk-test-key"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "The city"}},
                "required": ["city"],
            },
        },
    }
]
QUESTION = {"role": "user", "content": "What is the weather in Paris?"}

TESTS = []


def test(fn):
    TESTS.append(fn)
    return fn


@test
def models(c, srv):
    m = c.models.list()
    assert len(m.data) == 1 and m.data[0].id == "smollm2", m


@test
def chat_and_stream_agree(c, srv):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r = c.chat.completions.create(model="smollm2", messages=msgs, max_tokens=12, temperature=0)
    ch = r.choices[0]
    assert ch.message.role == "assistant" and ch.message.content, r
    assert ch.finish_reason in ("stop", "length"), r
    assert r.usage.prompt_tokens > 5 and 1 <= r.usage.completion_tokens <= 12, r.usage
    text = ""
    finish = None
    usage = None
    stream = c.chat.completions.create(
        model="smollm2",
        messages=msgs,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert text == ch.message.content, (text, ch.message.content)
    assert finish == ch.finish_reason
    assert usage and usage.completion_tokens == r.usage.completion_tokens


@test
def completions(c, srv):
    r = c.completions.create(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=8, temperature=0, stop=["7"])
    assert r.object == "text_completion" and "7" not in r.choices[0].text, r


@test
def tool_call_round_trip(c, srv):
    r = c.chat.completions.create(
        model="smollm2",
        messages=[QUESTION],
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=40,
        temperature=0,
    )
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls", r
    calls = ch.message.tool_calls
    assert calls and calls[0].type == "function" and calls[0].function.name == "get_weather", r
    assert calls[0].id.startswith("call_")
    assert isinstance(json.loads(calls[0].function.arguments), dict)
    assert "<tool_call>" not in (ch.message.content or "")
    # Feed the result back: the assistant turn with its calls, then the tool's answer.
    history = [
        QUESTION,
        ch.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": calls[0].id, "content": json.dumps({"temperature_c": 21, "sky": "sunny"})},
    ]
    r2 = c.chat.completions.create(model="smollm2", messages=history, tools=TOOLS, max_tokens=16, temperature=0)
    assert r2.choices[0].finish_reason in ("stop", "length", "tool_calls"), r2
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens


@test
def tool_call_streamed(c, srv):
    stream = c.chat.completions.create(
        model="smollm2",
        messages=[QUESTION],
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=40,
        temperature=0,
        stream=True,
    )
    calls = {}
    content = ""
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            d = choice.delta
            content += d.content or ""
            for tc in d.tool_calls or []:
                slot = calls.setdefault(tc.index, {"id": None, "name": "", "args": ""})
                if tc.id:
                    slot["id"] = tc.id
                if tc.function and tc.function.name:
                    slot["name"] += tc.function.name
                if tc.function and tc.function.arguments:
                    slot["args"] += tc.function.arguments
            finish = choice.finish_reason or finish
    assert finish == "tool_calls", finish
    assert calls[0]["name"] == "get_weather" and calls[0]["id"], calls
    assert isinstance(json.loads(calls[0]["args"]), dict), calls
    assert "<tool_call>" not in content, content


@test
def tool_choice_none_and_auto(c, srv):
    r = c.chat.completions.create(
        model="smollm2", messages=[QUESTION], tools=TOOLS, tool_choice="none", max_tokens=8, temperature=0
    )
    assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason != "tool_calls", r
    r = c.chat.completions.create(model="smollm2", messages=[QUESTION], tools=TOOLS, max_tokens=24, temperature=0)
    ch = r.choices[0]
    # Either answer is fine; the shape must be consistent.
    assert (ch.finish_reason == "tool_calls") == bool(ch.message.tool_calls), r


@test
def concurrent_requests(c, srv):
    def one(i):
        r = c.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": f"Count to {i + 3}."}],
            max_tokens=6,
            temperature=0,
        )
        return r.usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        done = list(ex.map(one, range(8)))
    assert all(1 <= n <= 6 for n in done), done
    slots = srv.get("/slots")
    assert len(slots) == 4 and sum(s["requests"] for s in slots) >= 8, slots


@test
def errors(c, srv):
    def expect(exc, code=None, **kw):
        args = dict(model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        args.update(kw)
        try:
            c.chat.completions.create(**args)
        except exc as e:
            if code:
                assert e.code == code, (e.code, e)
            return e
        raise AssertionError(f"no {exc.__name__} for {kw}")

    e = expect(openai.BadRequestError, temperature=5)
    assert e.status_code == 400 and e.param == "temperature", e
    expect(openai.BadRequestError, max_tokens=0)
    expect(openai.BadRequestError, messages=[])
    expect(openai.BadRequestError, tools=[{"type": "function", "function": {"name": "bad name"}}])
    expect(openai.BadRequestError, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    expect(
        openai.BadRequestError,
        code="context_length_exceeded",
        messages=[{"role": "user", "content": "word " * 3000}],
    )
    bad = openai.OpenAI(base_url=srv.base + "/v1", api_key="wrong", max_retries=0)
    try:
        bad.models.list()
        raise AssertionError("a wrong key was accepted")
    except openai.AuthenticationError:
        pass


def main():
    binary = serve_harness.default_binary()
    model = serve_harness.model_path()
    serve_harness.require(binary, "caldera binary (cargo build -p caldera)")
    serve_harness.require(model, "model (scripts/fetch-models.sh)")
    t0 = time.time()
    log = open(os.environ.get("CALDERA_SERVE_LOG", os.devnull), "w")
    srv = serve_harness.Server(
        binary, model, ["--slots", "4", "--ctx", "1024", "--alias", "smollm2"], api_key=KEY, log=log
    )
    client = openai.OpenAI(base_url=srv.base + "/v1", api_key=KEY, max_retries=0, timeout=120)
    passed = failed = 0
    try:
        for t in TESTS:
            t1 = time.time()
            try:
                t(client, srv)
                passed += 1
                print(f"ok   {t.__name__} ({time.time() - t1:.1f} s)")
            except Exception:
                failed += 1
                print(f"FAIL {t.__name__}")
                traceback.print_exc()
        slots = srv.get("/slots")
        if any(s["state"] != "idle" for s in slots):
            failed += 1
            print(f"FAIL slots left busy: {slots}")
    finally:
        code = srv.stop()
    if code not in (0, None):
        failed += 1
        print(f"FAIL caldera serve exited with {code} on SIGTERM")
    print(f"openai {openai.__version__}; {time.time() - t0:.1f} s in all")
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
