"""Real Hugging Face tokenizers built without any download.

Tiny test pipelines need tokenizers that behave like the ones shipped with real checkpoints, yet
nothing can be fetched at run time. This module builds three kinds offline:

* **CLIP** (SD, SDXL, SD3, Flux): the byte-level BPE of Radford et al. (2021), derived from the merge
  list that ``open_clip`` ships inside its package (``open_clip/bpe_simple_vocab_16e6.txt.gz``). The
  vocabulary is laid out exactly as CLIP defines it::

      [256 byte symbols] + [the same 256 symbols + "</w>"] + [one token per merge, in rank order]
      + ["<|startoftext|>", "<|endoftext|>"]                      (49,408 entries with all 48,894 merges)

  where the byte symbols come from GPT-2's reversible ``bytes_to_unicode`` table. The files are
  written as ``vocab.json`` + ``merges.txt`` and loaded with ``CLIPTokenizer.from_pretrained``, so
  the token ids equal open_clip's ``SimpleTokenizer`` (and therefore the real SD tokenizer's) ids.
  ``num_merges=M`` keeps only the first ``M`` merges: that is exactly the BPE model after ``M``
  training steps (vocabulary ``514 + M``), used by the tiny pipelines to keep text embeddings small.
* **T5** (PixArt, SD3 ``tokenizer_3``, Flux ``tokenizer_2``): a SentencePiece-style Unigram model
  (Kudo 2018) trained with the ``tokenizers`` library on :func:`builtin_corpus`, wrapped as
  ``T5TokenizerFast`` with T5's layout (``<pad>``=0, ``</s>``=1, ``<unk>``=2, ``▁`` word prefix).
* **Gemma** (Sana): a byte-fallback BPE trained on the same corpus, wrapped as ``GemmaTokenizerFast``
  with Gemma's layout (``<pad>``=0, ``<eos>``=1, ``<bos>``=2, ``<unk>``=3, ``<mask>``=4, then the
  256 ``<0xNN>`` byte tokens).

Each tokenizer is built once into a cache folder (:func:`default_cache_dir`, or a folder the caller
passes) whose name carries every input that changes the result; the build writes to a temporary
sibling and renames it into place, so concurrent processes never see a half-written folder.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "CLIP_BOS",
    "CLIP_EOS",
    "CLIP_FULL_NUM_MERGES",
    "CLIP_MODEL_MAX_LENGTH",
    "default_cache_dir",
    "open_clip_bpe_path",
    "read_clip_merges",
    "clip_vocab",
    "write_clip_tokenizer_files",
    "clip_tokenizer_dir",
    "clip_tokenizer",
    "builtin_corpus",
    "t5_tokenizer_dir",
    "t5_tokenizer",
    "gemma_tokenizer_dir",
    "gemma_tokenizer",
]

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
CLIP_FULL_NUM_MERGES = 49152 - 256 - 2  # 48,894: the merges CLIP uses out of the shipped file
CLIP_MODEL_MAX_LENGTH = 77  # CLIP's text context length

_FORMAT_VERSION = "1"  # bump when a builder below changes what it writes
_T5_SPECIALS = ("<pad>", "</s>", "<unk>")
_GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
_BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))


# --------------------------------------------------------------------------------------------------
# cache handling
# --------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Root of stepdistill's offline build cache.

    ``$STEPDISTILL_CACHE`` if set, else ``$XDG_CACHE_HOME/stepdistill``, else ``~/.cache/stepdistill``.
    """
    if os.environ.get("STEPDISTILL_CACHE"):
        return Path(os.environ["STEPDISTILL_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "stepdistill"


def _cached_folder(cache_dir: str | Path | None, name: str, build: Callable[[Path], None]) -> Path:
    """Return ``cache_dir/name``, calling ``build(folder)`` once if it does not exist yet.

    The build runs in a temporary sibling folder that is renamed into place (an atomic operation on
    one file system), so a reader either sees a complete folder or none.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "tokenizers"
    final = root / name
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # a real failure, not another process winning the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# --------------------------------------------------------------------------------------------------
# CLIP: byte-level BPE from open_clip's merge list
# --------------------------------------------------------------------------------------------------


def open_clip_bpe_path() -> Path:
    """Path of the BPE merge list shipped inside the installed ``open_clip`` package."""
    try:
        import open_clip
    except ImportError as err:  # pragma: no cover - open_clip is a declared dependency
        raise ImportError(
            "Building the offline CLIP tokenizer needs the BPE merges shipped with open_clip; "
            "install it with `pip install open_clip_torch`."
        ) from err
    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed open_clip package; reinstall it with "
            "`pip install --force-reinstall open_clip_torch`."
        )
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table.

    The 188 printable Latin-1 bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) map to themselves; the
    remaining 68 bytes (whitespace, control characters) map to ``chr(256 + n)`` in byte order. The
    dict's insertion order is the vocabulary order of the first 256 CLIP tokens.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _check_num_merges(num_merges: int | None) -> int:
    """Validate a merge count; ``None`` means all of CLIP's merges."""
    if num_merges is None:
        return CLIP_FULL_NUM_MERGES
    if isinstance(num_merges, bool) or not isinstance(num_merges, int) or not 0 <= num_merges <= CLIP_FULL_NUM_MERGES:
        raise ValueError(
            f"num_merges={num_merges!r} is invalid: pass an int in [0, {CLIP_FULL_NUM_MERGES}] "
            "(or None for the full CLIP vocabulary)."
        )
    return num_merges


def read_clip_merges(num_merges: int | None = None, bpe_path: str | Path | None = None) -> list[tuple[str, str]]:
    """The first ``num_merges`` CLIP merges (all 48,894 when ``None``), in rank order.

    The shipped file holds a header line and then more merges than CLIP uses; CLIP keeps lines
    ``1 .. 48894`` (``49152 - 256 - 2`` of them, so that the vocabulary has 49,408 entries).
    """
    num_merges = _check_num_merges(num_merges)
    path = Path(bpe_path) if bpe_path is not None else open_clip_bpe_path()
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + num_merges]]
    bad = [m for m in merges if len(m) != 2]
    if bad or len(merges) != num_merges:
        raise ValueError(f"{path} is not a CLIP BPE merge list (bad lines: {bad[:3]}, got {len(merges)} merges).")
    return merges  # type: ignore[return-value]


def clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's token -> id table for a merge list (see the module docstring for the layout)."""
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [CLIP_BOS, CLIP_EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("the merge list produces duplicate tokens; it is not a CLIP BPE merge list.")
    return vocab


def write_clip_tokenizer_files(folder: str | Path, num_merges: int | None = None) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` of a CLIP tokenizer into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = read_clip_merges(num_merges)
    vocab = clip_vocab(merges)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text("#version: 0.2\n" + merge_lines, encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": CLIP_MODEL_MAX_LENGTH,
        "bos_token": CLIP_BOS,
        "eos_token": CLIP_EOS,
        "unk_token": CLIP_EOS,
        "pad_token": CLIP_EOS,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


def clip_tokenizer_dir(cache_dir: str | Path | None = None, num_merges: int | None = None) -> Path:
    """Cached folder holding the CLIP tokenizer files (built on first use)."""
    _check_num_merges(num_merges)
    key = "full" if num_merges is None else f"m{num_merges}"
    return _cached_folder(
        cache_dir,
        f"clip-bpe-{key}-v{_FORMAT_VERSION}",
        lambda folder: write_clip_tokenizer_files(folder, num_merges),
    )


def clip_tokenizer(cache_dir: str | Path | None = None, num_merges: int | None = None):
    """A ``transformers.CLIPTokenizer`` loaded with ``from_pretrained`` from :func:`clip_tokenizer_dir`.

    With ``num_merges=None`` its ids equal open_clip's ``SimpleTokenizer`` ids (49,408 entries,
    ``<|startoftext|>`` = 49406, ``<|endoftext|>`` = 49407); ``model_max_length`` is 77.
    """
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(clip_tokenizer_dir(cache_dir, num_merges))


# --------------------------------------------------------------------------------------------------
# a built-in English corpus for training the T5 / Gemma stand-ins
# --------------------------------------------------------------------------------------------------

_STYLES = (
    "a photo of", "a painting of", "a pencil sketch of", "a 3D render of", "a watercolor of",
    "an oil painting of", "a close-up of", "a cartoon of", "a blurry photo of", "a portrait of",
    "an illustration of", "a low-poly model of",
)
_ADJECTIVES = (
    "red", "blue", "green", "yellow", "purple", "orange", "black", "white", "small", "large", "tiny",
    "huge", "old", "young", "happy", "sleepy", "shiny", "wooden", "golden", "silver", "dark", "bright",
    "quiet", "fluffy", "ancient", "modern", "futuristic", "rusty", "colorful", "frozen", "glowing",
    "beautiful", "strange", "cute", "elegant", "broken",
)
_NOUNS = (
    "cat", "dog", "car", "house", "tree", "bird", "boat", "flower", "mountain", "robot", "city",
    "river", "castle", "horse", "apple", "banana", "bicycle", "train", "airplane", "teapot", "lamp",
    "chair", "table", "guitar", "piano", "dragon", "astronaut", "wizard", "knight", "owl", "fox",
    "rabbit", "elephant", "giraffe", "penguin", "turtle", "butterfly", "lighthouse", "bridge", "tower",
    "garden", "village", "forest", "ocean", "desert", "volcano", "island", "cathedral", "spaceship",
    "sandwich", "pizza", "cake", "cup of coffee", "bowl of soup", "backpack", "clock", "umbrella",
)
_PLACES = (
    "in a forest", "on a beach", "under a starry sky", "at night", "in the snow", "on a table",
    "near a lake", "in outer space", "in a busy street", "on top of a hill", "inside a library",
    "next to a window", "in the rain", "at sunset", "in a field of flowers", "on the moon",
    "in an old kitchen", "by the sea", "in a dark cave", "above the clouds",
)
_VERBS = (
    "sitting", "running", "sleeping", "flying", "standing", "jumping", "reading a book", "eating",
    "playing", "dancing", "swimming", "looking at the camera", "waiting", "smiling",
)
_QUALITIES = (
    "highly detailed", "4k", "8k resolution", "trending on artstation", "studio lighting",
    "soft light", "cinematic", "sharp focus", "35mm film", "digital art", "by a famous artist",
    "wide angle", "macro shot", "in the style of Van Gogh", "Unreal Engine", "HDR",
)


def builtin_corpus(num_sentences: int = 600, seed: int = 0) -> list[str]:
    """``num_sentences`` image-prompt-like English sentences drawn deterministically from word lists.

    Five templates mix styles, adjectives, nouns, verbs, places and quality tags, with some
    capitalisation, digits and punctuation, so the trained tokenizers see realistic prompts.
    """
    if num_sentences < 1:
        raise ValueError(f"num_sentences={num_sentences} must be >= 1.")
    rng = random.Random(seed)
    templates = (
        "{style} a {adj} {noun} {place}.",
        "A {adj} {noun} {verb} {place}, {quality}.",
        "{style} {n} {adj} {noun}s {verb} {place}",
        "The {noun} is {verb} {place}; {quality}, {quality2}!",
        "{Adj} {noun} and a {adj2} {noun2}, {quality}",
    )
    sentences = []
    for i in range(num_sentences):
        words = {
            "style": rng.choice(_STYLES),
            "adj": rng.choice(_ADJECTIVES),
            "adj2": rng.choice(_ADJECTIVES),
            "noun": rng.choice(_NOUNS),
            "noun2": rng.choice(_NOUNS),
            "place": rng.choice(_PLACES),
            "verb": rng.choice(_VERBS),
            "quality": rng.choice(_QUALITIES),
            "quality2": rng.choice(_QUALITIES),
            "n": rng.randint(2, 12),
        }
        words["Adj"] = words["adj"].capitalize()
        sentence = templates[i % len(templates)].format(**words)
        sentences.append(sentence[0].upper() + sentence[1:] if i % 3 == 0 else sentence)
    return sentences


def _training_alphabet() -> list[str]:
    """Characters every trained stand-in tokenizer must know (all printable ASCII but space)."""
    return [chr(c) for c in range(33, 127)]


# --------------------------------------------------------------------------------------------------
# T5: Unigram (SentencePiece-style)
# --------------------------------------------------------------------------------------------------


def _trained_key(kind: str, vocab_size: int) -> str:
    """Cache folder name for a trained tokenizer: the trainer's version can change the result."""
    import tokenizers

    digest = hashlib.sha256(f"{tokenizers.__version__}|{_FORMAT_VERSION}".encode()).hexdigest()[:10]
    return f"{kind}-unigram-v{vocab_size}-{digest}" if kind == "t5" else f"{kind}-bpe-v{vocab_size}-{digest}"


def _check_vocab_size(vocab_size: int, minimum: int) -> None:
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size!r} is too small: pass an int >= {minimum}.")


def _build_t5(folder: Path, vocab_size: int) -> None:
    """Train a Unigram model the way T5's tokenizer pre-tokenizes, then save it as ``T5TokenizerFast``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5TokenizerFast

    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=list(_T5_SPECIALS),
        unk_token="<unk>",
        initial_alphabet=_training_alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(builtin_corpus(), trainer=trainer)
    pieces = [(piece, float(score)) for piece, score in json.loads(backend.to_str())["model"]["vocab"]]
    if [p for p, _ in pieces[:3]] != list(_T5_SPECIALS):
        raise RuntimeError(f"Unigram training put the special tokens at {pieces[:3]}, expected {_T5_SPECIALS}.")
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)
    tokenizer.save_pretrained(folder)


def t5_tokenizer_dir(cache_dir: str | Path | None = None, vocab_size: int = 1000) -> Path:
    """Cached folder of the offline T5 stand-in tokenizer (built on first use)."""
    _check_vocab_size(vocab_size, len(_T5_SPECIALS) + len(_training_alphabet()) + 2)
    return _cached_folder(cache_dir, _trained_key("t5", vocab_size), lambda folder: _build_t5(folder, vocab_size))


def t5_tokenizer(cache_dir: str | Path | None = None, vocab_size: int = 1000):
    """A ``T5TokenizerFast`` (Unigram, ``<pad>``=0, ``</s>``=1 appended, ``<unk>``=2) trained offline.

    ``vocab_size`` is an upper bound: the trainer stops earlier when the corpus has no more useful
    pieces; read the real size from ``len(tokenizer)``.
    """
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(t5_tokenizer_dir(cache_dir, vocab_size))


# --------------------------------------------------------------------------------------------------
# Gemma: byte-fallback BPE
# --------------------------------------------------------------------------------------------------


def _build_gemma(folder: Path, vocab_size: int) -> None:
    """Train a byte-fallback BPE on ``▁``-joined words, then save it as ``GemmaTokenizerFast``.

    Gemma's tokenizer replaces spaces by ``▁`` and runs BPE over the whole string. Training splits at
    ``▁`` (kept as a word prefix) so no merge spans two words; applying the merges to the unsplit
    string then gives the same pieces.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*_GEMMA_SPECIALS, *_BYTE_TOKENS],
        initial_alphabet=[*_training_alphabet(), "▁"],
        show_progress=False,
    )
    backend.train_from_iterator(builtin_corpus(), trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    vocab = model["vocab"]
    if [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])[:5]] != list(_GEMMA_SPECIALS):
        raise RuntimeError("BPE training did not put Gemma's special tokens at ids 0..4.")
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = GemmaTokenizerFast(
        vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False, model_max_length=2048
    )
    tokenizer.save_pretrained(folder)


def gemma_tokenizer_dir(cache_dir: str | Path | None = None, vocab_size: int = 1000) -> Path:
    """Cached folder of the offline Gemma stand-in tokenizer (built on first use)."""
    _check_vocab_size(vocab_size, len(_GEMMA_SPECIALS) + len(_BYTE_TOKENS) + len(_training_alphabet()) + 2)
    return _cached_folder(
        cache_dir, _trained_key("gemma", vocab_size), lambda folder: _build_gemma(folder, vocab_size)
    )


def gemma_tokenizer(cache_dir: str | Path | None = None, vocab_size: int = 1000):
    """A ``GemmaTokenizerFast`` (byte-fallback BPE, ``<bos>`` prepended) trained offline."""
    from transformers import GemmaTokenizerFast

    return GemmaTokenizerFast.from_pretrained(gemma_tokenizer_dir(cache_dir, vocab_size))
