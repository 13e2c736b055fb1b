"""Build the shipped demo vocabulary: ``python -m weights_tools.make_demo_vocab OUT_DIR``.

Writes ``OUT_DIR/tiktoken.model`` (3840 BPE ranks: the 256 bytes, then 3584 merges learned by our own
:func:`kimi_ref.tokenizer.train_bpe` with ``split_digits``, so every digit is its own token) and
``OUT_DIR/tokenizer_config.json`` (shaped like Kimi's: the special tokens of sources §8 at the same
offsets after the ranks, so n_vocab = 3840 + 256 = 4096 and ``<|im_end|>`` = 3842 where the real one is 163586 = 163584 + 2).

The corpus is generated here, from text written in this file and a seeded ``random.Random``: no
downloads and nothing read from the repository, so the output is the same bytes on every machine
(``tests/test_tokenizer.py`` rebuilds it and compares). It covers what the tiny models will say:
English prose and chit-chat, arithmetic ("What is 17*23?", "17 * 23 = 391"), unit conversions,
short step-by-step reasoning, tool declarations and calls (``functions.calculator:0``,
``{"expression": "17*23"}``, ``## Return of ...``), Python code, some Chinese and Japanese, emoji,
and CRLF line ends. ``build_corpus()`` is importable, for anyone who wants text from the same domain.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from kimi_ref.tokenizer import (KIMI_PAT_STR, KIMI_SPECIAL_TOKENS, NUM_RESERVED_SPECIAL_TOKENS, TokenizerError,
                                save_ranks, train_bpe)

from ._cli import FAILURE, INTERRUPTED, USAGE, fail
from .safe_write import OutputError, check_file, write_file, write_text

N_RANKS = 3840      # + 256 special slots = 4096 ids, a round embedding size for the tiny models
SEED = 20260101

# ------------------------------------------------------------------------------------------------
# Text written for this corpus.
# ------------------------------------------------------------------------------------------------

PROSE = """\
The sun rose slowly over the hills, and the town began to wake up. A baker opened the shutters of his shop and the smell of fresh bread drifted into the street.
Learning a new language takes time. Most people find that a little practice every day works better than a long session once a week.
The river was wider than she had expected. She stood on the bank for a while, watching the water, and then she decided to walk to the bridge instead.
Good software is easy to read. When you write a function, give it a name that explains what it does, and keep it short.
In the morning the market is busy. Farmers bring vegetables, fruit, cheese and eggs, and the prices are written on small boards next to each stall.
He had never seen so many stars. Far from the lights of the city, the sky looked deep and clear, and the Milky Way stretched from one side to the other.
A good cup of tea needs water that has just boiled, a warm pot and a few minutes of patience.
The library was quiet except for the sound of pages turning. Students sat at long wooden tables, reading, writing notes and sometimes falling asleep.
Our team finished the project two days early. We tested every part carefully, fixed the last few bugs and wrote a short report for the customer.
Cats sleep for most of the day, but they become curious and playful in the evening.
Photosynthesis is the process plants use to turn light, water and carbon dioxide into sugar and oxygen.
The train to the coast leaves every hour. If you miss one, you can have a coffee at the station and take the next one.
History is full of surprises. Small decisions, made by ordinary people, have often changed the course of whole countries.
Water boils at 100 degrees Celsius at sea level, but at a lower temperature high in the mountains, where the air pressure is lower.
The Earth goes around the Sun once a year, and it turns around its own axis once a day.
When it rains, the streets shine and the city sounds different: softer, slower, and a little sad.
A healthy breakfast, a short walk and enough sleep can make a big difference to how you feel during the day.
Mountains are formed when plates of the Earth's crust push against each other over millions of years.
My grandmother kept a small garden behind her house, with tomatoes, beans, roses and a very old apple tree.
The museum is open from nine in the morning until six in the evening, and it is closed on Mondays.
Computers store everything as numbers. Text, pictures and music are all turned into long sequences of bits.
The meeting has been moved to Thursday afternoon, because half of the team is travelling on Wednesday.
She opened the letter, read it twice, and then smiled for the first time that week.
A language model predicts the next token from the tokens before it. It does this again and again to write a whole answer.
The recipe is simple: mix the flour, the sugar and the butter, add two eggs, and bake the cake for forty minutes.
Bicycles are one of the most efficient machines ever built, turning almost all of the rider's effort into motion.
It was late, the shops were closed, and the last bus had already gone, so they decided to walk home together.
Clouds are made of tiny drops of water or ice that float in the air until they grow heavy enough to fall as rain or snow.
The children built a sandcastle with towers, walls and a deep moat, and then watched the waves wash it away.
Reading the documentation first can save you hours of confusion later.
Volcanoes erupt when molten rock, called magma, rises through cracks in the crust and pours out as glowing lava.
The orchestra tuned their violins, cellos, flutes and trumpets while the conductor waited patiently backstage.
Penguins cannot fly, yet they are superb swimmers that dive deep beneath the freezing Antarctic ice.
Our neighbourhood bakery sells croissants, baguettes, muffins, doughnuts and cinnamon rolls every weekend.
A thunderstorm approached quickly; lightning flashed, thunder rumbled, and heavy hailstones hammered the greenhouse roof.
The goalkeeper jumped sideways, stretched his gloves and pushed the penalty kick against the crossbar.
Astronomers photographed a distant galaxy whose spiral arms glittered with billions of young, blazing stars.
Grandfather repaired clocks in his workshop, surrounded by gears, springs, screwdrivers and magnifying glasses.
Vaccines train the immune system to recognise dangerous viruses and bacteria before an infection happens.
The marathon runners crossed the finish line exhausted, sweating, thirsty, but proud of their achievement.
Bees collect nectar and pollen from blossoms, and honey is what they make from the nectar inside the hive.
The architect sketched bridges, skyscrapers, cathedrals and tunnels in a notebook full of careful measurements.
Dolphins communicate with clicks and whistles, and they often travel in playful, curious groups called pods.
A compiler translates human-readable source code into machine instructions that a processor can execute.
Autumn leaves turn yellow, orange and crimson before drifting quietly onto the damp pavement.
The detective examined fingerprints, footprints and a torn envelope, then questioned every suspicious witness.
Glaciers carve valleys as they creep downhill, grinding boulders and pebbles into fine powder.
Electricity flows through copper wires because electrons move easily between the metal's atoms.
The chef seasoned the soup with garlic, ginger, pepper, coriander and a squeeze of fresh lemon.
Hikers followed a narrow trail through pine forests, meadows of wildflowers and rocky ravines.
Submarines navigate underwater using sonar, gyroscopes and precise charts of the ocean floor.
The toddler giggled, clapped her hands and wobbled across the carpet towards her delighted parents.
Earthquakes happen when tectonic plates suddenly slip, releasing energy that shakes buildings and highways.
Journalists interviewed farmers, engineers, nurses and shopkeepers about the consequences of the drought.
Chess rewards patience: a knight's clever manoeuvre can quietly threaten the opponent's queen and rook.
Butterflies begin life as caterpillars, wrap themselves in a chrysalis, and emerge with colourful wings.
The spacecraft's solar panels unfolded slowly, and its antenna pointed back towards mission control.
Knitting a scarf requires wool, two needles, and a rhythm of looping stitches that becomes almost meditative.
Firefighters rescued a frightened kitten trapped on a balcony during yesterday's blizzard.
Microscopes reveal cells, bacteria and crystals far too small for the naked eye to notice.
The violinist practised scales, arpeggios and difficult passages until her fingers ached.
Archaeologists uncovered pottery, jewellery, coins and skeletons buried beneath an ancient fortress.
Tornadoes twist violently across the prairie, uprooting fences, barns and enormous oak trees.
Recycling glass, plastic, paper and aluminium reduces waste and saves valuable raw materials.
The pharmacist explained the dosage: swallow one tablet with breakfast and another with dinner.
Kangaroos hop across dusty outback plains, carrying their joeys safely inside a pouch.
Satellites orbit thousands of kilometres above us, relaying television, weather forecasts and navigation signals.
The plumber replaced a leaking faucet, tightened the valves and unblocked the kitchen drain.
Owls hunt silently at night, swooping on mice and voles with sharp talons and excellent hearing.
"""

CHAT = """\
Hello! How can I help you today?
Hi there! What would you like to talk about?
Good morning! I hope you slept well.
Thanks a lot, that was really helpful.
You're welcome! Let me know if you have any other questions.
Sure, I can help with that.
I'm not sure I understand. Could you explain what you mean?
That's a great question!
Of course. Here is a short summary.
Sorry, I don't know the answer to that, but I can try to find out.
I'm Kimi, an AI assistant created by Moonshot AI.
You are Kimi, an AI assistant created by Moonshot AI.
You are a helpful assistant.
Can you tell me a joke?
Why did the scarecrow win an award? Because he was outstanding in his field.
What's the weather like today?
I can't check the weather myself, but I can call a weather tool if one is available.
How are you?
I'm doing well, thank you for asking! How about you?
Good night, and sleep well!
Could you write that again, but shorter?
Yes, here's a shorter version.
Let's think about this step by step.
I think the answer is correct, but let me double-check.
Great, that matches what I got.
No problem at all.
Happy to help!
Have a nice day!
Please summarize this paragraph in one sentence.
Can you translate this into French?
What does this code do?
It reads a file, counts the words and prints the ten most common ones.
"""

CHINESE = """\
你好！今天天气很好。
我是Kimi，由月之暗面开发的人工智能助手。
十七乘以二十三等于三百九十一。
请问有什么可以帮你的吗？
谢谢你的帮助！
这个问题很有意思，我们一步一步来想。
北京是中国的首都。
我喜欢喝茶，也喜欢看书。
今天是星期五，明天我们去公园散步吧。
学习编程需要耐心和练习。
一公里等于一千米。
水在一百摄氏度时沸腾。
"""

JAPANESE = """\
こんにちは！お元気ですか？
ありがとうございます。
今日はいい天気ですね。
私はKimiです。よろしくお願いします。
東京は日本の首都です。
猫が好きです。
この問題を一緒に考えましょう。
一キロメートルは千メートルです。
"""

# A small grammar for varied everyday English: many different words, so the vocabulary learns the
# language rather than a few memorized sentences.
NOUNS = """
time year people way day man woman child world life hand part place case week company system program
question work government number night point home water room mother area money story fact month lot right
study book eye job word business issue side kind head house service friend father power hour game line
end member law car city community name president team minute idea kid body information back parent face
others level office door health person art war history party result change morning reason research girl
guy moment air teacher force education foot boy age policy music market sense nation plan college interest
death experience effect class control care field development role effort rate heart drug show leader light
voice wife police mind price report decision son view relationship town road arm difference value building
action model season society tax director position player record paper space ground form event official
matter center couple site project activity star table need court oil situation cost industry figure street
image phone data picture practice piece land product doctor wall patient worker news test movie north love
support technology step baby computer type attention film tree source organization hair window evidence
population site garden river mountain island forest beach bridge train bus bicycle kitchen dinner breakfast
lunch coffee tea bread cheese apple orange flower bird dog cat horse fish ocean sky cloud rain snow wind
sun moon planet rocket engine machine robot keyboard screen file folder message email letter song guitar
piano camera ticket museum library school student lesson exam answer problem solution example language
""".split()
VERBS = """
walked talked looked worked played moved lived believed brought happened wrote provided sat stood lost paid
met included continued set learned changed led understood watched followed stopped created spoke read
allowed added spent grew opened won offered remembered loved considered appeared bought waited served died
sent expected built stayed fell cut reached killed remained suggested raised passed sold required reported
decided pulled found helped cooked painted cleaned fixed visited answered asked carried climbed counted
danced dreamed dropped explained filled finished guessed hoped joined jumped kept laughed listened mixed
noticed ordered packed planted pushed rained repeated sailed saved searched shared smiled solved started
studied tasted thanked travelled tried turned used waved wished wondered
""".split()
ADJECTIVES = """
good new first last long great little own other old right big high different small large next early young
important few public bad same able late hard major better economic strong possible whole free military true
federal international full special easy clear recent certain personal open red difficult available likely
short single medical current wrong private past foreign fine common poor natural significant similar hot
dead central happy serious ready simple left physical general environmental financial blue democratic dark
various entire close legal religious cold final main green nice huge popular traditional cultural quiet
bright warm tiny gentle famous careful curious friendly busy empty heavy light modern narrow quick rich
safe sharp slow soft sweet tall thick thin wet wide wild wise yellow purple brave calm clever eager
""".split()
ADVERBS = "quickly slowly carefully quietly happily suddenly finally often always never sometimes usually " \
          "really almost already together early later today yesterday tomorrow again soon still".split()
PREPOSITIONS = "in on near behind under over across through around beside into from with after before".split()
TEMPLATES = [
    "The {adj} {noun} {verb} {prep} the {noun2}.",
    "{Name} {verb} the {adj} {noun} {adv}.",
    "Yesterday {name} {verb} a {adj} {noun} {prep} the {noun2}.",
    "Why is the {noun} so {adj}?",
    "I think the {noun} is {adj}, but the {noun2} is {adj2}.",
    "We {verb} {prep} the {adj} {noun} and then {verb2} {adv}.",
    "Do you know where the {adj} {noun} is?",
    "Every {noun} needs a {adj} {noun2}.",
    "My {noun} {verb} {adv}, and everyone {verb2}.",
    "There are many {adj} {nouns} {prep} the {noun2}.",
]

EMOJI = ["🙂", "😀", "😊", "👍", "🎉", "🚀", "❤️", "✨", "🤔", "😂", "🔥", "✅", "📚", "☕", "🌧️", "👋🏽"]

NAMES = ["Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory",
         "Oscar", "Peggy", "Trent", "Victor", "Wendy", "Amir", "Mei", "Yuki", "Kenji", "Ana", "Luca"]
THINGS = ["apples", "books", "pencils", "cookies", "marbles", "stickers", "eggs", "oranges", "coins", "cards"]
CITIES = ["Paris", "London", "Tokyo", "Beijing", "New York", "Berlin", "Madrid", "Rome", "Sydney", "Toronto",
          "Cairo", "Seoul", "Mumbai", "Lima", "Oslo", "Nairobi"]
WEATHER = ["Sunny", "Cloudy", "Rainy", "Windy", "Snowy", "Foggy", "Partly cloudy"]

# (from, to, factor, plural names) — factor converts "from" into "to"
UNITS = [
    ("km", "mi", 0.621371, "kilometers", "miles"), ("mi", "km", 1.609344, "miles", "kilometers"),
    ("kg", "lb", 2.204623, "kilograms", "pounds"), ("lb", "kg", 0.453592, "pounds", "kilograms"),
    ("m", "ft", 3.280840, "meters", "feet"), ("ft", "m", 0.3048, "feet", "meters"),
    ("cm", "in", 0.393701, "centimeters", "inches"), ("in", "cm", 2.54, "inches", "centimeters"),
    ("l", "gal", 0.264172, "liters", "gallons"), ("gal", "l", 3.785412, "gallons", "liters"),
    ("h", "min", 60.0, "hours", "minutes"), ("min", "s", 60.0, "minutes", "seconds"),
    ("GB", "MB", 1024.0, "gigabytes", "megabytes"),
]

TOOLS = [
    {"name": "calculator", "description": "Evaluate an arithmetic expression and return the result.",
     "params": [("expression", "string", "The expression to evaluate, e.g. 17*23", True)]},
    {"name": "get_weather", "description": "Get the current weather for a city.",
     "params": [("city", "string", "The name of the city", True), ("unit", "string", "celsius or fahrenheit", False)]},
    {"name": "convert_units", "description": "Convert a value from one unit to another.",
     "params": [("value", "number", "The value to convert", True), ("from_unit", "string", "The unit of the value", True),
                ("to_unit", "string", "The unit to convert to", True)]},
    {"name": "search", "description": "Search the web and return the top results.",
     "params": [("query", "string", "What to search for", True), ("max_results", "integer", "minimum: 1", False)]},
]

CODE = '''\
def add(a, b):
    """Return the sum of a and b."""
    return a + b


def factorial(n: int) -> int:
    if n < 0:
        raise ValueError("n must be non-negative")
    result = 1
    for i in range(2, n + 1):
        result *= i
    return result


def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Counter:
    def __init__(self):
        self.counts = {}

    def add(self, word):
        self.counts[word] = self.counts.get(word, 0) + 1

    def most_common(self, k=10):
        return sorted(self.counts.items(), key=lambda item: item[1], reverse=True)[:k]


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\\n") for line in f]


import json

data = {"name": "Kimi", "version": 2, "tags": ["assistant", "tools"]}
print(json.dumps(data, indent=2))


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


print([n for n in range(50) if is_prime(n)])


def celsius_to_fahrenheit(c: float) -> float:
    return c * 9 / 5 + 32


for x in [1, 2, 3]:
    print(f"{x} squared is {x ** 2}")

numbers = [3, 1, 4, 1, 5, 9, 2, 6]
total = sum(numbers)
average = total / len(numbers)
print(f"total={total}, average={average:.2f}")

try:
    value = int("42")
except ValueError as error:
    print("not a number:", error)
else:
    print(value + 1)
'''

# ------------------------------------------------------------------------------------------------
# Generators: each returns a list of small documents.
# ------------------------------------------------------------------------------------------------


def _lines(block: str) -> list[str]:
    return [line for line in block.splitlines() if line.strip()]


def _num(rng: random.Random) -> int:
    """Mostly small numbers, sometimes big ones: what arithmetic questions look like."""
    return rng.choice([rng.randint(0, 20), rng.randint(2, 99), rng.randint(10, 999), rng.randint(100, 99999)])


def _fmt(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".") if x != int(x) else str(int(x))


def arithmetic(rng: random.Random, n: int) -> list[str]:
    ops = [("*", "times", lambda a, b: a * b), ("+", "plus", lambda a, b: a + b),
           ("-", "minus", lambda a, b: a - b), ("/", "divided by", lambda a, b: a / b)]
    docs = []
    for _ in range(n):
        a, b = _num(rng), max(1, _num(rng))
        sym, word, fn = rng.choice(ops)
        result = _fmt(fn(a, b))
        question = rng.choice([f"What is {a}{sym}{b}?", f"What is {a} {sym} {b}?", f"What's {a} {word} {b}?",
                               f"Compute {a} {sym} {b}.", f"Calculate {a}{sym}{b}", f"{a} {sym} {b} = ?",
                               f"Can you work out {a} {word} {b}?"])
        answer = rng.choice([f"{a} * {b} = {result}".replace("*", sym), f"{a} {sym} {b} = {result}",
                             f"The answer is {result}.", f"{a} {word} {b} is {result}.",
                             f"{a}{sym}{b} = {result}"])
        docs.append(f"{question}\n{answer}")
    return docs


def reasoning(rng: random.Random, n: int) -> list[str]:
    docs = []
    openers = ["", "", "The user asks a math question. ", "Okay, let me think. ", "Let me work through this. ",
               "The user wants the answer with the steps. "]
    for _ in range(n):
        kind = rng.randrange(4)
        opener = rng.choice(openers)
        if kind == 0:  # multiplication split into tens and ones
            a, b = rng.randint(11, 99), rng.randint(11, 99)
            tens, ones = b // 10 * 10, b % 10
            docs.append(f"What is {a}*{b}?\n{opener}Let me break it down. {a} * {tens} = {a * tens}. Then {a} * {ones} = "
                        f"{a * ones}. So {a * tens} + {a * ones} = {a * b}.\nThe answer is {a * b}.")
        elif kind == 1:  # a word problem
            name, thing = rng.choice(NAMES), rng.choice(THINGS)
            have, bags, per = rng.randint(2, 30), rng.randint(2, 9), rng.randint(2, 12)
            docs.append(f"{name} has {have} {thing} and buys {bags} bags with {per} {thing} in each. How many {thing} "
                        f"does {name} have now?\n{opener}First, {bags} bags of {per} is {bags} * {per} = {bags * per}. "
                        f"Then {have} + {bags * per} = {have + bags * per}. So {name} has {have + bags * per} {thing}.")
        elif kind == 2:  # time
            start, minutes = rng.randint(6, 20), rng.choice([15, 30, 45, 90, 120, 150])
            end_h, end_m = start + (minutes // 60), minutes % 60
            docs.append(f"A meeting starts at {start}:00 and lasts {minutes} minutes. When does it end?\n"
                        f"{minutes} minutes is {minutes // 60} hours and {minutes % 60} minutes, so it ends at "
                        f"{end_h}:{end_m:02d}.")
        else:  # compare
            a, b = rng.randint(1, 999), rng.randint(1, 999)
            if a == b:
                docs.append(f"Which is larger, {a} or {b}?\nThey are equal.")
            else:
                docs.append(f"Which is larger, {a} or {b}?\nCompare the two numbers: {max(a, b)} > {min(a, b)}, "
                            f"so {max(a, b)} is larger.")
    return docs


def conversions(rng: random.Random, n: int) -> list[str]:
    docs = []
    for _ in range(n):
        short_from, short_to, factor, long_from, long_to = rng.choice(UNITS)
        value = rng.choice([rng.randint(1, 100), rng.randint(1, 1000) / 10])
        out = _fmt(round(value * factor, 2))
        value = _fmt(value)
        docs.append(rng.choice([
            f"How many {long_to} is {value} {long_from}?\n{value} {long_from} is about {out} {long_to}.",
            f"Convert {value} {short_from} to {short_to}.\n{value} {short_from} = {out} {short_to}",
            f"{value} {long_from} in {long_to}?\nMultiply by {factor}: {value} * {factor} = {out} {long_to}.",
        ]))
    for _ in range(n // 4):
        c = rng.randint(-30, 45)
        docs.append(f"What is {c} degrees Celsius in Fahrenheit?\n{c} * 9 / 5 + 32 = {_fmt(c * 9 / 5 + 32)}, so "
                    f"{c}°C is {_fmt(c * 9 / 5 + 32)}°F.")
    return docs


def _ts_declaration(tools: list[dict]) -> str:
    """The TypeScript-style tool declaration K2.5 puts in its tool_declare message (sources §9)."""
    out = ["# Tools", "", "## functions", "namespace functions {"]
    for tool in tools:
        out.append(f"// {tool['description']}")
        out.append(f"type {tool['name']} = (_: {{")
        params = tool["params"]
        for i, (name, kind, desc, required) in enumerate(params):
            out.append(f"  // {desc}")
            out.append(f"  {name}{'' if required else '?'}: {kind}{',' if i < len(params) - 1 else ''}")
        out.append("}) => any;")
    out.append("}")
    return "\n".join(out)


def tool_use(rng: random.Random, n: int) -> list[str]:
    docs = [_ts_declaration(TOOLS[:k]) for k in range(1, len(TOOLS) + 1)]
    docs.append(json.dumps([{"type": "function", "function": {"name": t["name"], "description": t["description"]}}
                            for t in TOOLS], separators=(",", ":")))
    for _ in range(n):
        idx = rng.randint(0, 3)
        kind = rng.randrange(3)
        if kind == 0:
            a, b, c = _num(rng), max(1, _num(rng)), rng.randint(2, 9)
            sym = rng.choice("*+-/")
            value = {"*": a * b, "+": a + b, "-": a - b, "/": a / b}[sym]
            expr = rng.choice([f"{a}{sym}{b}", f"{a} {sym} {b}"])
            if rng.random() < 0.2:
                expr, value = f"({a}+{b})*{c}", (a + b) * c
            result = _fmt(value)
            call_id, args, ret = f"functions.calculator:{idx}", json.dumps({"expression": expr}), result
            ask, reply = f"What is {expr}?", f"{expr} = {result}"
        elif kind == 1:
            city = rng.choice(CITIES)
            temp = rng.randint(-10, 38)
            call_id = f"functions.get_weather:{idx}"
            args = json.dumps({"city": city}, ensure_ascii=False)
            ret = json.dumps({"weather": rng.choice(WEATHER), "temperature": temp}, ensure_ascii=False)
            ask, reply = f"What's the weather in {city}?", f"It is {temp}°C in {city} right now."
        else:
            short_from, short_to, factor, _, _ = rng.choice(UNITS)
            value = rng.randint(1, 500)
            call_id = f"functions.convert_units:{idx}"
            args = json.dumps({"value": value, "from_unit": short_from, "to_unit": short_to})
            ret = json.dumps({"result": round(value * factor, 3)})
            ask, reply = f"Convert {value} {short_from} to {short_to}.", f"{value} {short_from} is {_fmt(round(value * factor, 2))} {short_to}."
        docs.append(f"user\n{ask}\nassistant\nI should use a tool for this.\n{call_id}\n{args}\n"
                    f"tool\n## Return of {call_id}\n{ret}\nassistant\n{reply}")
    return docs


def chit_chat(rng: random.Random, n: int) -> list[str]:
    lines = _lines(CHAT)
    docs = []
    for _ in range(n):
        turns = rng.sample(lines, rng.randint(2, 5))
        if rng.random() < 0.3:
            turns[-1] += " " + rng.choice(EMOJI)
        if rng.random() < 0.3:
            turns.insert(0, f"{rng.choice(['Hi', 'Hello', 'Hey'])} {rng.choice(NAMES)}!")
        docs.append("\n".join(turns))
    return docs


def prose(rng: random.Random, n: int) -> list[str]:
    sentences = _lines(PROSE)
    return [" ".join(rng.sample(sentences, rng.randint(2, 6))) for _ in range(n)]


def _plural(noun: str) -> str:
    irregular = {"man": "men", "woman": "women", "child": "children", "foot": "feet", "person": "people",
                 "people": "people", "life": "lives", "fish": "fish", "information": "information", "evidence": "evidence",
                 "music": "music", "health": "health", "education": "education", "research": "research",
                 "police": "police", "air": "air", "water": "water", "money": "money", "hair": "hair"}
    if noun in irregular:
        return irregular[noun]
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    return noun + "s"


def sentences(rng: random.Random, n: int) -> list[str]:
    """Short paragraphs from the word-list grammar above."""
    docs = []
    for _ in range(n):
        out = []
        for _ in range(rng.randint(2, 5)):
            name = rng.choice(NAMES)
            noun = rng.choice(NOUNS)
            sentence = rng.choice(TEMPLATES).format(
                noun=noun, nouns=_plural(noun), noun2=rng.choice(NOUNS), verb=rng.choice(VERBS), verb2=rng.choice(VERBS),
                adj=rng.choice(ADJECTIVES), adj2=rng.choice(ADJECTIVES), adv=rng.choice(ADVERBS),
                prep=rng.choice(PREPOSITIONS), name=name, Name=name)
            out.append(sentence[0].upper() + sentence[1:])
        docs.append(" ".join(out))
    return docs


def cjk(rng: random.Random, n: int) -> list[str]:
    lines = _lines(CHINESE) + _lines(JAPANESE)
    docs = []
    for _ in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        docs.append("\n".join(rng.sample(lines, rng.randint(1, 3)) + [f"{a}乘以{b}等于{a * b}。"]))
    return docs


def code(rng: random.Random, n: int) -> list[str]:
    blocks = CODE.split("\n\n\n")
    docs = [CODE]
    for _ in range(n):
        name = rng.choice(["total", "count", "value", "result", "items", "data", "score", "index"])
        k = rng.randint(2, 20)
        docs.append(rng.choice(blocks))
        docs.append(f"{name} = {k}\nfor i in range({k}):\n    {name} += i * {rng.randint(2, 9)}\nprint({name})")
    return docs


def crlf(docs: list[str]) -> list[str]:
    """The same documents with Windows line ends (the regex keeps '\\r\\n' together)."""
    return [doc.replace("\n", "\r\n") for doc in docs]


def build_corpus(seed: int = SEED) -> str:
    """The demo corpus (566,174 characters, 0.58 MB of UTF-8), the same string for a given seed on every machine."""
    rng = random.Random(seed)
    docs = (prose(rng, 300) + sentences(rng, 1200) + chit_chat(rng, 300) + arithmetic(rng, 900) + reasoning(rng, 300)
            + conversions(rng, 350) + tool_use(rng, 300) + code(rng, 50) + cjk(rng, 100))
    docs += crlf(rng.sample(docs, 60))
    rng.shuffle(docs)
    return "\n\n".join(docs) + "\n"


# ------------------------------------------------------------------------------------------------
# Output files.
# ------------------------------------------------------------------------------------------------


def tokenizer_config(n_ranks: int) -> dict:
    """A ``tokenizer_config.json`` shaped like Kimi's (sources §8), with ids from ``n_ranks``."""
    def entry(name: str, special: bool) -> dict:
        return {"content": name, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                "special": special}

    assert max(KIMI_SPECIAL_TOKENS) < NUM_RESERVED_SPECIAL_TOKENS
    return {
        "added_tokens_decoder": {str(n_ranks + offset): entry(name, special)
                                 for offset, (name, special) in sorted(KIMI_SPECIAL_TOKENS.items())},
        "additional_special_tokens": ["<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|start_header_id|>",
                                      "<|end_header_id|>", "[EOT]", "<|im_system|>", "<|im_middle|>",
                                      "<|media_begin|>", "<|media_content|>", "<|media_end|>", "<|media_pad|>"],
        "bos_token": "[BOS]",
        "clean_up_tokenization_spaces": False,
        "eos_token": "[EOS]",
        "extra_special_tokens": {},
        "model_max_length": int(1e30),  # what HF writes for "no limit"
        "pad_token": "[PAD]",
        "tokenizer_class": "TikTokenTokenizer",
        "unk_token": "[UNK]",
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
    }


def make_demo_vocab(out_dir: str | Path, *, n_ranks: int = N_RANKS, seed: int = SEED, force: bool = False) -> dict[bytes, int]:
    """Train on :func:`build_corpus` and write ``tiktoken.model`` + ``tokenizer_config.json`` (each atomically;
    existing files are replaced only with ``force``)."""
    out_dir = Path(out_dir)
    _check_outputs(out_dir, force)
    # Digits are never merged (see train_bpe): kimi-nano copies numbers digit by digit (chapter 13).
    ranks = train_bpe(build_corpus(seed), n_ranks, pat_str=KIMI_PAT_STR, split_digits=True)
    write_file(out_dir / "tiktoken.model", lambda tmp: save_ranks(ranks, tmp), force=force)
    text = json.dumps(tokenizer_config(len(ranks)), indent=2, ensure_ascii=False) + "\n"
    write_text(out_dir / "tokenizer_config.json", text, force=force)
    return ranks


def _check_outputs(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out_dir}: cannot create the directory ({e.strerror or e})") from None
    for name in ("tiktoken.model", "tokenizer_config.json"):
        check_file(out_dir / name, force=force)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weights_tools.make_demo_vocab", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="where to write tiktoken.model and tokenizer_config.json")
    parser.add_argument("--ranks", type=int, default=N_RANKS, help=f"BPE ranks incl. the 256 bytes (default {N_RANKS})")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--force", action="store_true", help="replace existing tokenizer files in OUT_DIR")
    args = parser.parse_args(argv)
    try:
        _check_outputs(Path(args.out_dir), args.force)
    except OutputError as e:
        return fail("make_demo_vocab", e, USAGE)
    try:
        ranks = make_demo_vocab(args.out_dir, n_ranks=args.ranks, seed=args.seed, force=args.force)
    except (OutputError, TokenizerError) as e:
        return fail("make_demo_vocab", e, FAILURE)
    except KeyboardInterrupt:
        return fail("make_demo_vocab", "stopped; nothing was replaced", INTERRUPTED)
    print(f"wrote {args.out_dir}/tiktoken.model ({len(ranks)} ranks) and tokenizer_config.json "
          f"(n_vocab {len(ranks) + NUM_RESERVED_SPECIAL_TOKENS})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
