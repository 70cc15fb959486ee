"""Calibration data for GPTQ: the project's own text (no download) and its tokenization.

`CALIBRATION_DOCUMENTS` is written for this project: English prose on varied subjects, Python and
other code, and arithmetic word problems with worked answers. `CALIBRATION_CHATS` are
question/answer pairs rendered through the tokenizer's chat template when it has one, because the
instruct models are prompted that way at run time. `calibration_tokens` concatenates everything
(documents separated by the EOS token) and cuts it into equal windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

CALIBRATION_DOCUMENTS: tuple[str, ...] = (
    # --- prose: history / science / everyday ---
    """The lighthouse at the end of the harbour had been dark for eleven years when Marta decided to \
climb it. The keeper's cottage was boarded up, the paint on the railing had blistered into small \
grey islands, and the iron door at the base of the tower opened only after she leaned her whole \
weight against it. Inside, the spiral stair smelled of salt and old oil. She counted the steps out \
loud, the way her grandfather had taught her: one hundred and twelve to the lamp room, and one \
more to the gallery where the wind could knock a grown man off his feet. From up there the town \
looked like a handful of dice thrown against the hill. She could see the ferry coming in from the \
island, the market tents going up in the square, and a line of cormorants drying their wings on \
the breakwater. Nobody in the council believed the light could be repaired, but Marta had found \
the original drawings in the library archive, and the lens itself was intact. What it needed was \
a new lamp, a working clockwork for the rotation, and someone stubborn enough to wind it.""",
    """Photosynthesis is the process by which plants, algae and some bacteria turn light into \
chemical energy. In the light-dependent reactions, which take place in the thylakoid membranes of \
the chloroplast, water molecules are split, oxygen is released, and the energy of absorbed photons \
is stored in two carrier molecules, ATP and NADPH. In the light-independent reactions, often \
called the Calvin cycle, the enzyme RuBisCO fixes carbon dioxide from the air onto a five-carbon \
sugar, and the stored energy is used to build three-carbon sugars that the plant can turn into \
glucose, starch or cellulose. RuBisCO is slow and sometimes binds oxygen instead of carbon dioxide, \
which wastes energy; plants in hot, dry climates have evolved C4 and CAM pathways that concentrate \
carbon dioxide around the enzyme to reduce this loss. Almost all of the oxygen in the atmosphere \
and most of the energy in food chains can be traced back to these reactions.""",
    """The printing press did not appear out of nowhere. Block printing had been used in China for \
centuries, and movable type made of ceramic and later of metal was developed in China and Korea \
long before it reached Europe. What Johannes Gutenberg assembled in Mainz around 1450 was a \
system: a hand mould that could cast large numbers of identical metal letters quickly, an alloy of \
lead, tin and antimony that melted at a low temperature and set hard, an oil-based ink that stuck \
to metal, and a screw press adapted from the ones used for wine and paper. Within fifty years, \
presses were running in more than two hundred European cities. Books became cheaper, spelling \
became more uniform, and ideas could travel faster than any single scribe could copy them. \
Historians still argue about how much of the Reformation, the scientific revolution and the rise \
of vernacular literature depended on print, but few doubt that it changed who could read and what \
they could read.""",
    """How to make a simple loaf of bread. Mix 500 grams of strong white flour with 10 grams of \
salt and 7 grams of dried yeast in a large bowl. Add 350 millilitres of lukewarm water and stir \
until no dry flour remains. Turn the dough out onto a clean surface and knead it for about ten \
minutes, until it feels smooth and springs back when you press it with a finger. Put it back in \
the bowl, cover it with a damp towel and leave it somewhere warm for an hour, or until it has \
doubled in size. Knock the air out, shape it into a tight oval, and place it in an oiled loaf tin. \
Let it rise for another forty minutes while the oven heats to 220 degrees Celsius. Bake for thirty \
to thirty-five minutes. The loaf is done when it sounds hollow if you tap the bottom. Let it cool \
on a rack before slicing, otherwise the crumb will be gummy.""",
    """Dear Mr. Okafor, thank you for your letter of 14 March regarding the delayed shipment of \
laboratory glassware. I am sorry that the order arrived three weeks late and that two of the \
volumetric flasks were broken in transit. We have traced the delay to a customs inspection at the \
port, and the breakage to packaging that did not meet our own standards. A replacement set of \
flasks was dispatched this morning by express courier, at no charge, and you should receive it by \
Thursday. We have also credited your account with ten percent of the original invoice. If there \
is anything else we can do, please contact me directly at the number below. Yours sincerely, \
Helen Varga, Customer Relations.""",
    """Volcanoes form where molten rock, called magma, reaches the surface of a planet. On Earth \
most volcanoes sit along the boundaries of tectonic plates. Where two plates pull apart, as along \
the mid-Atlantic ridge, magma wells up to fill the gap and builds new ocean floor. Where one plate \
sinks beneath another, water carried down with it lowers the melting point of the mantle above, \
and the resulting magma rises to feed chains of explosive volcanoes such as those around the \
Pacific. A few volcanoes, like those of Hawaii, sit far from any boundary above hot spots, plumes \
of unusually hot mantle. As the plate drifts over a hot spot, a line of islands forms, the oldest \
eroded and sinking, the youngest still erupting. The viscosity of the magma, which depends mostly \
on its silica content and temperature, decides whether an eruption is a gentle lava flow or a \
violent blast of ash and gas.""",
    """The committee met on Tuesday to review the proposal for the new cycle lanes on Station \
Road. Supporters argued that the number of cyclists had tripled since the bridge reopened and \
that two serious accidents last year could have been prevented by a separated lane. Shop owners \
were worried about losing the parking spaces in front of their businesses and asked whether \
deliveries would still be possible in the morning. The traffic engineer presented three options: \
a painted lane with no change to parking, a lane protected by low kerbs with parking moved to a \
side street, and a shared street with a lower speed limit. After an hour of discussion, the \
committee voted five to two for the protected lane, on the condition that a loading bay is kept \
outside the bakery and that the scheme is reviewed after twelve months.""",
    # --- code ---
    '''def merge_intervals(intervals):
    """Merges overlapping [start, end] intervals and returns them sorted."""
    if not intervals:
        return []
    intervals = sorted(intervals, key=lambda iv: iv[0])
    merged = [list(intervals[0])]
    for start, end in intervals[1:]:
        last = merged[-1]
        if start <= last[1]:
            last[1] = max(last[1], end)
        else:
            merged.append([start, end])
    return merged


def is_palindrome(text: str) -> bool:
    cleaned = [c.lower() for c in text if c.isalnum()]
    return cleaned == cleaned[::-1]


class LRUCache:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.data = {}

    def get(self, key):
        if key not in self.data:
            return -1
        value = self.data.pop(key)
        self.data[key] = value
        return value

    def put(self, key, value):
        if key in self.data:
            self.data.pop(key)
        elif len(self.data) >= self.capacity:
            oldest = next(iter(self.data))
            del self.data[oldest]
        self.data[key] = value


if __name__ == "__main__":
    print(merge_intervals([[1, 3], [2, 6], [8, 10], [15, 18]]))
    assert is_palindrome("A man, a plan, a canal: Panama")
''',
    '''import math
from collections import Counter, defaultdict


def prime_factors(n: int) -> list[int]:
    """Returns the prime factors of n in increasing order, with multiplicity."""
    factors = []
    d = 2
    while d * d <= n:
        while n % d == 0:
            factors.append(d)
            n //= d
        d += 1
    if n > 1:
        factors.append(n)
    return factors


def word_frequencies(path):
    counts = Counter()
    with open(path, encoding="utf-8") as f:
        for line in f:
            for word in line.lower().split():
                counts[word.strip(".,;:!?\\"'()")] += 1
    return counts.most_common(10)


def group_by_length(words):
    groups = defaultdict(list)
    for w in words:
        groups[len(w)].append(w)
    return dict(sorted(groups.items()))


def binary_search(items, target):
    lo, hi = 0, len(items) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        if items[mid] == target:
            return mid
        if items[mid] < target:
            lo = mid + 1
        else:
            hi = mid - 1
    return -1


def distance(p, q):
    return math.sqrt(sum((a - b) ** 2 for a, b in zip(p, q)))
''',
    """// Debounce: call fn only after `wait` ms have passed without another call.
function debounce(fn, wait) {
  let timer = null;
  return function (...args) {
    clearTimeout(timer);
    timer = setTimeout(() => fn.apply(this, args), wait);
  };
}

async function fetchUsers(url) {
  const response = await fetch(url);
  if (!response.ok) {
    throw new Error(`request failed with status ${response.status}`);
  }
  const users = await response.json();
  return users.filter((u) => u.active).map((u) => ({ id: u.id, name: u.name }));
}

-- Orders per customer in 2023, largest first.
SELECT c.name, COUNT(o.id) AS orders, SUM(o.total) AS spent
FROM customers AS c
JOIN orders AS o ON o.customer_id = c.id
WHERE o.created_at >= '2023-01-01' AND o.created_at < '2024-01-01'
GROUP BY c.name
HAVING COUNT(o.id) > 2
ORDER BY spent DESC;

#!/usr/bin/env bash
set -euo pipefail
for f in logs/*.log; do
  echo "$f: $(grep -c ERROR "$f") errors"
done
""",
    # --- arithmetic word problems with worked answers ---
    """Question: A bakery sells muffins for $3 each and cookies for $2 each. On Saturday it sold 45 \
muffins and 60 cookies. How much money did it make?
Answer: The muffins brought in 45 * 3 = 135 dollars. The cookies brought in 60 * 2 = 120 dollars. \
In total the bakery made 135 + 120 = 255 dollars. The answer is 255.

Question: Tom has 3 times as many marbles as Ana. Together they have 48 marbles. How many marbles \
does Tom have?
Answer: Let Ana have x marbles. Then Tom has 3x, and x + 3x = 48, so 4x = 48 and x = 12. Tom has \
3 * 12 = 36 marbles. The answer is 36.

Question: A train travels 180 kilometres in 2 hours and then 150 kilometres in 3 hours. What is \
its average speed for the whole trip?
Answer: The total distance is 180 + 150 = 330 kilometres and the total time is 2 + 3 = 5 hours. \
The average speed is 330 / 5 = 66 kilometres per hour. The answer is 66.

Question: A jacket costs $80. It is on sale for 25% off, and then a further $6 coupon is applied. \
What is the final price?
Answer: 25% of 80 is 0.25 * 80 = 20, so the sale price is 80 - 20 = 60 dollars. After the coupon \
the price is 60 - 6 = 54 dollars. The answer is 54.""",
    """Question: Maria reads 14 pages of her book every weekday and 30 pages on each day of the \
weekend. How many pages does she read in two weeks?
Answer: In one week she reads 5 * 14 = 70 pages on weekdays and 2 * 30 = 60 pages at the weekend, \
so 70 + 60 = 130 pages a week. In two weeks she reads 2 * 130 = 260 pages. The answer is 260.

Question: A garden is 12 metres long and 7 metres wide. A path 1 metre wide runs all the way \
around the outside of it. What is the area of the path?
Answer: With the path, the outer rectangle is 12 + 2 = 14 metres by 7 + 2 = 9 metres, an area of \
14 * 9 = 126 square metres. The garden itself is 12 * 7 = 84 square metres. The path is \
126 - 84 = 42 square metres. The answer is 42.

Question: There are 24 students in a class. One third of them walk to school, one quarter come \
by bus, and the rest are driven. How many students are driven?
Answer: 24 / 3 = 8 students walk and 24 / 4 = 6 take the bus. That is 8 + 6 = 14 students, so \
24 - 14 = 10 are driven. The answer is 10.

Question: A tank holds 500 litres. It is filled at 25 litres per minute while a leak drains 5 \
litres per minute. Starting empty, how long does it take to fill?
Answer: The tank gains 25 - 5 = 20 litres per minute. It takes 500 / 20 = 25 minutes. The answer \
is 25.

Question: Leo earns $15 per hour and works 6 hours a day for 4 days. He spends $120 on a bicycle \
helmet and saves the rest. How much does he save?
Answer: He earns 15 * 6 * 4 = 360 dollars. After the helmet he has 360 - 120 = 240 dollars. The \
answer is 240.""",
    # --- mixed: notes, lists, numbers ---
    """Meeting notes, project Kestrel, week 12.
1. The sensor firmware update (v2.4.1) is on 38 of 40 field units; the two remaining units are \
offline because of a power fault at the north site and will be updated on Friday.
2. Battery life measured over the last month averaged 19.6 days, up from 14.2 days before the \
sleep-mode change. Target for the next release: 21 days.
3. The data pipeline dropped 0.8% of readings between 02:00 and 03:00 UTC on three nights. Cause: \
the nightly backup locks the database table. Fix: move the backup to a replica.
4. Budget: 62% spent with 55% of the schedule elapsed. Priya will prepare a revised forecast.
Action items: Sam to schedule the north-site repair; Priya to send the forecast by Wednesday; \
Jin to write the replica migration plan.""",
    """The rules of the game are simple. Each player starts with seven cards and the rest of the \
deck is placed face down in the middle of the table. On your turn you may either play a card that \
matches the colour or the number of the top card of the discard pile, or draw a card from the deck. \
Special cards change the flow of play: a skip card makes the next player miss a turn, a reverse \
card changes the direction of play, and a draw-two card forces the next player to pick up two \
cards. When you have one card left you must say so out loud; if another player notices before you \
do, you draw two penalty cards. The first player to get rid of all their cards wins the round and \
scores points for the cards left in the other players' hands.""",
)

# (user question, assistant answer) pairs, rendered with the tokenizer's chat template if any.
CALIBRATION_CHATS: tuple[tuple[str, str], ...] = (
    (
        "What is the capital of Australia, and why is it not Sydney?",
        "The capital of Australia is Canberra. When the colonies federated in 1901, Sydney and "
        "Melbourne were rivals and neither would accept the other as the capital, so a new city "
        "was planned between them. Parliament met in Melbourne until Canberra was ready in 1927.",
    ),
    (
        "Write a Python function that returns the n-th Fibonacci number.",
        "Here is an iterative version that runs in linear time:\n\n```python\ndef fibonacci(n: "
        "int) -> int:\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    "
        "return a\n```\n\nFor example, `fibonacci(10)` returns 55.",
    ),
    (
        "A shop has 120 apples. It sells 45 in the morning and 38 in the afternoon. How many are "
        "left?",
        "In total the shop sells 45 + 38 = 83 apples. The number left is 120 - 83 = 37. So 37 "
        "apples are left.",
    ),
    (
        "Give me three tips for sleeping better.",
        "1. Keep a regular schedule: go to bed and get up at the same time every day, even at "
        "weekends.\n2. Keep the bedroom dark, quiet and cool, and avoid screens for the last hour "
        "before bed.\n3. Avoid caffeine after lunch and large meals late in the evening.",
    ),
    (
        "Explain what a hash table is in simple terms.",
        "A hash table stores key-value pairs so that you can find a value quickly from its key. "
        "It uses a hash function to turn each key into a number, which picks a slot in an array. "
        "Looking up a key means computing its hash and checking that slot, which takes about the "
        "same time no matter how many items are stored. When two keys land in the same slot, the "
        "table handles the collision, for example by keeping a short list in that slot.",
    ),
    (
        "If a rectangle has a perimeter of 30 cm and its length is twice its width, what is its "
        "area?",
        "Let the width be w. The length is 2w, so the perimeter is 2(w + 2w) = 6w = 30, which "
        "gives w = 5 cm and a length of 10 cm. The area is 5 * 10 = 50 square centimetres.",
    ),
    (
        "Summarize the water cycle in a few sentences.",
        "Water evaporates from oceans, lakes and plants, rises as vapour, and cools to form "
        "clouds. When the droplets in clouds grow heavy enough they fall as rain or snow. The "
        "water then runs off into rivers, soaks into the ground, or is stored as ice, and "
        "eventually returns to the sea, where the cycle starts again.",
    ),
)


def _render_chat(tokenizer: Any, question: str, answer: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            tokenize=False,
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(f"Question: {question}\nAnswer: {answer}")["input_ids"])


def calibration_token_stream(tokenizer: Any) -> np.ndarray:
    """All calibration text as one int32 token stream (documents separated by EOS)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    sep = [] if eos is None else [int(eos)]
    stream: list[int] = []
    for doc in CALIBRATION_DOCUMENTS:
        stream += list(tokenizer(doc)["input_ids"]) + sep
    for question, answer in CALIBRATION_CHATS:
        stream += _render_chat(tokenizer, question, answer) + sep
    return np.asarray(stream, np.int32)


def calibration_tokens(
    tokenizer: Any, seq_len: int = 512, max_seqs: int | None = None
) -> np.ndarray:
    """Calibration token windows int32 [num_seqs, seq_len] from the project's own text.

    The stream of `calibration_token_stream` is cut into consecutive windows of `seq_len`; a
    shorter remainder is dropped (unless the stream is shorter than one window, which is then
    returned whole as [1, len]).
    """
    return chunk_tokens(calibration_token_stream(tokenizer), seq_len, max_seqs)


def chunk_tokens(stream, seq_len: int, max_seqs: int | None = None) -> np.ndarray:
    """Cuts a 1-D token stream into windows [num_seqs, seq_len] (see `calibration_tokens`)."""
    stream = np.asarray(stream, np.int32).reshape(-1)
    if stream.size == 0:
        raise ValueError("no calibration tokens")
    if stream.size < seq_len:
        return stream[None]
    n = stream.size // seq_len
    if max_seqs is not None:
        n = min(n, max_seqs)
    return stream[: n * seq_len].reshape(n, seq_len)


def as_token_batch(calib: Any, seq_len: int = 512) -> np.ndarray:
    """Normalises calibration input to int32 [num_seqs, t].

    Accepts a tokenizer (uses `calibration_tokens`), a 2-D array of equal-length sequences, a 1-D
    token stream, or a list of token sequences of any lengths (concatenated and re-chunked).
    """
    if hasattr(calib, "encode") and callable(calib):
        return calibration_tokens(calib, seq_len)
    if isinstance(calib, np.ndarray) or hasattr(calib, "shape"):
        arr = np.asarray(calib, np.int32)
        if arr.ndim == 2:
            return arr
        if arr.ndim == 1:
            return chunk_tokens(arr, seq_len)
        raise ValueError(f"calibration tokens must be 1-D or 2-D, got shape {arr.shape}")
    if isinstance(calib, Sequence):
        seqs = [np.asarray(s, np.int32).reshape(-1) for s in calib]
        lens = {len(s) for s in seqs}
        if len(lens) == 1:
            return np.stack(seqs)
        return chunk_tokens(np.concatenate(seqs), seq_len)
    raise TypeError(f"unsupported calibration input {type(calib).__name__}")
