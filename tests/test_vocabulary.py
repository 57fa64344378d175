"""Vocabularies that differ: rows aligned by token (``merge(..., vocabulary=...)``).

Tokenizers are trained here with ``tokenizers`` (no download); the models are tiny Llama and
GPT-2 models from configs. Every merged row is checked against a hand computation over the
models that have its token; output folders are loaded back with transformers.
"""

from __future__ import annotations

import json
import os
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
    with pytest.warns(VocabularyMismatchWarning, match=r"vocabulary='base', 'union' or a model"):
        merged, lineage = terge.merge([a, b], lineage=True)
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


def test_the_bases_index_names_the_base_vocabulary(two_llamas, tmp_path):
    a, b, *_ = two_llamas
    out = terge.merge([a, b], vocabulary=0, out=tmp_path / "out")
    assert (out / "tokenizer.json").read_bytes() == (Path(a) / "tokenizer.json").read_bytes()
    assert json.loads((out / "lineage.json").read_text())["vocabulary"]["source"] == "base"
