# %% [markdown]
# # 02 — The chat template: from a conversation to tokens, and from tokens to tool calls
#
# A language model reads one flat sequence of token ids. A chat is a list of messages with roles,
# names, images, hidden reasoning and tool calls. The **chat template** flattens the one into the
# other, and it must do so *exactly* as during training: a single misplaced newline is a prompt the
# model has never seen. On the way back, the model's output ids must be cut into **reasoning**,
# **content** and **tool calls** again.
#
# Code: [kimi_ref/chat_template.py](../kimi_ref/chat_template.py) (messages → text / ids),
# [kimi_ref/tool_declarations.py](../kimi_ref/tool_declarations.py) (the TypeScript-style tool
# declarations) and [kimi_ref/tool_parsing.py](../kimi_ref/tool_parsing.py) (output → message, whole or
# streamed). Tests: [tests/test_chat_template.py](../tests/test_chat_template.py)
# renders Moonshot's genuine jinja templates with jinja2 and demands byte equality on generated
# conversations; [tests/test_tool_parsing.py](../tests/test_tool_parsing.py) proves the streaming parser
# equal to the whole-output parser for every way of cutting the stream.

# %%
import json

import matplotlib.pyplot as plt

from kimi_ref import chat_template, tool_parsing
from kimi_ref.chat_template import VARIANTS, render, render_ids, render_segments
from kimi_ref.tokenizer import Tokenizer
from kimi_ref.tool_declarations import encode_tools_ts
from kimi_ref.tool_parsing import StreamParser, parse
from show_code import show  # chapters/show_code.py: the current source of a function, with its file and lines

tok = Tokenizer.demo()  # the small shipped vocabulary; its special tokens sit where Kimi's do
print(VARIANTS)

# %% [markdown]
# ## One conversation, rendered
#
# Every message is `header + name + <|im_middle|> + body + <|im_end|>`, with **no newline between
# messages**. The header is `<|im_user|>`, `<|im_assistant|>` or, for everything else (system, tool,
# the tool declaration), `<|im_system|>`. The name is the message's `name` if it has one, else its role.
# Assistant turns open with a think block; tool results start with `## Return of {tool_call_id}`.

# %%
tools = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "City name."},
        "unit": {"enum": ["celsius", "fahrenheit"], "default": "celsius"}}}}}]

conversation = [
    {"role": "system", "content": "You are Kimi."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "reasoning_content": "A greeting. Greet back.", "content": "Hello! How can I help?"},
    {"role": "user", "content": [{"type": "text", "text": "Should I take an umbrella in Paris? "},
                                 {"type": "image_url", "image_url": {"url": "sky.png"}}]},
    {"role": "assistant", "reasoning_content": "I need the forecast.", "content": "",
     "tool_calls": [{"id": "functions.get_weather:0", "type": "function",
                     "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "functions.get_weather:0", "name": "get_weather",
     "content": '{"sky": "rain", "celsius": 11}'},
]
prompt = render(conversation, tools, variant="k2.5")
print(prompt.replace("<|im_end|>", "<|im_end|>\n"))  # newlines added here for reading only

# %% [markdown]
# The tool declaration is not JSON but **TypeScript**: K2.5 and later were trained on tools written
# as a `namespace functions { type name = (_: {...}) => any; }` block, with descriptions and
# constraints as `//` comments, required parameters first and optional ones marked `?`. The
# declaration is its own file, `kimi_ref.tool_declarations`; its entry point sorts every dict's keys
# first (as HF does, so the same tools in another key order give the same prompt bytes) and declares
# each function:

# %%
show(encode_tools_ts)
print(encode_tools_ts(tools))

# %% [markdown]
# ## Tokens, coloured by who wrote them
#
# `render_segments` returns the same prompt as pieces: each is a control token or text, tagged with
# the part of the prompt it belongs to. `render_ids` encodes text with special tokens **disallowed**,
# so a user who types `<|im_end|>` gets those characters, never the end of their turn; the control
# tokens become their ids directly.

# %%
ROLE_COLOURS = {"tool_declare": "tab:purple", "system": "tab:gray", "user": "tab:blue",
                "assistant": "tab:orange", "tool": "tab:green", "generation": "tab:red"}
segments = render_segments(conversation, tools, variant="k2.5")
token_roles = []
for segment in segments:
    n = 1 if segment.is_control else len(tok.encode(segment.text))
    token_roles += [(segment.role, segment.is_control)] * n
ids = render_ids(conversation, tok, tools, variant="k2.5")
assert len(ids) == len(token_roles) and tok.decode(ids) == prompt

width = 48
fig, ax = plt.subplots(figsize=(10, 0.22 * (len(token_roles) // width + 2)))
for k, (role, control) in enumerate(token_roles):
    ax.add_patch(plt.Rectangle((k % width, -(k // width)), 0.95, 0.9, color=ROLE_COLOURS[role],
                               alpha=1.0 if control else 0.45))
ax.set_xlim(0, width)
ax.set_ylim(-(len(token_roles) // width) - 0.2, 1)
ax.axis("off")
ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c, label=r) for r, c in ROLE_COLOURS.items()],
          ncol=6, loc="upper center", bbox_to_anchor=(0.5, 0), fontsize=8)
ax.set_title(f"{len(ids)} prompt tokens, one square each (dark: control tokens)")
plt.show()

# %% [markdown]
# ## History drops reasoning; K2.7-Code keeps it
#
# K2.5 splits the conversation at the **last assistant message without tool calls**. Everything up to
# it is *history*, and there every assistant is shown as `<think></think>` + content: the reasoning is
# gone. Only the turn still in progress (tool calls and their results after that point) keeps
# `<think>{reasoning}</think>`, because the model needs it to carry on. That keeps long chats short,
# but it also means the prompt of turn n+1 is **not** an extension of the prompt of turn n (the
# reasoning disappears from the middle), so a KV-prefix cache cannot be reused.
#
# K2.6 added `preserve_thinking=True`, which skips the split; **K2.7-Code always preserves**: a coding
# agent's earlier reasoning (why it edited that file) is context it needs, and the prompt grows
# append-only, so every turn reuses the cache of the one before. The split is one index, and one
# condition on it when an assistant message is written:

# %%
show(chat_template._last_assistant_without_tool_calls)
show(chat_template._render_thinking_family)

# %%
for variant, kwargs in [("k2.5", {}), ("k2.6", {"preserve_thinking": True}), ("k2.7-code", {})]:
    text = render(conversation, tools, variant=variant, **kwargs)
    print(f"{variant:10s} {kwargs!s:28s} keeps 'Greet back': {'Greet back' in text}")


# %%
def chat(turns):
    """A conversation of ``turns`` user/assistant exchanges, each answer with 40 words of reasoning."""
    messages = []
    for t in range(turns):
        messages += [{"role": "user", "content": f"Question {t}: what is {t} squared?"},
                     {"role": "assistant", "reasoning_content": " ".join(["think"] * 40),
                      "content": f"{t * t}"}]
    return messages


turns = range(1, 13)
k25 = [len(render_ids(chat(t), tok, variant="k2.5")) for t in turns]
k27 = [len(render_ids(chat(t), tok, variant="k2.7-code")) for t in turns]


def history_ids(t, variant):
    return render_ids(chat(t), tok, variant=variant, add_generation_prompt=False)


for variant in ("k2.5", "k2.7-code"):
    append_only = all(history_ids(t + 1, variant)[:len(history_ids(t, variant))] == history_ids(t, variant)
                      for t in range(1, 4))
    print(f"{variant}: the prompt of turn t is a prefix of turn t+1 (KV cache reusable): {append_only}")
plt.figure(figsize=(6, 3.5))
plt.plot(turns, k25, "o-", label="k2.5: history drops reasoning")
plt.plot(turns, k27, "s-", label="k2.7-code: reasoning preserved")
plt.xlabel("turns so far")
plt.ylabel("prompt tokens")
plt.legend()
plt.title("Prompt length as a chat goes on")
plt.show()

# %% [markdown]
# ## Anatomy of a tool call
#
# The model answers a tool request with its own control tokens (sources §10):
#
# ```
# <|tool_calls_section_begin|>
#   <|tool_call_begin|> functions.get_weather:0 <|tool_call_argument_begin|> {"city": "Paris"} <|tool_call_end|>
# <|tool_calls_section_end|>
# ```
#
# The id `functions.{name}:{index}` is kept verbatim (the tool result must quote it back); the name
# is the id minus `functions.` and minus the last `:index`. The arguments are returned raw, flagged
# when they are not valid JSON.

# %%
show(tool_parsing.function_name)

# %% [markdown]
# Here is an output the model could write after our prompt (which
# ended in `<think>`, so the output starts *inside* the reasoning):

# %%
output = ("Rain is likely; an umbrella is wise. Let me also check the wind.</think>"
          "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:1<|tool_call_argument_begin|>"
          '{"city": "Paris", "unit": "celsius"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>')
output_ids = tok.encode(output, allow_special=True)
message = parse(output_ids, tok)
print(json.dumps(message, indent=1, ensure_ascii=False))

# %% [markdown]
# On ids, only real special-token ids are markers. A JSON string that contains the *characters*
# `<|tool_call_end|>` arrives as ordinary text tokens, so it cannot end the call early — something a
# parser of the decoded text cannot tell apart:

# %%
tricky_args = '{"note": "type <|tool_call_end|> to stop"}'
tricky = ([tok.special_id("</think>"), tok.special_id("<|tool_calls_section_begin|>"),
           tok.special_id("<|tool_call_begin|>")] + tok.encode("functions.echo:0")
          + [tok.special_id("<|tool_call_argument_begin|>")] + tok.encode(tricky_args)
          + [tok.special_id("<|tool_call_end|>"), tok.special_id("<|tool_calls_section_end|>")])
print("from ids: ", parse(tricky, tok)["tool_calls"][0]["function"]["arguments"])
print("from text:", parse(tok.decode(tricky))["tool_calls"][0]["function"]["arguments"])

# %% [markdown]
# The parsed message goes straight back into the next prompt: `render(parse(output))` reproduces
# the assistant turn the model wrote, token for token (a property test checks this).

# %%
full = render_ids(conversation + [message], tok, tools, variant="k2.7-code", add_generation_prompt=False)
again = render_ids(conversation, tok, tools, variant="k2.7-code") + output_ids
print("round trip exact:", full == again)

# %% [markdown]
# ## Parsing a stream
#
# A chat UI shows reasoning and answer while they are generated. `StreamParser.feed` takes each new
# chunk (ids or text) and returns the deltas it has made certain: reasoning text, content text, "a
# tool call started (id, name)", argument fragments. Text that *might* be the start of a marker
# (`"<|tool_ca"`) is held back until the next chunk decides. Whatever the cut, the deltas add up to
# `parse` of the whole.

# %%
parser = StreamParser(tok)
timeline = []
for position, token in enumerate(output_ids):
    for delta in parser.feed([token]):
        timeline.append((position, delta["type"], len(delta.get("text", "")) or 1))
parser.finish()
assert {k: parser.result()[k] for k in ("reasoning_content", "content", "tool_calls")} == \
       {k: message[k] for k in ("reasoning_content", "content", "tool_calls")}

colours = {"reasoning": "tab:orange", "content": "tab:blue", "tool_call": "tab:red", "arguments": "tab:green"}
plt.figure(figsize=(8, 2.6))
for kind, colour in colours.items():
    points = [(p, n) for p, k, n in timeline if k == kind]
    if points:
        plt.bar([p for p, _ in points], [n for _, n in points], color=colour, label=kind, width=0.8)
plt.xlabel("output token fed")
plt.ylabel("characters emitted")
plt.legend(fontsize=8)
plt.title("What each streamed token releases")
plt.show()

# %% [markdown]
# ## Which template? The checkpoint decides
#
# Five variants, five different prompts for the same conversation: the chat must use the one the
# model was trained on, and it asks the checkpoint, never a default
# ([which file decides what](../docs/checkpoint_format.md#which-file-decides-what)). A real checkpoint
# ships its template as `chat_template.jinja`; a few markers in it name the variant
# (`kimi_ref.checkpoint_chat.fingerprint`). kimi-nano ships no template (kimi_ref does not redistribute
# Moonshot's), so its `tokenizer_config.json` records the variant it was trained with.

# %%
from kimi_ref.chat import default_checkpoint
from kimi_ref.checkpoint_chat import chat_setup, fingerprint
from kimi_ref.template_proof import SUITE, describe_difference

for markers in ["<|im_middle|><|im_end|>", "<|im_middle|><|im_end|><think>",
                "<|im_middle|><|im_end|><think>{{ tools_ts_str }}"]:
    print(f"{markers!r:50s} -> {fingerprint(markers)[0]}")
print(chat_setup(default_checkpoint()).describe())

# %% [markdown]
# When a checkpoint does ship its template, kimi_ref does not take its own word for it: before the
# model loads, it renders a suite of conversations (below) with its own Python *and* with the
# checkpoint's jinja template, the way HF renders it, and demands the same bytes. A difference is
# refused with the first differing conversation and a diff like this one (K2.5 against K2.7-Code,
# which keeps the reasoning that K2.5 drops from the history):

# %%
print([case.name for case in SUITE])
history = next(case for case in SUITE if case.name == "history with reasoning")
print(describe_difference(render(list(history.messages), variant="k2.5"),
                          render(list(history.messages), variant="k2.7-code"), names=("k2.5", "k2.7-code")))

# %% [markdown]
# ## Exercises
#
# Solutions: [solutions/02_chat_template.py](solutions/02_chat_template.py) (tested in
# `tests/test_chat_template.py`).
#
# 1. **Who pays for the prompt?** Write `tokens_by_role(messages, tokenizer, variant)` returning how
#    many prompt tokens each part (`render_segments` roles) costs. Check that the counts add up to
#    `len(render_ids(...))`. Which part dominates in the conversation above?
# 2. **The history split by hand.** Write `hide_history_reasoning(messages)`: blank the reasoning of
#    every assistant message up to the last assistant message without tool calls. Show that
#    `render(hide_history_reasoning(m), variant="k2.7-code")` equals `render(m, variant="k2.5")`.
# 3. **A chat UI.** Write `message_from_deltas(deltas)` that rebuilds reasoning, content and tool calls
#    from a StreamParser's deltas alone, and check it against `parse` when the output is fed in chunks
#    of 3 tokens.
