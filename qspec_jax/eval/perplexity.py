"""Perplexity on held-out text written for this project.

`HELDOUT_TEXT` is English prose written for qspec-jax (tides, honeybees, a night-train story, the
history of postage stamps, mending a bicycle puncture, a letter about a community orchard, how a
refrigerator works, a short explanation of sorting). It does not overlap the GPTQ calibration text in
`qspec_jax/quant/calibration.py` (which covers a lighthouse, photosynthesis, printing, bread,
a customer-service letter, volcanoes, cycle lanes, code, meeting notes and a card game), so it
measures quantization damage on text the quantizer never saw. About 1,500 tokens with the
SmolLM2 tokenizer.

Definition (exact): the text is tokenized once with ``engine.encode([text], chat=False)`` into a
stream ``x_0 .. x_{N-1}``. The stream is cut into consecutive non-overlapping chunks of
``seq_len`` tokens; a final shorter remainder is kept as its own chunk when it has at least 2
tokens. Each chunk ``c`` is run teacher-forced through ``engine.logits(c, precision)`` with no
context from earlier chunks, and contributes the negative log-likelihoods
``-log softmax(logits[t])[c[t+1]]`` for ``t = 0 .. len(c)-2`` (the first token of a chunk is
not predicted). Perplexity = ``exp(sum of all NLLs / number of predicted tokens)``, natural log,
log-softmax computed in float64 from the float32 logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["HELDOUT_TEXT", "chunk_nll", "heldout_chunks", "perplexity", "split_chunks"]

HELDOUT_TEXT = """\
Twice a day the sea along most coasts climbs the beach and falls back again, and for most of \
history people knew the rhythm long before they could explain it. The explanation came with \
Newton's theory of gravity. The Moon pulls on the whole Earth, but it pulls a little harder on the \
ocean facing it than on the planet's centre, and a little less on the ocean on the far side. The \
difference stretches the water into two bulges, one under the Moon and one opposite it, and as the \
Earth turns beneath them a given harbour passes through both bulges roughly every twenty-four \
hours and fifty minutes. The Sun does the same thing with about half the strength. When Sun and \
Moon line up, at new and full moon, their bulges add and the tides are unusually large; these are \
called spring tides, although they have nothing to do with the season. A week later, when the two \
pull at right angles, the range shrinks to the gentle neap tides. Real coastlines complicate the \
picture enormously: the shape of a bay can make the water slosh like a bath, so that the Bay of \
Fundy in Canada sees a difference of more than fifteen metres between high and low water, while \
parts of the Mediterranean barely notice the tide at all.

A honeybee colony in high summer may hold fifty thousand workers, a few hundred drones and a \
single queen, and almost every task in the hive is decided by age rather than by command. A young \
worker begins by cleaning cells, then feeds larvae with secretions from glands in her head, then \
builds comb from wax she produces under her abdomen, and only in the last two or three weeks of \
her short life does she leave the hive to forage. Foragers share what they find through the \
waggle dance, a looping run on the vertical comb in which the angle of the straight part, \
measured from the vertical, gives the direction of the flowers relative to the Sun, and the length \
of the waggle gives the distance. Other bees follow the dancer, taste the nectar she brings back, \
and fly out to the same patch. Because the Sun moves across the sky during the day, a dancer who \
stays inside for an hour slowly changes the angle of her dance to keep the directions correct, \
which means the bees are keeping track of time as well as place.

The night train left the capital eleven minutes late, and by the time it cleared the suburbs \
Aurelio had already decided he would not sleep. He shared the compartment with a retired \
schoolteacher who knitted without looking at her needles and a boy of about nine who pressed his \
forehead against the window as if he could see anything out there but his own reflection. At the \
border the train stood still for almost an hour. Men in long coats walked the corridor with \
torches, stamped passports on the folding table and said nothing. When the wheels began to turn \
again the teacher put down her knitting, took a paper bag of clementines from her coat pocket and \
handed one to each of them without a word. Aurelio peeled his slowly, trying to make the skin \
come away in a single spiral the way his mother used to, and failed, and the boy laughed at him, \
and for the rest of the night it was easier to be awake.

Before 1840, letters in Britain were usually paid for by the person who received them, and the \
price depended on the distance travelled and the number of sheets. Many people refused letters \
they could not afford, and some senders wrote coded marks on the outside so that the recipient \
could read the message from the cover and hand it back unpaid. Rowland Hill, a schoolmaster with \
a taste for reform, argued that the real cost of carrying a letter hardly depended on distance at \
all, and that a single low rate paid in advance would increase the volume of mail enough to pay \
for itself. The result was the Penny Black, a small printed label with the profile of the young \
Queen Victoria, gummed on the back and sold for one penny. Within a few decades almost every \
country had adopted prepaid stamps, and the number of letters sent grew many times over.

To mend a punctured bicycle tyre you need two tyre levers, a patch kit and a pump. Take the wheel \
off the frame, let out any remaining air, and hook the levers under the edge of the tyre to lift \
one side over the rim. Pull out the inner tube and pump a little air into it, then listen or feel \
for the escaping air; passing the tube close to your cheek or through a bowl of water makes small \
holes easier to find. Roughen the area around the hole with the sandpaper from the kit, spread a \
thin layer of glue slightly wider than the patch, and wait until the glue is dry to the touch \
before pressing the patch on firmly. While it sets, run your fingers carefully around the inside \
of the tyre to find whatever caused the puncture, because a thorn left in place will simply make \
a new hole. Finally tuck the tube back in, ease the tyre over the rim with your thumbs rather than \
the levers, and inflate it to the pressure printed on the side.

Dear neighbours, the community orchard on Mill Lane had its best harvest yet this autumn. \
Volunteers picked just over four hundred kilograms of apples and pears from the thirty-two trees, \
and about a third went to the school kitchen and the food bank. The rest was pressed into juice \
at the October open day, which more than two hundred people attended despite the rain. We still \
need help with winter pruning on the first two Saturdays of February, and we are looking for \
someone willing to look after the tool shed. If you would like to adopt a tree, please leave a \
note in the box by the gate with your name and how to reach you.

A refrigerator does not make cold; it moves heat from the inside of the cabinet to the kitchen. \
A pump called the compressor squeezes a refrigerant gas until it is hot and under high pressure, \
and the gas flows through the coils at the back, where it gives its heat to the room and condenses \
into a liquid. The liquid then passes through a narrow valve into the coils inside the cabinet, \
where the pressure is low. There it boils at a temperature well below freezing, and boiling takes \
heat from everything around it: the air, the shelves, yesterday's soup. The gas returns to the \
compressor and the cycle starts again, switched on and off by a thermostat that keeps the inside \
near four degrees Celsius.

A sorting algorithm puts a list of items in order, and the simplest ones are easy to follow by \
hand. Insertion sort works the way many people arrange playing cards: it takes the items one at a \
time and slides each one left past every larger item until it reaches its place. For a list that \
is already nearly sorted this is fast, but in the worst case the number of comparisons grows with \
the square of the length of the list. Merge sort splits the list in half, sorts each half the same \
way, and then merges the two sorted halves by repeatedly taking the smaller front item. Because \
each level of splitting does a linear amount of work and there are only about log n levels, its \
running time grows like n log n even in the worst case, at the price of extra memory for the \
merging.
"""


def split_chunks(tokens: Sequence[int], seq_len: int) -> list[list[int]]:
    """Consecutive non-overlapping chunks of `seq_len` tokens; a remainder of >= 2 tokens is kept."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    toks = [int(t) for t in tokens]
    chunks = [toks[i : i + seq_len] for i in range(0, len(toks), seq_len)]
    return [c for c in chunks if len(c) >= 2]


def heldout_chunks(engine: Any, seq_len: int = 256, text: str | None = None) -> list[list[int]]:
    """The held-out text tokenized by the engine (chat=False) and cut into chunks."""
    tokens = engine.encode([HELDOUT_TEXT if text is None else text], chat=False)[0]
    return split_chunks(tokens, seq_len)


def chunk_nll(
    engine: Any, precision: str, chunks: Sequence[Sequence[int]], batch_size: int = 2
) -> list[tuple[float, int]]:
    """(sum of next-token NLLs in nats, number of predicted tokens) per chunk, in order.

    Chunks of equal length are batched `batch_size` at a time through `engine.logits`.
    """
    out: list[tuple[float, int] | None] = [None] * len(chunks)
    by_len: dict[int, list[int]] = {}
    for i, c in enumerate(chunks):
        by_len.setdefault(len(c), []).append(i)
    for idxs in by_len.values():
        for s in range(0, len(idxs), max(1, batch_size)):
            group = idxs[s : s + max(1, batch_size)]
            ids = np.asarray([chunks[i] for i in group], np.int32)  # [b, L]
            logits = np.asarray(engine.logits(ids, precision))  # [b, L, vocab]
            for row, i in enumerate(group):
                lg = logits[row, :-1].astype(np.float64)  # [L-1, vocab] predicts ids[row, 1:]
                m = lg.max(axis=-1, keepdims=True)
                lse = m[:, 0] + np.log(np.exp(lg - m).sum(axis=-1))  # [L-1]
                target = lg[np.arange(lg.shape[0]), ids[row, 1:]]  # [L-1]
                out[i] = (float((lse - target).sum()), int(lg.shape[0]))
    return out  # type: ignore[return-value]


def perplexity(
    engine: Any,
    precision: str,
    seq_len: int = 256,
    text: str | None = None,
    batch_size: int = 2,
) -> float:
    """Perplexity of `engine` at `precision` ("fp", "w4a16", "w4a4", "w4a8") on the held-out text.

    See the module docstring for the exact definition.
    """
    chunks = heldout_chunks(engine, seq_len, text)
    if not chunks:
        raise ValueError("the text is too short for perplexity: it needs at least 2 tokens")
    res = chunk_nll(engine, precision, chunks, batch_size)
    total = sum(n for n, _ in res)
    count = sum(k for _, k in res)
    return math.exp(total / count)
