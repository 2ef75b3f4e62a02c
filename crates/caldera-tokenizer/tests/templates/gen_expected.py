"""Regenerates cases.json: inputs and the outputs Python jinja2 renders for them.

Oracle conventions follow transformers' apply_chat_template: ImmutableSandboxedEnvironment,
trim_blocks, lstrip_blocks, loopcontrols, a tojson filter that is json.dumps(ensure_ascii=False,
indent, separators, sort_keys), raise_exception, strftime_now, namespace; tools default to None.
Messages get the same normalisation as caldera (tool-call arguments strings parsed into objects,
reasoning aliases, text parts joined when the template does not iterate over content).
Only needed to author the test data: `python3 gen_expected.py` (jinja2 >= 3.1).
"""
import json, os, re
from datetime import datetime
import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

HERE = os.path.dirname(os.path.abspath(__file__))

def env():
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)
    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    e = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    e.filters["tojson"] = tojson
    e.globals["raise_exception"] = raise_exception
    e.globals["strftime_now"] = lambda f: datetime.now().strftime(f)
    return e

def iterates_content(src):
    for inner in re.findall(r"\{%(.*?)%\}", src, flags=re.S):
        inner = inner.strip("-+ \t\r\n")
        if inner.startswith("for "):
            c = re.sub(r"\s", "", inner)
            if any(p in c for p in ["inmessage['content']", 'inmessage["content"]', "inmessage.content"]) or c.endswith("incontent"):
                return True
    return False

def normalize(messages, iterates):
    out = []
    for m in messages:
        r = next((m[k] for k in ("reasoning_content", "thinking", "reasoning") if m.get(k) is not None), None)
        n = {"thinking": r} if r is not None else {}
        for k, v in m.items():
            if k == "content" and not iterates and isinstance(v, list):
                v = "\n".join(p["text"] for p in v)
            elif k == "tool_calls" and isinstance(v, list):
                v = json.loads(json.dumps(v))
                for c in v:
                    a = c.get("function", {}).get("arguments")
                    if isinstance(a, str):
                        try:
                            p = json.loads(a)
                            if isinstance(p, dict):
                                c["function"]["arguments"] = p
                        except ValueError:
                            pass
            elif k == "thinking" and r is not None:
                continue
            n[k] = v
        if r is not None:
            n["reasoning_content"] = r
        out.append(n)
    return out

TOKENS = {
    "smollm2": ("<|im_start|>", "<|im_end|>"),
    "qwen3": ("", "<|im_end|>"),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>"),
    "gemma3": ("<bos>", "<eos>"),
}

SYS_USER = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 2+2?"},
]
MULTI = [
    {"role": "user", "content": "Hi there!"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "  Tell me a joke about caf\u00e9s. "},
    {"role": "assistant", "content": "Why did the espresso file a report? It got mugged."},
    {"role": "user", "content": "Another, in \u65e5\u672c\u8a9e please \U0001F600"},
]
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city \u2014 \"quoted\" & <tagged>",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name, e.g. Z\u00fcrich"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7, "default": 1.0}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "search", "description": "Search the web",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}, "limit": {"type": "number", "default": 2.5e-7}}, "required": ["q"]}}},
]
WEATHER_ARGS = {"city": "Z\u00fcrich", "unit": "celsius", "days": 3, "threshold": 0.1, "big": 1e16, "nested": {"tags": ["a\tb", "\u00e9\n"], "ok": True, "none": None}}
QWEN_TOOLS_CONV = [
    {"role": "system", "content": "You are a weather bot."},
    {"role": "user", "content": "Weather in Z\u00fcrich and Paris?"},
    {"role": "assistant", "content": "", "reasoning_content": "Need two lookups.", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": WEATHER_ARGS}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21.5, \"sky\": \"clear\"}"},
    {"role": "tool", "tool_call_id": "call_2", "content": "{\"temp\": 18}"},
]
QWEN_TOOLS_CONV_STRARGS = json.loads(json.dumps(QWEN_TOOLS_CONV))
for c in QWEN_TOOLS_CONV_STRARGS[2]["tool_calls"]:
    c["function"]["arguments"] = json.dumps(c["function"]["arguments"])
LLAMA_TOOLS_CONV = [
    {"role": "system", "content": "You are a weather bot."},
    {"role": "user", "content": "Weather in Z\u00fcrich?"},
    {"role": "assistant", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": WEATHER_ARGS}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21.5}"},
]
QWEN_THINK = [
    {"role": "user", "content": "Solve x+1=3."},
    {"role": "assistant", "content": "<think>\nx = 3 - 1\n</think>\n\nx = 2."},
    {"role": "user", "content": "And x+2=5?"},
    {"role": "assistant", "content": "x = 3.", "reasoning_content": "5 - 2 = 3"},
]
GEMMA_PARTS = [
    {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "  Describe this image. "}]},
]
DATE = {"date_string": "26 Nov 2026"}

CASES = [
    ("smollm2", "system_user", SYS_USER, None, True, None),
    ("smollm2", "multi_turn", MULTI, None, True, None),
    ("smollm2", "no_generation_prompt", MULTI[:2], None, False, None),
    ("qwen3", "system_user", SYS_USER, None, True, None),
    ("qwen3", "multi_turn", MULTI, None, True, None),
    ("qwen3", "no_thinking", SYS_USER, None, True, {"enable_thinking": False}),
    ("qwen3", "thinking_history", QWEN_THINK, None, False, None),
    ("qwen3", "tools", QWEN_TOOLS_CONV, TOOLS, True, None),
    ("qwen3", "tools_string_arguments", QWEN_TOOLS_CONV_STRARGS, TOOLS, True, None),
    ("qwen3", "text_parts", [{"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]}], None, True, None),
    ("llama3", "system_user", SYS_USER, None, True, DATE),
    ("llama3", "multi_turn", MULTI, None, True, DATE),
    ("llama3", "tools", LLAMA_TOOLS_CONV, TOOLS, True, DATE),
    ("llama3", "tools_in_system", LLAMA_TOOLS_CONV, TOOLS, True, {"date_string": "01 Jan 2025", "tools_in_user_message": False}),
    ("llama3", "two_tool_calls_error", QWEN_TOOLS_CONV, TOOLS, True, DATE),
    ("gemma3", "system_user", SYS_USER, None, True, None),
    ("gemma3", "multi_turn", MULTI, None, True, None),
    ("gemma3", "content_parts", GEMMA_PARTS, None, True, None),
    ("gemma3", "roles_must_alternate", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], None, True, None),
]

# Inline templates exercising the Python-compatible surface.
FEATURES = r"""{%- set ns = namespace(users=0, found=none) -%}
{%- for m in messages -%}
{%- if m.role == 'user' %}{% set ns.users = ns.users + 1 %}{% endif -%}
{%- if m.content is string and m.content.startswith('  ') %}{% set ns.found = loop.index0 %}{% endif -%}
{%- endfor -%}
users={{ ns.users }} found={{ ns.found }} len={{ messages|length }}
{% for m in messages -%}
{% if loop.first %}[first]{% endif %}{{ loop.index0 }}:{{ m.role.upper() }}:{{ m.content.strip()|lower }}|{{ m.content|trim|title }}{% if loop.last %}[last]{% endif %}
{% endfor -%}
{% for m in messages %}{% if m.role == 'assistant' %}{% continue %}{% endif %}{% if loop.index0 > 3 %}{% break %}{% endif %}{{ m.role }};{% endfor %}
{{ messages|selectattr('role', 'equalto', 'user')|map(attribute='content')|join(' / ') }}
{{ (messages|map(attribute='role')|list)[::-1]|join(',') }} {{ 'abc'[::-1] }} {{ messages[-1].content[:5] }}
{{ ' x,y ,z '.split(',')|join('|') }} {{ 'a  b c'.split()|join('+') }} {{ '--x--'.lstrip('-') }}{{ '--x--'.rstrip('-') }}{{ '--x--'.strip('-') }}
{{ 'hello world'.replace('o', '0') }} {% if 'hello'.endswith('lo') and not 'hello'.startswith('x') %}yes{% endif %} {{ 'Hello World'.lower() }} {{ 'some title'.title() }}
{% for k, v in tool.items() %}{{ k }}={{ v|length }};{% endfor %} {{ tool.keys()|list|join(',') }} {{ tool.get('missing', 'dflt') }} {{ tool.get('type') }}
{% if undefined_thing is defined %}defined{% else %}undefined{% endif %} {% if tool is defined %}defined{% endif %} {% if enable_thinking is defined %}{{ enable_thinking|string|lower }}{% endif %}
{{ tool|tojson }}
{{ tool|tojson(indent=2) }}
{{ tool|tojson(sort_keys=true, ensure_ascii=true) }}
{{ tool|tojson(separators=(',', ':')) }}
{{ [1, 2.0, 1e-7, -0.5, 12345678901234567890, 1e22, [], {}, none, true, 'q"\\/\n\u0001\u007f'] | tojson }}
{{ [[], {}, [1, {"a": []}]]|tojson(indent=1) }}
{{ {"b": 1, "a": {"d": [1, 2], "c": "\u00fc"}}|tojson(indent='\t', sort_keys=true) }}
"""
INLINE_CASES = [
    ("features", FEATURES, MULTI, None, True, {"tool": TOOLS[0]["function"] | {"type": "function", "meta": {"w": 0.25, "u": "\u00e9\u4e2d\U0001F600"}}, "enable_thinking": True}),
]

def main():
    e = env()
    out = []
    all_cases = [(name, open(os.path.join(HERE, name + ".jinja")).read(), case, msgs, tools, gen, extra)
                 for (name, case, msgs, tools, gen, extra) in CASES]
    all_cases += [("inline", src, case, msgs, tools, gen, extra) for (case, src, msgs, tools, gen, extra) in INLINE_CASES]
    for (name, src, case, msgs, tools, gen, extra) in all_cases:
        bos, eos = TOKENS.get(name, ("<s>", "</s>"))
        t = e.from_string(src)
        kwargs = dict(messages=normalize(msgs, iterates_content(src)), tools=tools, documents=None,
                      add_generation_prompt=gen, bos_token=bos, eos_token=eos)
        kwargs.update(extra or {})
        entry = {"template": name, "case": case, "bos_token": bos, "eos_token": eos,
                 "messages": msgs, "tools": tools, "add_generation_prompt": gen, "extra": extra}
        if name == "inline":
            entry["source"] = src
        try:
            entry["expected"] = t.render(**kwargs)
        except jinja2.exceptions.TemplateError as err:
            entry["error"] = str(err)
        out.append(entry)
    with open(os.path.join(HERE, "cases.json"), "w") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(len(out), "cases")

if __name__ == "__main__":
    main()
