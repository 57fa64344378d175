"""Vocabularies that differ: rows aligned by token (``merge(..., vocabulary=...)``).

Tokenizers are trained here with ``tokenizers`` (no download); the models are tiny Llama and
GPT-2 models from configs. Every merged row is checked against a hand computation over the
models that have its token; output folders are loaded back with transformers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch

import terge
from terge.errors import MissingDependencyError, VocabularyError, VocabularyMismatchWarning

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from tests.helpers import lineage_validator  # noqa: E402

SPECIAL = ["<unk>", "<s>"]


def word_level(words: str) -> tokenizers.Tokenizer:
    """A WordLevel tokenizer over ``words`` (ids by frequency, then order): specials 0 and 1."""
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.WordLevelTrainer(special_tokens=SPECIAL)
    tokenizer.train_from_iterator([words], trainer)
    return tokenizer


def byte_bpe(text: str, size: int) -> tokenizers.Tokenizer:
    """A GPT-2 style byte-level BPE tokenizer trained on ``text``."""
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([text] * 4, trainer)
    return tokenizer


def llama(vocab: int, seed: int, tied: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    return transformers.LlamaForCausalLM(config)


def gpt2(vocab: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=vocab, n_embd=8, n_layer=1, n_head=2, n_positions=16
    )
    return transformers.GPT2LMHeadModel(config)


def save(folder: Path, model: torch.nn.Module, tokenizer: tokenizers.Tokenizer) -> str:
    model.save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    unk = "<unk>" if tokenizer.token_to_id("<unk>") is not None else None
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token=unk)
    fast.save_pretrained(folder)  # tokenizer_config.json and special_tokens_map.json
    return str(folder)


EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def two_llamas(tmp_path_factory):
    """Two untied Llamas whose WordLevel vocabularies share some words; b has an added token."""
    root = tmp_path_factory.mktemp("llamas")
    ta, tb = word_level("red red green blue"), word_level("red green green yellow pink")
    tb.add_special_tokens(["<|im_start|>"])
    ma, mb = llama(ta.get_vocab_size(), 0), llama(tb.get_vocab_size(), 1)
    return (
        save(root / "a", ma, ta),
        save(root / "b", mb, tb),
        (ma.state_dict(), mb.state_dict()),
        (ta.get_vocab(), tb.get_vocab()),
        root,
    )


def expected_row(token, states, vocabs, name, weights):
    """The hand computation: the weighted mean over the models that have ``token``."""
    held = [
        (w, s[name][v[token]].double()) for s, v, w in zip(states, vocabs, weights) if token in v
    ]
    total = sum(w for w, _ in held)
    return sum(w * row for w, row in held) / total


def check_rows(result, tokens, states, vocabs, weights=(1.0, 1.0)):
    for name in (EMBED, HEAD):
        assert result[name].shape[0] == max(tokens.values()) + 1
        for token, row in tokens.items():
            want = expected_row(token, states, vocabs, name, weights).to(result[name].dtype)
            torch.testing.assert_close(result[name][row], want, rtol=0, atol=0, msg=token)


def test_union_rows_tokenizer_config_and_lineage(two_llamas, tmp_path):
    a, b, states, vocabs, _ = two_llamas
    out, lineage = terge.merge(
        [a, b], weights=[1, 3], vocabulary="union", out=tmp_path / "out", lineage=True
    )
    union = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab()
    assert {t: i for t, i in union.items() if t in vocabs[0]} == vocabs[0]  # base ids kept
    assert set(union) == set(vocabs[0]) | set(vocabs[1])
    merged = terge.load(out)
    check_rows(merged, union, states, vocabs, weights=(1.0, 3.0))

    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == len(union) == 8
    model = transformers.LlamaForCausalLM.from_pretrained(out)
    assert model.model.embed_tokens.weight.shape[0] == 8
    fast = transformers.AutoTokenizer.from_pretrained(out)
    assert fast.convert_tokens_to_ids("<|im_start|>") == union["<|im_start|>"]
    assert fast("red <|im_start|> yellow")["input_ids"] == [
        union["red"],
        union["<|im_start|>"],
        union["yellow"],
    ]
    ids = fast("red <|im_start|>")["input_ids"]
    assert fast.decode(ids, skip_special_tokens=True) == "red"  # its special flag kept
    if (out / "tokenizer_config.json").exists():  # transformers 4 writes one; 5 may not
        config = json.loads((out / "tokenizer_config.json").read_text())
        decoder = config.get("added_tokens_decoder", {})
        assert decoder[str(union["<|im_start|>"])]["special"] is True

    record = lineage.vocabulary
    assert record["source"] == "union" and record["rows"] == 8 and record["added"] == {"1": 3}
    groups = {tuple(g["models"]): g for g in record["tensors"][EMBED]}
    assert set(groups) == {(0,), (1,), (0, 1)}
    assert groups[(0, 1)]["weights"] == [0.25, 0.75]
    assert groups[(1,)]["copied"] is True
    rows = sorted(r for g in groups.values() for span in g["rows"] for r in range(*span))
    assert rows == list(range(8))  # every output row in exactly one group
    saved = json.loads((out / "lineage.json").read_text())
    assert saved["vocabulary"] == json.loads(json.dumps(record))
    validator = lineage_validator()
    if validator is not None:
        validator.validate(saved)
    assert terge.load_lineage(out / "lineage.json").vocabulary == saved["vocabulary"]


def test_union_is_deterministic(two_llamas, tmp_path):
    a, b, *_ = two_llamas
    texts = []
    for name in ("one", "two"):
        out = terge.merge([a, b], vocabulary="union", out=tmp_path / name, seed=0)
        texts.append(
            [(out / f).read_bytes() for f in ("tokenizer.json", "lineage.json", "config.json")]
        )
    assert texts[0] == texts[1]


def test_base_vocabulary_in_memory_and_on_disk(two_llamas, tmp_path):
    a, b, states, vocabs, _ = two_llamas
    merged = terge.merge([a, b], vocabulary="base")
    check_rows(merged, vocabs[0], states, vocabs)
    out = terge.merge([a, b], vocabulary="base", out=tmp_path / "out")
    # the base's tokenizer files, copied as they are
    assert (out / "tokenizer.json").read_bytes() == (Path(a) / "tokenizer.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(vocabs[0])
    torch.testing.assert_close(terge.load(out)[EMBED], merged[EMBED], rtol=0, atol=0)


def test_a_named_models_vocabulary(two_llamas, tmp_path):
    a, b, states, vocabs, _ = two_llamas
    out = terge.merge([a, b], vocabulary=1, out=tmp_path / "out")
    check_rows(terge.load(out), vocabs[1], states, vocabs)
    got = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab()
    assert got == vocabs[1]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(vocabs[1])
    assert not (out / "vocab.json").exists()
    fast = transformers.AutoTokenizer.from_pretrained(out)
    assert fast("pink")["input_ids"] == [vocabs[1]["pink"]]
    # -1 names the same model; in memory, a named model's vocabulary is a state dict
    check_rows(terge.merge([a, b], vocabulary=-1), vocabs[1], states, vocabs)


def test_in_memory_models_with_tokenizers_given(two_llamas):
    a, b, states, vocabs, _root = two_llamas
    given = [tokenizers.Tokenizer.from_file(f"{a}/tokenizer.json"), Path(b)]
    merged = terge.merge(list(states), vocabulary="base", tokenizers=given)
    check_rows(merged, vocabs[0], states, vocabs)


def test_normalize_false_uses_the_weights_as_given_and_copies_lone_rows(two_llamas):
    a, b, states, vocabs, _ = two_llamas
    merged = terge.merge([a, b], weights=[2, -1], normalize=False, vocabulary="base")
    for token, row in vocabs[0].items():
        ea = states[0][EMBED][vocabs[0][token]].double()
        held = token in vocabs[1]  # a token one model has takes its row
        want = 2 * ea - states[1][EMBED][vocabs[1][token]].double() if held else ea
        torch.testing.assert_close(merged[EMBED][row], want.float(), rtol=0, atol=0)


def test_task_vectors_with_the_base_vocabulary(two_llamas, tmp_path):
    """A task-vector method reads the base's row of every token: fine for the base's own."""
    a, b, states, vocabs, _ = two_llamas
    merged = terge.merge([a, b], method=terge.methods.task_arithmetic(scale=1.0), vocabulary="base")
    for token, row in vocabs[0].items():
        base_row = states[0][EMBED][vocabs[0][token]].double()
        if token in vocabs[1]:
            want = base_row + (states[1][EMBED][vocabs[1][token]].double() - base_row)
        else:
            want = base_row
        torch.testing.assert_close(merged[EMBED][row], want.float(), rtol=0, atol=1e-7)


def test_gpt2_tied_byte_level_with_added_tokens_and_padding_rows(tmp_path):
    """GPT-2 (tied head), byte-level BPE tokenizers trained apart, an added token and an
    embedding resized with padding rows (pad_to_multiple_of)."""
    ta = byte_bpe("the cat sat on the mat", 280)
    tb = byte_bpe("a dog ran in the fog", 280)
    tb.add_tokens(["<tool>"])
    ma, mb = gpt2(ta.get_vocab_size(), 0), gpt2(280, 1)
    mb.resize_token_embeddings(tb.get_vocab_size(), pad_to_multiple_of=8)  # padding rows
    assert mb.config.vocab_size > tb.get_vocab_size()
    a, b = save(tmp_path / "a", ma, ta), save(tmp_path / "b", mb, tb)
    out, lineage = terge.merge([a, b], vocabulary="union", out=tmp_path / "out", lineage=True)
    union = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    vocab = union.get_vocab()
    assert union.encode("the cat").ids == ta.encode("the cat").ids  # the base's text as before
    model = transformers.GPT2LMHeadModel.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert model.config.vocab_size == len(vocab) == model.transformer.wte.weight.shape[0]
    fast = transformers.PreTrainedTokenizerFast.from_pretrained(out)
    assert fast("<tool>")["input_ids"] == [vocab["<tool>"]]
    states = (ma.state_dict(), mb.state_dict())
    vocabs = (ta.get_vocab(), tb.get_vocab())
    wte = model.transformer.wte.weight
    for token, row in vocab.items():
        want = expected_row(token, states, vocabs, "transformer.wte.weight", (1.0, 1.0))
        torch.testing.assert_close(wte[row], want.float(), rtol=0, atol=0)
    assert "lm_head.weight" not in lineage.vocabulary["tensors"]  # tied: written once
    # the base vocabulary keeps the base's rows; b's padding rows are not tokens
    merged = terge.merge([b, a], vocabulary="base")
    rows = merged["transformer.wte.weight"]
    assert rows.shape[0] == mb.config.vocab_size
    padding = range(tb.get_vocab_size(), mb.config.vocab_size)
    torch.testing.assert_close(rows[padding], states[1]["transformer.wte.weight"][padding])


def test_tied_module_base_written_once(two_llamas, tmp_path):
    ta = word_level("red red green blue")
    tb = word_level("red green green yellow pink")
    ma, mb = llama(ta.get_vocab_size(), 0, tied=True), llama(tb.get_vocab_size(), 1, tied=True)
    out = terge.merge([ma, mb], vocabulary="union", tokenizers=[ta, tb], out=tmp_path / "out")
    merged = terge.load(out)
    assert HEAD not in merged  # tied: written once, under the embedding's name
    rows = len(set(ta.get_vocab()) | set(tb.get_vocab()))
    assert merged[EMBED].shape[0] == rows
    model = llama(rows, 2, tied=True)
    missing, unexpected = model.load_state_dict(merged, strict=False)
    assert (missing, unexpected) == ([HEAD], [])  # the head is the embedding
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_the_default_aligns_nothing_and_warns(two_llamas):
    a, b, states, *_ = two_llamas
    with pytest.warns(
        VocabularyMismatchWarning, match=r"vocabulary='base', 'union' or a model"
    ) as caught:
        merged, lineage = terge.merge([a, b], lineage=True)
    assert caught[0].filename == __file__  # the caller's line, not terge's (nor <sys>)
    assert lineage.skipped[EMBED] == "shape mismatch"  # 0.1.1's reason, kept
    assert lineage.vocabulary is None
    assert "vocabulary" not in terge.lineage.lineage_to_json(lineage)
    torch.testing.assert_close(merged[EMBED], states[0][EMBED], rtol=0, atol=0)


def test_same_vocabularies_merge_as_before(two_llamas):
    a, *_ = two_llamas
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain, plain_lineage = terge.merge([a, a], lineage=True)
        aligned, lineage = terge.merge([a, a], vocabulary="union", lineage=True)
    assert lineage.vocabulary is None and lineage == plain_lineage
    torch.testing.assert_close(aligned[EMBED], plain[EMBED], rtol=0, atol=0)


def test_dry_run_records_the_alignment(two_llamas, tmp_path):
    a, b, *_ = two_llamas
    record = terge.merge([a, b], vocabulary="union", dry_run=True, out=tmp_path / "out")
    assert record.vocabulary["rows"] == 8
    assert not (tmp_path / "out").exists()


# --- errors, each before anything is written ------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"vocabulary": "biggest"}, r"'base', 'union', a model index or None.*'biggest'"),
        ({"vocabulary": 2}, r"`vocabulary` is 2, but there are only 2 models"),
        ({"vocabulary": True}, r"got True"),
        ({"tokenizers": [None, None]}, r"happens only with vocabulary="),
        ({"vocabulary_tensors": "x"}, r"happens only with vocabulary="),
        ({"vocabulary": "base", "tokenizers": [None]}, r"one entry per model \(2\)"),
        ({"vocabulary": "base", "tokenizers": "tok.json"}, r"one entry per model"),
        ({"vocabulary": "base", "tokenizers": [3, None]}, r"is a int; pass a tokenizers"),
        ({"vocabulary": "union"}, r"only an output folder holds; pass out="),
        (
            {"vocabulary": "union", "excluded": [EMBED], "out": "OUT"},
            r"'model.embed_tokens.weight' is excluded.*\(5 rows\).*8 rows",
        ),
        (
            {"vocabulary": "base", "vocabulary_tensors": ["model.norm.weight"]},
            r"selects the base's tensor 'model.norm.weight', of shape \(8,\), but .* 5 rows",
        ),
        ({"vocabulary": "base", "out": "OUT", "out_format": "dcp"}, r"out_format='dcp'"),
    ],
)
def test_bad_calls_are_refused(two_llamas, tmp_path, options, match):
    a, b, *_ = two_llamas
    if options.get("out") == "OUT":
        options = {**options, "out": tmp_path / "out"}
    with pytest.raises(VocabularyError, match=match):
        terge.merge([a, b], **options)
    assert not (tmp_path / "out").exists()


def test_task_vectors_need_the_base_row(two_llamas, tmp_path):
    """Two fine-tuned models share tokens the base lacks: a task-vector method has no base row
    for them (a token only one model has is copied, and needs none)."""
    a, b, *_ = two_llamas
    with pytest.raises(VocabularyError, match=r"reads the base's row of every token, but 3 rows"):
        terge.merge([a, b, b], method="ties", vocabulary="union", out=tmp_path / "out")
    method = {"model.embed": "arithmetic", "lm_head": "arithmetic", ".": "ties"}
    method = {__import__("re").compile(k): v for k, v in method.items()}
    out = terge.merge([a, b, b], method=method, vocabulary="union", out=tmp_path / "out")
    assert terge.load(out)[EMBED].shape[0] == 8


def test_inplace_is_refused(two_llamas):
    _, _, states, *_ = two_llamas
    copies = [{k: v.clone() for k, v in state.items()} for state in states]
    with pytest.raises(VocabularyError, match=r"cannot be used with inplace=True"):
        terge.merge(copies, vocabulary="base", inplace=True, tokenizers=[None, None])
    torch.testing.assert_close(copies[0], states[0], rtol=0, atol=0)


def test_a_separate_base_is_refused(two_llamas):
    a, b, *_ = two_llamas
    with pytest.raises(VocabularyError, match=r"a base given apart from `models`"):
        terge.merge([b], base=a, vocabulary="base")


def test_a_module_base_cannot_be_resized_in_memory(two_llamas):
    _, _, _states, vocabs, root = two_llamas
    ma, mb = llama(len(vocabs[0]), 0), llama(len(vocabs[1]), 1)
    with pytest.raises(VocabularyError, match=r"a module cannot be resized here; pass out="):
        terge.merge([ma, mb], vocabulary=1, tokenizers=[f"{root}/a", f"{root}/b"])


def test_models_in_memory_need_tokenizers(two_llamas):
    _, _, states, *_ = two_llamas
    with pytest.raises(VocabularyError, match=r"models\[0\] has no folder .* pass tokenizers="):
        terge.merge(list(states), vocabulary="base")


def test_a_slow_tokenizers_folder_is_named(two_llamas, tmp_path):
    a, b, *_ = two_llamas
    slow = tmp_path / "slow"
    slow.mkdir()
    for name in os.listdir(a):
        if name != "tokenizer.json":
            (slow / name).write_bytes((Path(a) / name).read_bytes())
    (slow / "vocab.json").write_text("{}")
    (slow / "merges.txt").write_text("")
    with pytest.raises(VocabularyError, match=r"no tokenizer.json .* holds merges.txt, vocab.json"):
        terge.merge([str(slow), b], vocabulary="base")


def test_hostile_tokenizer_files(two_llamas, tmp_path):
    a, b, *_ = two_llamas
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(a):
        (broken / name).write_bytes((Path(a) / name).read_bytes())
    (broken / "tokenizer.json").write_text('{"model": {"type": "nonsense"}}')
    with pytest.raises(VocabularyError, match=r"cannot be read as a tokenizer"):
        terge.merge([str(broken), b], vocabulary="base")
    (broken / "tokenizer.json").unlink()
    (broken / "tokenizer.json").symlink_to(Path(b) / "tokenizer.json")
    with pytest.raises(VocabularyError, match=r"is a link to .*outside its folder"):
        terge.merge([str(broken), b], vocabulary="base")


def test_an_embedding_smaller_than_its_tokenizer(two_llamas, tmp_path):
    a, b, *_ = two_llamas
    small = tmp_path / "small"
    small.mkdir()
    for name in os.listdir(a):
        (small / name).write_bytes((Path(a) / name).read_bytes())
    bigger = word_level("red green blue one two three four")
    bigger.save(str(small / "tokenizer.json"))
    with pytest.raises(VocabularyError, match=r"the embedding is smaller than its tokenizer"):
        terge.merge([str(small), b], vocabulary="base")


def test_without_the_tokenizers_library(two_llamas, monkeypatch):
    import sys

    a, b, *_ = two_llamas
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'terge\[llm\]'"):
        terge.merge([a, b], vocabulary="base")


def test_lineage_vocabulary_is_checked_on_load(two_llamas, tmp_path):
    a, b, *_ = two_llamas
    out = terge.merge([a, b], vocabulary="union", out=tmp_path / "out")
    saved = json.loads((out / "lineage.json").read_text())
    saved["vocabulary"]["tensors"][EMBED][0]["rows"] = [[5, 99]]
    (tmp_path / "bad.json").write_text(json.dumps(saved))
    with pytest.raises(terge.LineageError, match=r"vocabulary.tensors.*rows"):
        terge.load_lineage(tmp_path / "bad.json")


def test_the_command_line_and_a_recipe(two_llamas, tmp_path, capsys):
    from terge import cli

    a, b, *_ = two_llamas
    code = cli.main(["merge", a, b, "-o", str(tmp_path / "cli"), "--vocabulary", "union", "-q"])
    assert code == 0
    direct = terge.merge([a, b], vocabulary="union", out=tmp_path / "direct")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "cli" / name).read_bytes() == (direct / name).read_bytes()
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'models = ["{a}", "{b}"]\nout = "from_recipe"\nvocabulary = 1\n')
    assert cli.main(["merge", "--recipe", str(recipe), "-q"]) == 0
    got = json.loads((tmp_path / "from_recipe" / "lineage.json").read_text())
    assert got["vocabulary"]["source"] == 1
    capsys.readouterr()
    assert cli.main(["merge", a, b, "-o", str(tmp_path / "x"), "--vocabulary", "unoin"]) == 2
    assert "--vocabulary must be 'base', 'union' or a model index" in capsys.readouterr().err


def test_lineage_show_and_diff_name_the_vocabulary(two_llamas, tmp_path):
    from terge.audit import diff_lineages, summary

    a, b, *_ = two_llamas
    _, union = terge.merge([a, b], vocabulary=1, lineage=True)
    _, base = terge.merge([a, b], vocabulary="base", lineage=True)
    assert "vocabulary: models[1]'s, 7 rows; aligned by token: lm_head.weight" in summary(union)
    changes = "\n".join(diff_lineages(base, union).changes)
    assert "~ vocabulary: base, 5 rows" in changes and "-> models[1]'s, 7 rows" in changes


def test_a_module_base_with_its_own_vocabulary_in_memory(two_llamas):
    """The base's vocabulary keeps the base module's shapes: a copy of it comes back."""
    a, b, states, vocabs, _ = two_llamas
    ma = transformers.LlamaForCausalLM.from_pretrained(a)
    mb = transformers.LlamaForCausalLM.from_pretrained(b)
    merged = terge.merge([ma, mb], vocabulary="base", tokenizers=[Path(a), Path(b)])
    assert isinstance(merged, transformers.LlamaForCausalLM) and merged is not ma
    check_rows(merged.state_dict(), vocabs[0], states, vocabs)
    torch.testing.assert_close(ma.state_dict(), states[0], rtol=0, atol=0)  # input untouched


def test_a_whole_tensor_method_runs_over_each_row_group(two_llamas):
    """TIES (a threshold over the whole tensor) sees each group's rows as one tensor: the same
    as merging those rows, gathered, by hand."""
    a, b, states, vocabs, _ = two_llamas
    method = terge.methods.ties(density=0.5)
    merged, lineage = terge.merge([a, b], method=method, vocabulary="base", lineage=True)
    shared = [t for t in vocabs[0] if t in vocabs[1]]
    rows = [vocabs[0][t] for t in shared]
    gathered = [
        {EMBED: states[0][EMBED][rows]},
        {EMBED: states[1][EMBED][[vocabs[1][t] for t in shared]]},
    ]
    want = terge.merge(gathered, method=method)[EMBED]
    torch.testing.assert_close(merged[EMBED][rows], want, rtol=0, atol=0)
    alone = [vocabs[0][t] for t in vocabs[0] if t not in vocabs[1]]
    torch.testing.assert_close(merged[EMBED][alone], states[0][EMBED][alone], rtol=0, atol=0)
    groups = lineage.vocabulary["tensors"][EMBED]
    assert {tuple(g["models"]) for g in groups} == {(0,), (1,)}  # ties: the base reads, 1 adds


def test_absurd_sizes_are_refused_before_tables_are_made(two_llamas, tmp_path):
    a, b, *_ = two_llamas
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    for name in os.listdir(a):
        (hostile / name).write_bytes((Path(a) / name).read_bytes())
    config = json.loads((hostile / "config.json").read_text())
    (hostile / "config.json").write_text(json.dumps({**config, "vocab_size": 10**12}))
    with pytest.raises(VocabularyError, match=r"vocab_size 1000000000000, but none of its tensors"):
        terge.merge([str(hostile), b], vocabulary="base")
    (hostile / "config.json").write_text(json.dumps(config))
    sparse = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "b": 4_000_000_000}, "a"))
    with pytest.raises(VocabularyError, match=r"ids up to 4000000000 to only 2 tokens"):
        terge.merge([str(hostile), b], vocabulary="base", tokenizers=[sparse, None])


@pytest.mark.parametrize(
    "options",
    [
        {"vocabulary": "union", "weights": [1, 3]},
        {"vocabulary": 1, "normalize": False, "weights": [2, -1]},
        {"vocabulary": "base", "method": "ties"},
    ],
)
def test_verify_recomputes_aligned_tensors(two_llamas, tmp_path, options):
    from terge.audit import verify_lineage

    a, b, *_ = two_llamas
    out = terge.merge([a, b], out=tmp_path / "out", seed=0, **options)
    lineage = terge.load_lineage(out / "lineage.json")
    assert lineage.vocabulary["tensors"]
    assert verify_lineage(lineage, out) == []


def test_verify_finds_a_changed_row_and_a_changed_tokenizer(two_llamas, tmp_path):
    from safetensors.torch import load_file, save_file

    from terge.audit import verify_lineage

    a, b, *_ = two_llamas
    copy = tmp_path / "b"
    copy.mkdir()
    for name in os.listdir(b):
        (copy / name).write_bytes((Path(b) / name).read_bytes())
    out = terge.merge([a, str(copy)], vocabulary="union", out=tmp_path / "out")
    lineage = terge.load_lineage(out / "lineage.json")
    tensors = load_file(out / "model.safetensors")
    tensors[EMBED][6] += 1
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    assert verify_lineage(lineage, out) == [
        (EMBED, "the checkpoint's tensor differs from the recomputed one")
    ]
    other = word_level("red green green yellow pink grey")  # as many tokens, one other
    other.add_special_tokens(["<|im_start|>"])
    other.save(str(copy / "tokenizer.json"))
    assert HEAD in dict(verify_lineage(lineage, out))  # its rows are now other tokens'
    word_level("red green yellow pink grey blue white").save(str(copy / "tokenizer.json"))
    problems = dict(verify_lineage(lineage, out))
    assert problems[HEAD] == (
        "aligned by token (vocabulary=...): the models' tokenizers now make 9 rows, not the 8 "
        "recorded"
    )
    (Path(a) / "tokenizer.json").rename(tmp_path / "moved.json")
    try:
        problems = dict(verify_lineage(lineage, out))
    finally:
        (tmp_path / "moved.json").rename(Path(a) / "tokenizer.json")
    assert "its vocabulary cannot be rebuilt (models[0]: no tokenizer.json" in problems[HEAD]


def test_verify_finds_an_edited_row_group(two_llamas, tmp_path):
    """The row groups a lineage records are compared with the ones rebuilt from the tokenizers:
    weights edited in a group fail, though the tensor recomputes from the entry as written."""
    from terge.audit import verify_lineage

    a, b, *_ = two_llamas
    out = terge.merge([a, b], vocabulary="union", out=tmp_path / "out")
    path = out / "lineage.json"
    data = json.loads(path.read_text())
    (merged,) = [g for g in data["vocabulary"]["tensors"][HEAD] if g["models"] == [0, 1]]
    assert merged["weights"] == [0.5, 0.5]
    merged["weights"] = [0.25, 0.75]
    path.write_text(json.dumps(data))
    assert verify_lineage(terge.load_lineage(path), out) == [
        (
            HEAD,
            "aligned by token (vocabulary=...): its row groups, rebuilt from the tokenizers, "
            "differ from the recorded ones",
        )
    ]


def test_verify_of_an_aligned_lineage_edited_to_a_separate_base_names_the_tensors(
    two_llamas, tmp_path
):
    """A merge aligned by token has its base among the models; a lineage edited to name a
    separate base cannot rebuild the vocabulary, and says so per aligned tensor."""
    from terge.audit import verify_lineage

    a, b, *_ = two_llamas
    out = terge.merge([a, b], vocabulary="union", out=tmp_path / "out")
    path = out / "lineage.json"
    data = json.loads(path.read_text())
    data["base"] = {"index": "separate", "kind": "file", "path": str(a)}
    path.write_text(json.dumps(data))
    problem = (
        "aligned by token (vocabulary=...): its vocabulary cannot be rebuilt (the base was given "
        "apart from the models)"
    )
    assert verify_lineage(terge.load_lineage(path), out) == [(HEAD, problem), (EMBED, problem)]


def test_the_bases_index_names_the_base_vocabulary(two_llamas, tmp_path):
    a, b, *_ = two_llamas
    out = terge.merge([a, b], vocabulary=0, out=tmp_path / "out")
    assert (out / "tokenizer.json").read_bytes() == (Path(a) / "tokenizer.json").read_bytes()
    assert json.loads((out / "lineage.json").read_text())["vocabulary"]["source"] == "base"


# --- the module's rules, one at a time ----------------------------------------------------


def copy_folder(source: str, target: Path) -> Path:
    target.mkdir()
    for name in os.listdir(source):
        (target / name).write_bytes((Path(source) / name).read_bytes())
    return target


def test_a_negative_index_names_the_model_it_counts_back_to(two_llamas):
    a, b, *_ = two_llamas
    _, lineage = terge.merge([a, b], vocabulary=-1, lineage=True)
    assert lineage.vocabulary["source"] == 1
    _, lineage = terge.merge([a, b], vocabulary=-2, lineage=True)  # the base's
    assert lineage.vocabulary["source"] == "base"
    with pytest.raises(VocabularyError, match=r"is -3, .* pass an index from -2 to 1, 'base'"):
        terge.merge([a, b], vocabulary=-3)


def test_a_base_at_another_index_owns_the_base_vocabulary(two_llamas):
    a, b, states, vocabs, _ = two_llamas
    merged = terge.merge([b, a], base=1, vocabulary="base")
    check_rows(merged, vocabs[0], states, vocabs)


def test_tokenizers_given_as_folders_bring_their_folders_files(two_llamas, tmp_path, monkeypatch):
    """A folder (or ``~/...``) in ``tokenizers`` is where the named model's tokenizer files come
    from, even for a model in memory."""
    a, _, states, vocabs, root = two_llamas
    monkeypatch.setenv("HOME", str(root))
    out = terge.merge(list(states), vocabulary=1, tokenizers=[a, "~/b"], out=tmp_path / "out")
    got = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab()
    assert got == vocabs[1]
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["added_tokens_decoder"][str(vocabs[1]["<|im_start|>"])]["special"] is True


def test_read_vocabulary_keeps_the_tokenizer_only_where_asked(two_llamas):
    a, *_ = two_llamas
    kept = terge.vocabulary.read_vocabulary(Path(a), None, None, "models[0]")
    dropped = terge.vocabulary.read_vocabulary(Path(a), None, None, "models[0]", keep=False)
    assert isinstance(kept.tokenizer, tokenizers.Tokenizer) and dropped.tokenizer is None
    assert dropped.tokens == kept.tokens and dropped.folder == Path(a)


def test_an_empty_tokenizer_is_refused(two_llamas):
    _, b, states, *_ = two_llamas
    empty = tokenizers.Tokenizer(tokenizers.models.WordLevel({}, "<unk>"))
    with pytest.raises(VocabularyError, match=r"models\[0\]'s vocabulary is empty \(0 rows\)"):
        terge.merge(list(states), vocabulary="base", tokenizers=[empty, Path(b)])


def test_ids_up_to_the_sparse_limit_are_read():
    """Ids up to twice the token count plus 1024 are a vocabulary's; one more is refused."""
    sparse = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "b": 1027}, "a"))
    assert vocabulary_of(sparse).rows == 1028
    sparse = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "b": 1028}, "a"))
    with pytest.raises(VocabularyError, match=r"ids up to 1028 to only 2 tokens"):
        vocabulary_of(sparse)


@pytest.mark.parametrize("config", ['{"vocab_size": 0}', '{"vocab_size": true}', "{", None])
def test_a_config_without_a_usable_vocab_size_leaves_the_tokenizers_size(
    two_llamas, tmp_path, config
):
    a, b, states, vocabs, _ = two_llamas
    folder = copy_folder(a, tmp_path / "a")
    if config is None:
        (folder / "config.json").unlink()
    else:
        (folder / "config.json").write_text(config)
    assert terge.vocabulary.config_rows(folder) is None
    merged = terge.merge([str(folder), b], vocabulary="base")
    check_rows(merged, vocabs[0], states, vocabs)


def test_a_vocab_size_no_tensor_has_is_refused(two_llamas, tmp_path):
    a, b, *_ = two_llamas
    folder = copy_folder(a, tmp_path / "a")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 7}))  # < 8, 16
    with pytest.raises(VocabularyError, match=r"vocab_size 7, but none of its tensors has 7"):
        terge.merge([str(folder), b], vocabulary="base")


def test_a_tokenizer_over_a_gib_is_not_read(two_llamas, tmp_path):
    a, b, *_ = two_llamas
    folder = copy_folder(a, tmp_path / "a")
    with open(folder / "tokenizer.json", "r+b") as file:
        file.truncate((1 << 30) + 1)  # sparse: nothing is written
    with pytest.raises(VocabularyError, match=r"is 1073741825 bytes, more than the 1073741824"):
        terge.merge([str(folder), b], vocabulary="base")


def test_a_sentencepiece_bpe_folder_is_named(two_llamas, tmp_path):
    a, b, *_ = two_llamas
    folder = copy_folder(a, tmp_path / "a")
    (folder / "tokenizer.json").unlink()
    (folder / "sentencepiece.bpe.model").write_bytes(b"")
    with pytest.raises(VocabularyError, match=r"holds sentencepiece.bpe.model, a slow tokenizer"):
        terge.merge([str(folder), b], vocabulary="base")


def test_a_union_over_a_base_smaller_than_its_tokenizer_is_refused(two_llamas, tmp_path):
    """The union's new ids come after the base's: the base's own ids must still fit its rows."""
    a, b, *_ = two_llamas
    folder = copy_folder(a, tmp_path / "small")
    word_level("red green blue one two three four").save(str(folder / "tokenizer.json"))
    with pytest.raises(VocabularyError, match=r"has 9 ids but its vocabulary tensors have 5 rows"):
        terge.merge([str(folder), b], vocabulary="union", out=tmp_path / "out")


def vocabulary_of(tokenizer, rows=None):
    return terge.vocabulary.read_vocabulary(tokenizer, None, rows, "a model")


def fixed(tokens: list[str]) -> tokenizers.Tokenizer:
    """A WordLevel tokenizer whose ids are the order of ``tokens``."""
    vocab = {token: i for i, token in enumerate(tokens)}
    return tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=tokens[0]))


def test_a_union_appends_model_by_model_in_their_id_order():
    base = vocabulary_of(fixed(["<unk>", "a", "b"]))
    one = vocabulary_of(fixed(["<unk>", "z", "b", "y"]))
    two = vocabulary_of(fixed(["x", "a", "w"]))
    output = terge.vocabulary.output_vocabulary([base, one, two], 0, "union")
    assert list(output.tokens.items())[3:] == [("z", 3), ("y", 4), ("x", 5), ("w", 6)]
    assert output.added == ((1, "z"), (1, "y"), (2, "x"), (2, "w"))
    assert output.rows == 7
    assert output.index[1].tolist() == [0, -1, 2, 1, 3, -1, -1]
    assert output.index[2].tolist() == [-1, 1, -1, -1, -1, 0, 2]
    # the base named by its index elsewhere than 0
    output = terge.vocabulary.output_vocabulary([one, base], 1, "union")
    assert list(output.tokens)[3:] == ["z", "y"] and output.owner == 1


def test_padding_rows_of_the_owner_and_of_a_union():
    """A resized base's padding rows are copied from it; a union's new tokens take their ids
    (one row per token); a union that adds nothing keeps the base's rows."""
    padded = vocabulary_of(fixed(["<unk>", "a", "b"]), rows=5)
    other = vocabulary_of(fixed(["<unk>", "b", "c"]))
    output = terge.vocabulary.output_vocabulary([padded, other], 0, "base")
    assert output.index[0].tolist() == [0, 1, 2, 3, 4] and output.identity is False
    assert output.index[1].tolist() == [0, -1, 1, -1, -1]
    named = terge.vocabulary.output_vocabulary([other, padded], 0, 1)
    assert named.rows == 5 and named.index[1].tolist() == [0, 1, 2, 3, 4]
    union = terge.vocabulary.output_vocabulary([padded, other], 0, "union")
    assert union.rows == 4 and union.tokens["c"] == 3
    assert union.index[0].tolist() == [0, 1, 2, -1]
    subset = vocabulary_of(fixed(["<unk>", "b"]))
    union = terge.vocabulary.output_vocabulary([padded, subset], 0, "union")
    assert union.rows == 5 and union.added == ()
    assert terge.vocabulary.tokenizer_files(union, [padded, subset]) is None  # the base's files


def test_identity_needs_every_model_in_place():
    base = vocabulary_of(fixed(["<unk>", "a", "b"]))
    same = vocabulary_of(fixed(["<unk>", "a", "b"]))
    swapped = vocabulary_of(fixed(["<unk>", "b", "a"]))
    assert terge.vocabulary.output_vocabulary([base, same], 0, "base").identity
    assert not terge.vocabulary.output_vocabulary([base, swapped], 0, "base").identity


def test_row_ranges_sorts_and_runs():
    row_ranges = terge.vocabulary.row_ranges
    assert row_ranges(torch.tensor([7, 3, 0, 1, 4])) == [[0, 2], [3, 5], [7, 8]]
    assert row_ranges(torch.tensor([], dtype=torch.int64)) == []


@pytest.mark.parametrize(
    "model",
    [
        tokenizers.models.WordPiece({"[UNK]": 0, "red": 1, "green": 2}, unk_token="[UNK]"),
        tokenizers.models.BPE({"r": 0, "e": 1, "d": 2, "re": 3}, [("r", "e")]),
        tokenizers.models.Unigram([("<unk>", 0.0), ("red", -1.0), ("green", -1.0)], 0, False),
    ],
    ids=["WordPiece", "BPE", "Unigram"],
)
def test_which_tokenizer_models_a_union_extends(model):
    base = tokenizers.Tokenizer(model)
    other = fixed(["<unk>", "x", "<t>", "y"])
    other.add_special_tokens([tokenizers.AddedToken("<t>", lstrip=True)])
    vocabularies = [vocabulary_of(base), vocabulary_of(other)]
    output = terge.vocabulary.output_vocabulary(vocabularies, 0, "union")
    if isinstance(model, tokenizers.models.Unigram):
        with pytest.raises(VocabularyError, match=r"models\[1\]'s token 'x' .* 'Unigram'"):
            terge.vocabulary.tokenizer_files(output, vocabularies)
        return
    files = terge.vocabulary.tokenizer_files(output, vocabularies)
    union = tokenizers.Tokenizer.from_str(files["tokenizer.json"])
    assert {t: union.token_to_id(t) for t in output.tokens} == dict(output.tokens)
    added = {t.content: t for t in union.get_added_tokens_decoder().values()}
    assert added["<t>"].lstrip is True and added["<t>"].special is True
    assert "x" not in added  # a vocabulary token joins the model's vocabulary
    first = next(iter(output.tokens))  # a base token given another id than the base's
    tampered = dataclasses.replace(output, tokens={**output.tokens, first: 99})
    with pytest.raises(
        VocabularyError, match=rf"not give 1 tokens their ids \(first {re.escape(repr(first))}"
    ):
        terge.vocabulary.tokenizer_files(tampered, vocabularies)


def test_a_named_models_tokenizer_files(two_llamas, tmp_path):
    """vocabulary=<index> writes that model's tokenizer_config.json (its added tokens in id
    order, as UTF-8) and special_tokens_map.json; a config that is a link out of its folder is
    not read, and one that is not a JSON object is refused."""
    a, b, *_ = two_llamas
    folder = copy_folder(b, tmp_path / "b")
    tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.add_tokens([tokenizers.AddedToken(t, normalized=True) for t in ("<é>", "<c>", "<d>")])
    tokenizer.add_special_tokens(["<e>", "<f>"])
    save(folder, llama(tokenizer.get_vocab_size(), 2), tokenizer)
    (folder / "special_tokens_map.json").write_text('{"bos_token": "<s>"}')
    out = terge.merge([a, str(folder)], vocabulary=1, out=tmp_path / "out")
    text = (out / "tokenizer_config.json").read_text(encoding="utf-8")
    assert text.endswith("}\n") and '"<é>"' in text
    decoder = json.loads(text)["added_tokens_decoder"]
    assert list(decoder) == sorted(decoder, key=int) and len(decoder) == 8
    assert decoder[str(tokenizer.token_to_id("<c>"))]["normalized"] is True
    assert (out / "special_tokens_map.json").read_text() == '{"bos_token": "<s>"}'

    (folder / "tokenizer_config.json").unlink()
    (tmp_path / "outside.json").write_text("{}")
    (folder / "tokenizer_config.json").symlink_to(tmp_path / "outside.json")
    out = terge.merge([a, str(folder)], vocabulary=1, out=tmp_path / "linked")
    assert not (out / "tokenizer_config.json").exists()

    (folder / "tokenizer_config.json").unlink()
    (folder / "tokenizer_config.json").write_text("[]")
    with pytest.raises(VocabularyError, match=r"tokenizer_config.json is not a JSON object"):
        terge.merge([a, str(folder)], vocabulary=1, out=tmp_path / "listed")
