"""Cleaning, one step at a time, on crafted documents (Latin and CJK)."""
import pytest

from megaseek.data.clean import CleanConfig, Cleaner, Words, decode, dup_ngram_fraction, top_ngram_fraction
from tests.test_data_common import chinese, prose


def cleaner(**kw) -> Cleaner:
    return Cleaner(CleanConfig(**kw).checked())


def test_normalize_nfkc_controls_whitespace_and_keeps_cjk():
    c = cleaner()
    raw = "ＡＢＣ１２３\u00a0x\r\nline\x00two\x07\u200b \t\r\n\n\n\n\nend\ufeff  \r中文　字符 ｶﾀｶﾅ"
    text, drop = c.normalize(raw)
    assert drop is None
    # NFKC: full-width Latin -> ASCII, half-width katakana -> full-width, ideographic space -> space
    assert text == "ABC123 x\nlinetwo\n\n\nend\n中文 字符 カタカナ"
    # code indentation survives; runs of spaces inside lines are squeezed only when asked
    assert c.normalize("def f():\n    return  1\n")[0] == "def f():\n    return  1"
    assert cleaner(collapse_spaces=True).normalize("def f():\n    return  1")[0] == "def f():\n    return 1"


def test_invalid_utf8_repaired_or_dropped():
    good = "héllo wörld 你好".encode()
    assert decode(good, CleanConfig()) == ("héllo wörld 你好", None, 0)
    broken = good[:1] + b"\xff\xfe" + good[1:] + b"abc" * 100
    text, reason, bad = decode(broken, CleanConfig(max_invalid_fraction=0.05))
    assert reason is None and bad == 2 and text.startswith("héllo wörld 你好")
    assert decode(broken, CleanConfig(invalid_utf8="drop"))[:2] == (None, "invalid_utf8")
    # too many undecodable bytes: dropped even in repair mode
    assert decode(b"\xff" * 50 + b"ok", CleanConfig())[1] == "invalid_utf8"


def test_regex_rules_replace_and_drop():
    c = cleaner(rules=[{"name": "email", "pattern": r"\S+@\S+\.com", "replace": "<email>"},
                       {"name": "lorem", "pattern": "(?i)lorem ipsum", "action": "drop"}])
    assert c.normalize("write to bob@example.com today")[0] == "write to <email> today"
    assert c.normalize("Lorem ipsum dolor")[1] == "regex:lorem"


def test_each_quality_filter_fires_on_its_input_only():
    c = cleaner()
    good = prose(1)
    assert c.check(good)[0] is None
    assert c.check(chinese(2))[0] is None                       # CJK passes every filter
    assert c.check("short text")[0] == "too_short"
    assert cleaner(max_chars=500).check(prose(3, 400))[0] == "too_long"
    assert c.check("@@ ## $$ %% ^^ && ** (( )) " * 10 + good[:30])[0] == "alnum_fraction"
    assert cleaner(min_alnum_fraction=None).check("a+=b**c//d;; " * 20)[0] == "symbol_ratio"
    lines = "\n".join(["repeat this same line of text please"] * 8 + [prose(4, 30)])
    assert c.check(lines)[0] == "repeated_lines"
    spam = " ".join(["buy cheap"] * 60) + " " + prose(5, 40)
    assert cleaner(max_dup_line_fraction=None).check(spam)[0] == "top_2gram"
    dup = prose(6, 80).replace("\n", " ")
    assert cleaner(max_top_ngram_fraction={}, max_dup_line_fraction=None).check(dup + " " + dup)[0] == "dup_5gram"


def test_repetition_measures_are_exact_on_small_cases():
    w = Words.of("a b a b a b c")
    # most common 2-gram "a b" occurs 3 times, 2 characters each, of 7 word characters
    assert top_ngram_fraction(w, 2) == pytest.approx(6 / 7)
    # 2-grams seen twice or more ("a b", "b a") cover words 0..5: 6 of 7 characters
    assert dup_ngram_fraction(w, 2) == pytest.approx(6 / 7)
    assert dup_ngram_fraction(Words.of("one two three four five six"), 2) == 0.0
    # CJK: each character is a word
    assert Words.of("中文abc字").uniq == ["中", "文", "abc", "字"]


def test_language_filter_by_script():
    zh_only = cleaner(languages=["zh"])
    assert zh_only.check(chinese(7))[0] is None
    assert zh_only.check(prose(8))[0] == "language"
    en_only = cleaner(languages=["en"])
    assert en_only.check(chinese(9))[0] == "language" and en_only.check(prose(10))[0] is None
    with pytest.raises(ValueError, match="klingon"):
        CleanConfig(languages=["klingon"]).checked()
