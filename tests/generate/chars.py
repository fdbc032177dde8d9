"""A character vocabulary, a blocklist screen and the refusal the generate tests share."""
from jaxgpt.config import ScreenConfig
from jaxgpt.data.tokenizer import Tokenizer
from jaxgpt.generate.screen import Screen

CHARS = "abcdefghijklmnopqrstuvwxyz .,!?ｆｕｃｋ𝐟\u200b"
REFUSAL = "Sorry, I can't continue with that."


def char_tokenizer():
    return Tokenizer.from_spec("char", corpus=CHARS)


def screen(tmp_path, *phrases, **settings) -> Screen:
    path = tmp_path / "blocklist.txt"
    path.write_text("\n".join(phrases) + "\n", encoding="utf-8")
    return Screen(ScreenConfig(blocklist=str(path), refusal=REFUSAL, **settings))
