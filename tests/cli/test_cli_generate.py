"""`r1c generate` end to end through r1c.cli.main: greedy and seeded sampling against the engine's API, a batch,
speculative decoding, text through a tokenizer (bytes and a tokenizer.json), and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from r1c.inference import Engine, SamplingParams

TINY = Path(__file__).parents[2] / "examples" / "r1-tiny.r1"


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    from r1c.cli import main

    d = tmp_path_factory.mktemp("gen")
    assert main(["compile", str(TINY), "--target", "ref", "-o", str(d / "tiny"), "--seed", "1"]) == 0
    assert main(["compile", str(TINY), "--set", "num_layers=1", "-o", str(d / "draft"), "--seed", "1"]) == 0
    return d / "tiny", d / "draft"


def ids(line: str) -> list[int]:
    return [int(t) for t in line.split()]


def test_greedy_streams_the_engines_tokens(cli, arts):
    res = cli("generate", str(arts[0]), "--prompt-tokens", "5 6 7", "--max-new", "9", "--page-size", "4")
    assert res.code == 0, res.err
    want = Engine(arts[0], page_size=4).generate([[5, 6, 7]], SamplingParams(max_new_tokens=9))[0]
    assert ids(res.out) == want
    assert "9 tokens for 1 prompt(s)" in res.err and "tokens/s" in res.err and "prefill: 3 tokens" in res.err
    chunked = cli("generate", str(arts[0]), "--prompt-tokens", "5 6 7", "--max-new", "9", "--prefill-chunk", "2")
    assert chunked.code == 0 and ids(chunked.out) == want, chunked.err


def test_batch_prints_a_line_per_row_and_stops(cli, arts):
    want = Engine(arts[0]).generate([[1, 2], [3, 4, 5, 6]], SamplingParams(max_new_tokens=8))
    stop = want[1][3]
    res = cli("generate", str(arts[0]), "--prompt-tokens", "1 2", "--prompt-tokens", "3,4,5,6", "--max-new", "8",
              "--stop-token", str(stop))  # fmt: skip
    assert res.code == 0, res.err
    rows = [ids(line) for line in res.out.splitlines()]
    cut = lambda out: out[: out.index(stop) + 1] if stop in out else out  # noqa: E731
    assert rows == [cut(want[0]), cut(want[1])] and "stop" in res.err


def test_sampling_is_seeded(cli, arts):
    argv = ["generate", str(arts[0]), "--prompt-tokens", "9 8 7", "--max-new", "12", "--temperature", "1.0",
            "--top-k", "100", "--top-p", "0.9"]  # fmt: skip
    a, b, c = cli(*argv, "--seed", "3"), cli(*argv, "--seed", "3"), cli(*argv, "--seed", "4")
    assert a.code == b.code == c.code == 0, a.err
    want = Engine(arts[0]).generate(
        [[9, 8, 7]], SamplingParams(max_new_tokens=12, temperature=1.0, top_k=100, top_p=0.9, seed=3)
    )[0]
    assert ids(a.out) == ids(b.out) == want != ids(c.out)


def test_speculative_reports_acceptance(cli, arts):
    res = cli("generate", str(arts[0]), "--prompt-tokens", "1 2 3", "--prompt-tokens", "4", "--max-new", "10",
              "--draft", str(arts[1]), "--speculate", "3")  # fmt: skip
    assert res.code == 0, res.err
    want = Engine(arts[0]).generate([[1, 2, 3], [4]], SamplingParams(max_new_tokens=10))
    assert [ids(line) for line in res.out.splitlines()] == want
    assert "speculative (k=3): acceptance rate" in res.err and "tokens per request per target call" in res.err


def test_text_with_byte_tokenizer(cli, arts):
    from r1c.inference.tokenizer import load_tokenizer

    res = cli("generate", str(arts[0]), "--tokenizer", "bytes", "--prompt", "héllo", "--max-new", "6")
    assert res.code == 0, res.err
    tok = load_tokenizer("bytes")
    want = Engine(arts[0]).generate([tok.encode("héllo")], SamplingParams(max_new_tokens=6))[0]
    assert res.out == tok.decode(want) + "\n"


def test_text_with_a_tokenizer_json(cli, arts, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", "the", "cat", "sat", *[f"w{i}" for i in range(4, 512)]])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    res = cli("generate", str(arts[0]), "--tokenizer", str(tmp_path / "tokenizer.json"), "--prompt", "the cat sat",
              "--prompt", "cat", "--max-new", "5")  # fmt: skip
    assert res.code == 0, res.err
    want = Engine(arts[0]).generate([[1, 2, 3], [2]], SamplingParams(max_new_tokens=5))
    assert res.out.splitlines() == [tok.decode(w) for w in want]


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "hi"], "--prompt TEXT needs --tokenizer"),
    (["--prompt-tokens", "1 x"], "'x' is not an integer token id"),
    (["--prompt-tokens", "1 600"], "token id 600 is out of range [0, 512)"),
    ([], "give at least one prompt"),
    (["--prompt-tokens", "1", "--speculate", "2"], "--speculate needs --draft"),
    (["--prompt-tokens", "1", "--temperature", "-1"], "temperature must be"),
    (["--prompt-tokens", "1", "--tokenizer", "nope.json"], "no such tokenizer file"),
    (["--prompt-tokens", "1 2", "--max-new", "40", "--num-pages", "2", "--page-size", "4"], "can never fit"),
    (["--prompt-tokens", "1", "--prefill-chunk", "0"], "prefill_chunk must be at least 1 token"),
])  # fmt: skip
def test_errors_are_one_line(cli, arts, argv, message):
    res = cli("generate", str(arts[0]), *argv)
    assert res.code == 1 and message in res.err and "Traceback" not in res.err, res.err


def test_an_artifact_without_a_paged_step_is_refused(cli, tiny_artifact):
    res = cli("generate", str(tiny_artifact), "--prompt-tokens", "1 2")
    assert res.code == 1 and "no paged step function @paged_step" in res.err, res.err
