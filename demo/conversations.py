"""Synthetic chat conversations that teach the demo model harmony: the training and eval data.

Each `Example` is what a client would send to `/v1/chat/completions` (messages, function tools,
reasoning effort, a date) plus the assistant's answer as harmony messages (`completion`) and what
an evaluator checks (`check`). Kinds:

- `arith`: addition/subtraction under 100, small multiplications, unit conversions by 10/100/1000;
  a short analysis (longer with the reasoning effort: digit by digit at high), then the answer.
- `drill`: a dozen single-digit facts (the steps of that working) asked at once, answered one per
  line: training data only, to give the facts more of the training.
- `tool_call`: a request one offered function tool serves: analysis, then a call on the commentary
  channel with `<|constrain|>json` arguments.
- `tool_answer`: the same conversation continued with the call and the tool's result: the final
  answer repeats the result.
- `refusal`: a request no offered tool can serve: a polite final answer saying so.
- `followup`: any of the above after an earlier finished turn (multi-turn).

The effort changes only the analysis, and always in the same direction: high > medium > low.
Phrasings come from several templates per part, so the model learns the task, not one sentence.
"""

from __future__ import annotations

import datetime
import json
import random
from dataclasses import dataclass, field
from typing import Any

from harmony import Author, Message, Renderer, Role, TextContent
from server.harmony_bridge import chat_to_harmony

EFFORTS = ("low", "medium", "high")
CITIES = (
    "Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Lisbon", "Oslo", "Cairo", "Lima",
    "Sydney", "Toronto", "Chicago", "Boston", "Denver", "Seoul", "Dublin", "Vienna", "Prague",
    "Warsaw", "Athens", "Nairobi", "Mumbai", "Delhi", "Bangkok", "Hanoi", "Manila", "Quito",
    "Bogota", "Santiago", "Havana", "Zurich", "Geneva", "Munich", "Hamburg", "Milan", "Naples",
    "Porto", "Seville", "Helsinki",
)  # fmt: skip
CONDITIONS = ("sunny", "cloudy", "rainy", "windy", "snowy", "foggy", "clear", "stormy")
PRICES = {
    "apple": "0.50", "banana": "0.25", "bread": "2.75", "milk": "1.20", "coffee": "4.50",
    "tea": "3.10", "rice": "1.80", "cheese": "6.40", "eggs": "2.30", "butter": "3.60",
    "orange": "0.60", "pasta": "1.40", "honey": "5.20", "salt": "0.90", "sugar": "1.10",
    "juice": "2.60",
}  # fmt: skip

TOOLS: dict[str, dict[str, Any]] = {
    "get_weather": {
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location", "unit"],
        },
    },
    "add": {
        "description": "Add two integers exactly.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
    "lookup_price": {
        "description": "Look up the price of a grocery item in US dollars.",
        "parameters": {
            "type": "object",
            "properties": {"item": {"type": "string"}},
            "required": ["item"],
        },
    },
    "get_time": {
        "description": "Get the local time in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}

# Requests that none of the tools above can serve: (what the user asks, what it is called).
UNSERVED = (
    ("book a flight to {city} for me", "book flights"),
    ("order a pizza to my home", "order food"),
    ("play some jazz music", "play music"),
    ("set an alarm for tomorrow morning", "set alarms"),
    ("send an email to my boss", "send emails"),
    ("turn on the lights in the kitchen", "control the lights"),
    ("reserve a table for two in {city}", "make reservations"),
    ("call a taxi to the airport", "call a taxi"),
    ("buy a train ticket to {city}", "buy tickets"),
    ("post a message on my social media", "post on social media"),
)


@dataclass
class Example:
    """One chat request and the assistant's answer to it."""

    kind: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    reasoning_effort: str
    today: datetime.date
    completion: list[Message]
    # What an evaluator checks: e.g. {"answer": 85} or {"tool": "add", "arguments": {...}}.
    check: dict[str, Any] = field(default_factory=dict)


def tool_spec(name: str) -> dict[str, Any]:
    """The OpenAI `tools` entry for one of TOOLS."""
    return {"type": "function", "function": {"name": name, **TOOLS[name]}}


def tool_result(name: str, arguments: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """What the tool returns (the eval plays the tools with this function too)."""
    if name == "get_weather":
        unit = arguments["unit"]
        temp = rng.randint(-5, 35) if unit == "celsius" else rng.randint(23, 95)
        return {"location": arguments["location"], "temperature": temp, "unit": unit,
                "condition": rng.choice(CONDITIONS)}  # fmt: skip
    if name == "add":
        return {"result": arguments["a"] + arguments["b"]}
    if name == "lookup_price":
        return {"item": arguments["item"], "price": PRICES[arguments["item"]]}
    if name == "get_time":
        return {
            "city": arguments["city"],
            "time": f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}",
        }
    raise ValueError(f"unknown tool {name}")


def _assistant(text: str, channel: str, recipient: str | None = None) -> Message:
    content_type = "<|constrain|>json" if recipient else None
    return Message(Author(Role.ASSISTANT), (TextContent(text),), channel, recipient, content_type)


def _pick(rng: random.Random, *options: str) -> str:
    return rng.choice(options)


# --- arithmetic ------------------------------------------------------------------------------


def _digits_work(a: int, b: int, op: str) -> str:
    """Column arithmetic, units first, as the high-effort analysis spells it out."""
    steps = []
    carry = 0
    da, db = str(a)[::-1], str(b)[::-1]
    for i, place in enumerate(("Units", "Tens")):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        if op == "+":
            total = x + y + carry
            extra = f" + {carry}" if carry else ""
            steps.append(f"{place}: {x} + {y}{extra} = {total}.")
            carry = total // 10
        else:
            x -= carry
            borrow = 1 if x < y else 0
            steps.append(f"{place}: {x + 10 * borrow} - {y} = {x + 10 * borrow - y}.")
            carry = borrow
    if op == "+" and carry:
        steps.append(f"Carry {carry} to the hundreds.")
    return " ".join(steps)


def _arith_problem(rng: random.Random) -> tuple[str, str, str, int, str]:
    """(kind, question, expression, answer, high-effort working) for one random problem."""
    kind = rng.choice(("add", "add", "sub", "sub", "mul", "unit"))
    if kind == "add":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        expr, answer = f"{a} + {b}", a + b
        q = _pick(rng, f"What is {a} + {b}?", f"What is {a} plus {b}?", f"Add {a} and {b}.",
                  f"Compute {a} + {b}.", f"{a} + {b} = ?", f"How much is {a} plus {b}?",
                  f"Please add {a} to {b}.", f"what's {a}+{b}")  # fmt: skip
        return kind, q, expr, answer, _digits_work(a, b, "+")
    if kind == "sub":
        a = rng.randint(0, 99)
        b = rng.randint(0, a)
        expr, answer = f"{a} - {b}", a - b
        q = _pick(rng, f"What is {a} - {b}?", f"What is {a} minus {b}?", f"Subtract {b} from {a}.",
                  f"Compute {a} - {b}.", f"{a} - {b} = ?", f"How much is {a} minus {b}?",
                  f"what's {a}-{b}", f"Take {b} away from {a}.")  # fmt: skip
        return kind, q, expr, answer, _digits_work(a, b, "-")
    if kind == "mul":
        a, b = rng.randint(0, 12), rng.randint(0, 9)
        if rng.random() < 0.5:
            a, b = b, a
        expr, answer = f"{a} * {b}", a * b
        q = _pick(rng, f"What is {a} times {b}?", f"What is {a} * {b}?", f"Multiply {a} by {b}.",
                  f"Compute {a} x {b}.", f"{a} * {b} = ?", f"How much is {a} times {b}?",
                  f"what's {a}*{b}")  # fmt: skip
        work = (
            f"{a} times {b} is {a} added {b} times: {answer}."
            if b <= 3
            else (f"{a} * {b} is {answer} from the times table.")
        )
        return kind, q, expr, answer, work
    big, small, factor = rng.choice((
        ("kilometers", "meters", 1000), ("meters", "centimeters", 100),
        ("centimeters", "millimeters", 10), ("kilograms", "grams", 1000),
        ("liters", "milliliters", 1000), ("meters", "millimeters", 1000),
    ))  # fmt: skip
    n = rng.randint(1, 99)
    if rng.random() < 0.6:
        expr, answer = f"{n} * {factor}", n * factor
        q = _pick(rng, f"How many {small} are in {n} {big}?", f"Convert {n} {big} to {small}.",
                  f"What is {n} {big} in {small}?", f"{n} {big} is how many {small}?")  # fmt: skip
        zeros = len(str(factor)) - 1
        work = (
            f"One of the {big} is {factor} {small}, so multiply {n} by {factor}: add {zeros} zeros."
        )
        return kind, q, expr, answer, work
    value = n * factor
    expr, answer = f"{value} / {factor}", n
    q = _pick(rng, f"How many {big} are {value} {small}?", f"Convert {value} {small} to {big}.",
              f"What is {value} {small} in {big}?", f"{value} {small} is how many {big}?")  # fmt: skip
    zeros = len(str(factor)) - 1
    work = f"{factor} {small} make one of the {big}, so divide {value} by {factor}: drop {zeros} zeros."
    return kind, q, expr, answer, work


def _arith(rng: random.Random, effort: str) -> tuple[str, list[Message], dict[str, Any]]:
    problem, question, expr, answer, work = _arith_problem(rng)
    # Every effort writes the working out (column by column, a table fact, or zeros to add or
    # drop): a few million parameters learn single-digit facts and copying, not 2-digit sums at
    # a glance. The effort adds framing around it, so the analysis still grows with the effort.
    if effort == "low":
        analysis = f"{work} {expr} = {answer}."
    elif effort == "medium":
        analysis = (
            _pick(rng, "The user wants ", "Need ", "We need ")
            + f"{expr}. {work} So {expr} = {answer}."
        )
    else:
        analysis = (
            _pick(rng, "The user asks for ", "The question is ", "We must compute ")
            + f"{expr}. Work it out step by step. {work} So {expr} = {answer}. "
            + _pick(rng, "Answer with the result.", "Give the result.", "Reply with the number.")
        )
    final = _pick(rng, f"{expr} = {answer}.", f"The answer is {answer}.", f"It is {answer}.",
                  f"{answer}", f"The result is {answer}.")  # fmt: skip
    completion = [_assistant(analysis, "analysis"), _assistant(final, "final")]
    return question, completion, {"answer": answer, "problem": problem}


def _digit_fact(rng: random.Random) -> tuple[str, int]:
    """One of the single-digit facts the working above is made of, drawn evenly within its kind:
    a column sum (with or without the carry), a column difference (after a borrow the top digit is
    10 to 18), or a times-table product."""
    op = rng.choice(("+", "+", "-", "-", "*"))
    if op == "+":
        x, y, carry = rng.randint(0, 9), rng.randint(0, 9), rng.randint(0, 1)
        return (f"{x} + {y} + 1" if carry else f"{x} + {y}"), x + y + carry
    if op == "-":
        y, difference = rng.randint(0, 9), rng.randint(0, 9)
        return f"{y + difference} - {y}", difference
    a, b = rng.randint(0, 12), rng.randint(0, 9)
    if rng.random() < 0.5:
        a, b = b, a
    return f"{a} * {b}", a * b


def _drill(rng: random.Random, effort: str) -> tuple[str, list[Message], dict[str, Any]]:
    """Many single-digit facts asked at once, answered one per line.

    An arithmetic question holds one or two such facts among ~50 completion tokens; a drill holds
    a dozen, so the facts (what the model gets wrong longest) are seen several times as often for
    the same training time.
    """
    facts = [_digit_fact(rng) for _ in range(rng.randint(8, 16))]
    listed = ", ".join(expr for expr, _ in facts)
    question = _pick(rng, f"Quick practice: {listed}.", f"Drill: {listed}", f"Answer each: {listed}",
                     f"Work these out: {listed}.", f"Solve: {listed}")  # fmt: skip
    if effort == "low":
        analysis = "One result per line."
    elif effort == "medium":
        analysis = f"{len(facts)} small facts. Give one result per line."
    else:
        analysis = (
            f"The user lists {len(facts)} single-digit facts. Work out each one and give the "
            "results in the same order, one per line."
        )
    final = "\n".join(f"{expr} = {value}" for expr, value in facts)
    completion = [_assistant(analysis, "analysis"), _assistant(final, "final")]
    return question, completion, {"answers": [value for _, value in facts]}


# --- tools -------------------------------------------------------------------------------------


def _tool_request(
    rng: random.Random, weights: dict[str, int] | None = None
) -> tuple[str, str, dict[str, Any], str]:
    """(tool, user question, arguments, what the request is about) for one tool use."""
    names = tuple(TOOLS)
    tool = (
        rng.choices(names, weights=[weights[n] for n in names])[0] if weights else rng.choice(names)
    )
    if tool == "get_weather":
        city, unit = rng.choice(CITIES), rng.choice(("celsius", "fahrenheit"))
        q = _pick(rng, f"What's the weather in {city} in {unit}?",
                  f"How is the weather in {city}? Use {unit}.",
                  f"Tell me the current weather for {city} ({unit}).",
                  f"weather in {city}, {unit} please",
                  f"Is it warm in {city} today? Give {unit}.")  # fmt: skip
        return tool, q, {"location": city, "unit": unit}, f"the weather in {city}"
    if tool == "add":
        a, b = rng.randint(100, 99999), rng.randint(100, 99999)
        q = _pick(rng, f"Use the add tool to add {a} and {b}.", f"What is {a} + {b}? Use the tool.",
                  f"Please sum {a} and {b} exactly.", f"Add {a} to {b} with your tool.")  # fmt: skip
        return tool, q, {"a": a, "b": b}, f"the sum of {a} and {b}"
    if tool == "lookup_price":
        item = rng.choice(sorted(PRICES))
        q = _pick(rng, f"How much does {item} cost?", f"What is the price of {item}?",
                  f"Look up the price of {item}.", f"price of {item}?")  # fmt: skip
        return tool, q, {"item": item}, f"the price of {item}"
    city = rng.choice(CITIES)
    q = _pick(rng, f"What time is it in {city}?", f"Tell me the local time in {city}.",
              f"current time in {city}?", f"What's the time in {city} right now?")  # fmt: skip
    return tool, q, {"city": city}, f"the time in {city}"


def _call_analysis(rng: random.Random, effort: str, tool: str, about: str, args: str) -> str:
    if effort == "low":
        return f"Call {tool}."
    if effort == "medium":
        return f"The user wants {about}. " + _pick(rng, f"Use {tool}.", f"Call {tool}.")
    return (
        f"The user wants {about}. "
        + _pick(rng, f"The {tool} tool can answer this.", f"The tool {tool} fits this request.")
        + f" Call {tool} with {args}. Then answer from its result."
    )


def _final_from_result(rng: random.Random, tool: str, result: dict[str, Any]) -> tuple[str, list]:
    """The final answer from a tool result and the values it must contain."""
    if tool == "get_weather":
        sign = "°C" if result["unit"] == "celsius" else "°F"
        t, c, city = result["temperature"], result["condition"], result["location"]
        text = _pick(rng, f"It is {t}{sign} and {c} in {city}.",
                     f"The weather in {city} is {c} at {t}{sign}.",
                     f"{city}: {c}, {t}{sign}.")  # fmt: skip
        return text, [str(t), c]
    if tool == "add":
        total = str(result["result"])
        return _pick(rng, f"The sum is {total}.", f"It is {total}.", f"The result is {total}."), [
            total
        ]
    if tool == "lookup_price":
        item, price = result["item"], result["price"]
        text = _pick(rng, f"{item.capitalize()} costs ${price}.", f"The price of {item} is ${price}.",
                     f"It costs ${price}.")  # fmt: skip
        return text, [price]
    city, time = result["city"], result["time"]
    text = _pick(rng, f"It is {time} in {city}.", f"The local time in {city} is {time}.")
    return text, [time]


def _result_analysis(rng: random.Random, effort: str, tool: str, result_json: str) -> str:
    if effort == "low":
        return "Report the result."
    if effort == "medium":
        return f"The tool returned {result_json}. " + _pick(rng, "Report it.", "Answer with it.")
    return (
        f"The {tool} tool returned {result_json}. "
        + _pick(rng, "Those are the facts I need.", "That answers the question.")
        + " Report the values exactly as given, in one short sentence."
    )


def _offered(rng: random.Random, needed: str | None) -> list[str]:
    others = [name for name in TOOLS if name != needed]
    names = rng.sample(others, rng.randint(0 if needed else 1, 2))
    if needed:
        names.append(needed)
    rng.shuffle(names)
    return names


def _refusal(rng: random.Random, effort: str) -> tuple[str, list[Message], dict[str, Any], list]:
    ask, what = rng.choice(UNSERVED)
    ask = ask.format(city=rng.choice(CITIES))
    question = _pick(rng, f"Can you {ask}?", f"Please {ask}.", f"I need you to {ask}.",
                     f"Could you {ask}?")  # fmt: skip
    tools = [] if rng.random() < 0.2 else _offered(rng, None)
    if effort == "low":
        analysis = f"No tool can {what}."
    elif effort == "medium":
        analysis = f"The user wants me to {ask}. No available tool can {what}."
    else:
        offered = ", ".join(tools) if tools else "none"
        analysis = (
            f"The user wants me to {ask}. My tools are: {offered}. None of them can {what}, "
            "so I cannot do this. Say so politely."
        )
    final = _pick(rng, f"Sorry, I can't {what}: none of my tools can do that.",
                  f"I'm sorry, but I have no tool to {what}.",
                  f"Unfortunately I cannot {what} with the tools I have.")  # fmt: skip
    completion = [_assistant(analysis, "analysis"), _assistant(final, "final")]
    return question, completion, {"refusal": True}, tools


# --- whole examples ---------------------------------------------------------------------------


def _random_date(rng: random.Random) -> datetime.date:
    return datetime.date(2024, 1, 1) + datetime.timedelta(days=rng.randint(0, 3 * 365))


def _instructions(rng: random.Random) -> list[dict[str, Any]]:
    if rng.random() < 0.8:
        return []
    text = _pick(rng, "You are a helpful assistant.", "Be concise.", "Answer briefly.",
                 "You are a friendly assistant.")  # fmt: skip
    return [{"role": rng.choice(("system", "developer")), "content": text}]


def _history(rng: random.Random) -> list[dict[str, Any]]:
    """A finished earlier turn, as a client sends it back (answer only, or with its reasoning)."""
    question, completion, _ = _arith(rng, rng.choice(EFFORTS))
    answer: dict[str, Any] = {"role": "assistant", "content": completion[1].content[0].text}
    if rng.random() < 0.5:
        answer["reasoning"] = completion[0].content[0].text
    return [{"role": "user", "content": question}, answer]


# The kinds answered by working alone (no tool), each made by its function.
WORKED_KINDS = {"arith": _arith, "drill": _drill}

# How often each kind, and each tool, is drawn in training: the format (a call, a refusal) is
# learned from few examples; the values (digit facts, the weather's words, which the answer spells
# with other tokens than the tool's JSON) need many more.
KIND_WEIGHTS = {"arith": 44, "drill": 12, "tool_call": 10, "tool_answer": 30, "refusal": 4}
TOOL_WEIGHTS = {"get_weather": 2, "add": 1, "lookup_price": 1, "get_time": 1}


def generate_example(rng: random.Random, kind: str | None = None) -> Example:
    """One example of `kind`, tools drawn evenly (as the eval asks); with no kind, one drawn with
    the training mix (KIND_WEIGHTS, TOOL_WEIGHTS)."""
    tool_weights = None if kind else TOOL_WEIGHTS
    kind = kind or rng.choices(tuple(KIND_WEIGHTS), weights=tuple(KIND_WEIGHTS.values()))[0]
    effort = rng.choice(EFFORTS)
    messages = _instructions(rng)
    if rng.random() < 0.15:
        messages += _history(rng)
    today = _random_date(rng)
    if kind in WORKED_KINDS:
        question, completion, check = WORKED_KINDS[kind](rng, effort)
        tools = [] if rng.random() < 0.7 else _offered(rng, None)
    elif kind == "refusal":
        question, completion, check, tools = _refusal(rng, effort)
    else:
        tool, question, args, about = _tool_request(rng, tool_weights)
        tools = _offered(rng, tool)
        args_json = json.dumps(args, separators=(",", ":"))
        call = _assistant(args_json, "commentary", f"functions.{tool}")
        analysis = _assistant(_call_analysis(rng, effort, tool, about, args_json), "analysis")
        check = {"tool": tool, "arguments": args}
        completion = [analysis, call]
        if kind == "tool_answer":
            result = tool_result(tool, args, rng)
            result_json = json.dumps(result, separators=(", ", ": "))
            assistant: dict[str, Any] = {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "call_1", "type": "function",
                                "function": {"name": tool, "arguments": args_json}}],
            }  # fmt: skip
            if rng.random() < 0.5:
                assistant["reasoning"] = analysis.content[0].text
            final, facts = _final_from_result(rng, tool, result)
            after = [assistant, {"role": "tool", "tool_call_id": "call_1", "content": result_json}]
            completion = [
                _assistant(_result_analysis(rng, effort, tool, result_json), "analysis"),
                _assistant(final, "final"),
            ]
            check = {"facts": facts, "tool": tool, "result": result}
            messages = [*messages, {"role": "user", "content": question}, *after]
            return Example(kind, messages, [tool_spec(t) for t in tools], effort, today,
                           completion, check)  # fmt: skip
    messages = [*messages, {"role": "user", "content": question}]
    return Example(kind, messages, [tool_spec(t) for t in tools], effort, today, completion, check)


def generate(n: int, seed: int) -> list[Example]:
    """`n` examples from `seed` (the same seed gives the same examples)."""
    rng = random.Random(seed)
    return [generate_example(rng) for _ in range(n)]


# --- tokens: exactly what the server renders --------------------------------------------------


def to_harmony(example: Example) -> list[Message]:
    """The conversation the server builds for this request (`server.harmony_bridge`)."""
    return chat_to_harmony(
        example.messages,
        today=example.today,
        tools=example.tools or None,
        reasoning_effort=example.reasoning_effort,
    )


def render_example(example: Example, renderer: Renderer) -> tuple[list[int], list[int]]:
    """(prompt, completion) token ids: the server's prompt for the request and the tokens the
    model should sample after it, up to and including `<|return|>` or `<|call|>`."""
    prompt = renderer.render_for_completion(to_harmony(example))
    # Each completion message starts with `<|start|>assistant`; the prompt already ends so.
    head = renderer.render_for_completion([])
    completion: list[int] = []
    for i, message in enumerate(example.completion):
        tokens = renderer.render_message(message)
        assert tokens[: len(head)] == head, "an assistant message renders `<|start|>assistant`"
        completion += tokens[len(head) :] if i == 0 else tokens
    if example.completion[-1].channel == "final":
        completion[-1] = renderer.encoding.ids.return_  # the end of a finished turn
    return prompt, completion
