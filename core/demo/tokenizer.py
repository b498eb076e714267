"""The demo's tokenizer, trained on a fixed corpus so that two builds give identical bytes, and the
prompts the CLI runs when the user gives none."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from klotski_tier.core.demo.shape import BOS_TOKEN_ID, MIN_VOCAB_SIZE, SPECIAL_TOKENS
from klotski_tier.core.errors import ConfigError

# The tokenizer's training text: everyday English, the demo prompts' topics, a little code
# and a few non-ASCII names. Changing it changes the vocabulary: bump DEMO_VERSION.
_CORPUS = """\
Once upon a time, in a small village by the sea, there lived an old fisherman and his daughter.
Every morning before sunrise they walked down to the harbour, checked the nets and listened to the wind.
When the weather was calm they sailed far beyond the rocks; when a storm was coming they stayed home,
mended ropes by the fire and told each other stories about distant islands, kings and talking animals.
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
The capital of France is Paris, the capital of Japan is Tokyo, and the capital of Italy is Rome.
Spring brings rain and flowers, summer brings long warm evenings, autumn paints the leaves red and gold,
and winter covers the quiet fields with snow. Children build snowmen while their parents drink hot tea.
To cook rice, rinse it until the water runs clear, add one and a half cups of water for every cup of rice,
bring it to a boil, cover the pot, lower the heat and wait twenty minutes. Let it rest before serving.
A good bread needs flour, water, salt, yeast and patience: knead the dough, let it rise, shape it, bake it.
When the train finally arrived, the station was crowded with travellers carrying suitcases and umbrellas.
She bought a ticket, found a seat by the window and watched the mountains, rivers and cities roll past.
Science asks simple questions with careful experiments. Why is the sky blue? Why do apples fall down?
Light from the sun is scattered by the air, and gravity pulls every object toward the centre of the earth.
The three laws of thermodynamics describe energy, heat, work and entropy in every physical system.
A computer stores numbers in memory, reads them into registers, adds and multiplies them very quickly,
and writes the results back. Programs are written in languages such as Python, C, Rust and JavaScript.
def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)
for i in range(10): print(i, fibonacci(i)) # prints 0 1 1 2 3 5 8 13 21 34
A language model predicts the next word from the words before it. It reads a prompt, one token at a time,
and then writes new tokens, choosing the most likely one or sampling from the distribution it computes.
A mixture of experts sends each token to a few experts chosen by a small router, called the gate.
Each expert is a feed-forward network; only the selected experts run, so a large model stays fast.
When the weights do not fit in the memory of the accelerator, they live on disk or in host memory,
and they are copied to the device just in time, layer by layer and expert by expert, while it computes.
Good scheduling hides the slow transfers behind useful work, so the device is never idle for long.
Here is a short poem about autumn: the wind is cold, the light is thin, the apples wait to be brought in.
The library was quiet. An old clock ticked on the wall, and dust danced in a narrow beam of afternoon light.
Doctors, teachers, farmers, engineers, musicians and painters all work together to build a better city.
Numbers: one, two, three, four, five, six, seven, eight, nine, ten, hundred, thousand, million, billion.
Days: Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday. Months: January, February, March,
April, May, June, July, August, September, October, November, December. Colours: red, green, blue, yellow.
Café, naïve, façade, Zürich, São Paulo, Kraków, 東京, Москва and Αθήνα are names written in many scripts.
"""


def demo_prompts() -> list[str]:
    """Short prompts the CLI runs when the user gives none."""
    return [
        "The quick brown fox",
        "Once upon a time, in a small village by the sea,",
        "A mixture of experts sends each token to",
        "The best way to cook rice is",
        "def fibonacci(n):",
        "Here is a short poem about autumn:",
        "The capital of France is",
        "When the train finally arrived,",
    ]


def train_demo_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE with exactly ``vocab_size`` ids, trained on the built-in corpus.

    Byte-level: any text, in any script, encodes (unknown characters fall back to bytes).
    Encoding adds ``<s>`` in front, like Mistral's tokenizer.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL_TOKENS[BOS_TOKEN_ID]} $A",
        pair=f"{SPECIAL_TOKENS[BOS_TOKEN_ID]} $A {SPECIAL_TOKENS[BOS_TOKEN_ID]} $B",
        special_tokens=[(SPECIAL_TOKENS[BOS_TOKEN_ID], BOS_TOKEN_ID)],
    )
    actual = tokenizer.get_vocab_size(with_added_tokens=True)
    if actual != vocab_size:
        raise ConfigError(
            f"the demo corpus yields {actual} token ids, not {vocab_size}; pick a vocab_size from "
            f"{MIN_VOCAB_SIZE} to about 1260"
        )
    return tokenizer
