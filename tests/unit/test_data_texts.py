"""Text roles (`data.texts`): config checks, reading pools from members and .json fields, each
selection rule, K padding and masks, skips by reason, and texts that stay the same across a
resume, another worker count and another world size."""

import itertools
import json
import random
from collections import Counter

import pytest
import torch
from omegaconf import OmegaConf
from test_data_stream import _png, preprocess
from test_data_tar_reader import write_tar

from clipkit.data.loader import TrainLoader, build_train_loader, skip_reasons
from clipkit.data.stream import ShardStream, StreamPosition, StreamSettings
from clipkit.data.tar_reader import SKIP_REASONS, ShardReader
from clipkit.data.texts import (
    make_role,
    read_roles,
    role_rng,
    role_skip_reasons,
    roles_from_config,
    select_texts,
    split_sentences,
    tokenize_role,
)
from clipkit.data.urls import Source
from clipkit.errors import ClipkitConfigError


def char_tokenize(texts, context_length=12):
    """[n, context_length] int64: the characters' code points, 0-padded (truncated when longer)."""
    out = torch.zeros(len(texts), context_length, dtype=torch.int64)
    for i, text in enumerate(texts):
        codes = [ord(c) for c in text[:context_length]]
        out[i, :len(codes)] = torch.tensor(codes, dtype=torch.int64)
    return out


def untokenize(tokens):
    return "".join(chr(c) for c in tokens.tolist() if c)


# -- config ----------------------------------------------------------------------------------

def test_roles_from_config_fill_defaults_and_parse_sources():
    roles = roles_from_config(OmegaConf.create({
        "alt": {"sources": ["txt"]},
        "long": {"sources": ["json:caps.long", "Long.TXT"], "k": 4, "select": "subcaptions", "context_length": 248,
                 "required": False},
        "neg": {"sources": ["json:negatives"], "k": 2, "select": "sample", "negative": True, "required": False}}))
    alt, long, neg = roles
    assert (alt.name, alt.k, alt.select, alt.merge, alt.required, alt.context_length) == ("alt", 1, "as_is", (1, 3),
                                                                                        True, None)
    assert [(s.member, s.field) for s in long.sources] == [(None, ("caps", "long")), ("long.txt", None)]
    assert long.context_length == 248 and not long.required and neg.negative
    assert roles_from_config(None) is None
    assert role_skip_reasons(roles) == ("json not utf-8", "json invalid", "missing text alt", "empty text alt",
                                        "text alt not utf-8")
    assert skip_reasons(None) == SKIP_REASONS


@pytest.mark.parametrize("texts, message", [
    ({"a": {"sources": ["txt"], "select": "shuffle"}}, r"data.texts.a.select must be one of as_is\|sample\|subcap"),
    ({"a": {"sources": ["txt", "json:x"], "select": "sample", "probs": [1.0]}}, "probs has 1 weights for 2 sources"),
    ({"a": {"sources": ["txt"], "probs": [1.0]}}, "probs only applies to select: sample"),
    ({"a": {"sources": ["txt"], "select": "sample", "probs": [0.0]}}, "not all 0"),
    ({"a": {"sources": ["txt"], "k": 0}}, "data.texts.a.k must be an integer >= 1, got 0"),
    ({"a": {"sources": ["txt"], "merge": [3, 1]}}, r"merge must be \[lo, hi\] with 1 <= lo <= hi"),
    ({"a": {"sources": ["txt"], "merge": [0, 2]}}, "merge must be"),
    ({"a": {"sources": ["txt"], "merge": [1, 2, 3]}}, "merge must be"),
    ({"tokens": {"sources": ["txt"]}}, "role name 'tokens' is reserved"),
    ({"mask": {"sources": ["txt"]}}, "role name 'mask' is reserved"),
    ({"long_valid": {"sources": ["txt"]}}, "role name 'long_valid' is reserved"),
    ({"2long": {"sources": ["txt"]}}, "must be a Python identifier"),
    ({"a-b": {"sources": ["txt"]}}, "must be a Python identifier"),
    ({"a": {"sources": []}}, "data.texts.a.sources is empty"),
    ({"a": {"sources": ["txt", "txt"]}}, "lists a source twice"),
    ({"a": {"sources": ["../x"]}}, "is not a tar member extension"),
    ({"a": {"sources": ["json"]}}, "is not a tar member extension"),
    ({"a": {"sources": ["json:a..b"]}}, "empty part"),
    ({"a": {}}, "data.texts.a.sources is not set"),
    ({"a": {"sources": ["txt"], "kk": 2}}, "data.texts.a.kk is not a key of data.texts.a; did you mean"),
    ({"a": {"sources": ["txt"], "k": "many"}}, "data.texts.a.k must be an integer"),
    ({"a": {"sources": ["txt"], "negative": True}}, "only negative roles"),
    ([{"sources": ["txt"]}], "must be a mapping role -> settings"),
])
def test_bad_role_settings_are_one_line_errors(texts, message):
    with pytest.raises(ClipkitConfigError, match=message) as err:
        roles_from_config(texts)
    assert "\n" not in str(err.value)


def test_the_schema_checks_data_texts_at_validation():
    from clipkit import schema

    cfg = OmegaConf.merge(OmegaConf.structured(schema.TrainConfig),
                          {"loss": {"_target_": "clipkit.losses.ClipLoss"}, "data": {"train_urls": "x.tar"}})
    schema.validate(cfg)
    with pytest.raises(ClipkitConfigError, match="data.texts.long.select must be one of"):
        schema.validate(OmegaConf.merge(cfg, {"data": {"texts": {"long": {"sources": ["txt"], "select": "x"}}}}))
    with pytest.raises(ClipkitConfigError, match="data.texts.long.kk is not a key"):
        schema.validate(OmegaConf.merge(cfg, {"data": {"texts": {"long": {"sources": ["txt"], "kk": 1}}}}))


# -- reading pools ---------------------------------------------------------------------------

def _members(**kw):
    return {ext.replace("_", "."): v.encode() if isinstance(v, str) else v for ext, v in kw.items()}


def test_pools_from_members_and_json_fields_strings_and_lists():
    alt = make_role("alt", ["txt"])
    long = make_role("long", ["long.txt", "json:meta.long", "json:negatives"], required=False)
    doc = {"meta": {"long": "One. Two."}, "negatives": [" a ", "", "b"]}
    texts, reason = read_roles([alt, long], _members(txt=" hi \n", long_txt="L", json=json.dumps(doc)))
    assert reason == "" and texts == {"alt": (("hi",),), "long": (("L",), ("One. Two.",), ("a", "b"))}
    texts, _ = read_roles([alt, long], _members(txt="hi"))   # no .json, no long.txt: optional role left empty
    assert texts["long"] == ((), (), ())


@pytest.mark.parametrize("members, reason", [
    ({}, "missing text alt"),
    ({"txt": "  "}, "empty text alt"),
    ({"txt": b"caf\xe9"}, "text alt not utf-8"),
    ({"txt": "x", "json": b"\xff{}"}, "json not utf-8"),
    ({"txt": "x", "json": "{not json"}, "json invalid"),
    ({"txt": "x", "json": "[1, 2]"}, "json invalid"),
    ({"txt": "x", "json": json.dumps({"neg": 3})}, "text neg not a string"),
    ({"txt": "x", "json": json.dumps({"neg": ["a", 1]})}, "text neg not a string"),
    ({"txt": "x", "json": json.dumps({"neg": ["", " "]})}, "empty text neg"),
    ({"txt": "x", "json": json.dumps({"other": "a"})}, "missing text neg"),
])
def test_each_reason_a_required_role_skips_for(members, reason):
    roles = [make_role("alt", ["txt"]), make_role("neg", ["json:neg"], negative=True)]
    texts, got = read_roles(roles, {k: v.encode() if isinstance(v, str) else v for k, v in members.items()})
    assert texts is None and got == reason and reason in role_skip_reasons(roles)


def test_a_required_role_with_one_usable_source_is_kept():
    role = make_role("alt", ["txt", "json:caption"])
    texts, reason = read_roles([role], {"txt": b"caf\xe9", "json": b'{"caption": "fine"}'})
    assert reason == "" and texts["alt"] == ((), ("fine",))


def test_the_reader_counts_role_skips_and_keeps_todays_reasons_without_roles(tmp_path):
    def sample(key, **members):
        return [(f"{key}.png", _png())] + [(f"{key}.{ext.replace('_', '.')}", v.encode() if isinstance(v, str) else v)
                                           for ext, v in members.items()]
    url = write_tar(tmp_path / "a.tar", [
        *sample("good", txt="a", long_txt="L", json='{"neg": ["n1", "n2"]}'),
        *sample("nolong", txt="b", json='{"neg": "n"}'),       # long is optional
        *sample("noneg", txt="c", long_txt="L"),                # neg is required here
        *sample("badjson", txt="d", json="{"),
        *sample("notxt", long_txt="L", json='{"neg": "n"}')])
    roles = [make_role("alt", ["txt"]), make_role("long", ["long.txt"], required=False),
             make_role("neg", ["json:neg"], negative=True)]
    skipped = Counter()
    samples = list(ShardReader(skipped, roles=roles).samples(url, 0))
    assert [(s.key, s.caption, s.texts) for s in samples] == [
        ("good", None, {"alt": (("a",),), "long": (("L",),), "neg": (("n1", "n2"),)}),
        ("nolong", None, {"alt": (("b",),), "long": ((),), "neg": (("n",),)})]
    assert skipped == {"missing text neg": 1, "json invalid": 1, "missing text alt": 1}
    plain = Counter()
    assert [s.key for s in ShardReader(plain).samples(url, 0)] == ["good", "nolong", "noneg", "badjson"]
    assert plain == {"missing caption": 1} and all(s.texts is None for s in ShardReader(Counter()).samples(url, 0))


# -- selection -------------------------------------------------------------------------------

def test_as_is_takes_the_first_k_of_the_pool_in_source_order():
    role = make_role("r", ["txt", "json:x"], k=3)
    assert select_texts(role, (("a",), ("b", "c", "d")), random.Random(0)) == [("a", (0,)), ("b", (1,)), ("c", (2,))]
    assert select_texts(role, (("a",), ()), random.Random(0)) == [("a", (0,))]


def test_sample_draws_k_distinct_texts_uniformly():
    role = make_role("r", ["json:x"], k=2, select="sample")
    pool = (("a", "b", "c", "d"),)
    draws = [select_texts(role, pool, random.Random(i)) for i in range(2000)]
    assert all(len({t for t, _ in d}) == 2 and all(pool[0][i[0]] == t for t, i in d) for d in draws)
    counts = Counter(t for d in draws for t, _ in d)
    assert all(c / 4000 == pytest.approx(0.25, abs=0.03) for c in counts.values())
    assert len(select_texts(make_role("r", ["json:x"], k=5, select="sample"), pool, random.Random(0))) == 4


def test_sample_with_probs_picks_a_source_by_weight_then_a_text_of_it():
    role = make_role("r", ["txt", "json:rewrites"], k=1, select="sample", probs=[1.0, 3.0])
    pool = (("orig",), ("r1", "r2", "r3"))
    picks = Counter(select_texts(role, pool, random.Random(i))[0][1][0] for i in range(4000))
    assert picks[0] / 4000 == pytest.approx(0.25, abs=0.03)
    assert all(picks[i] / 4000 == pytest.approx(0.25, abs=0.03) for i in (1, 2, 3))
    only_first = make_role("r", ["txt", "json:rewrites"], k=3, select="sample", probs=[1.0, 0.0])
    assert select_texts(only_first, pool, random.Random(0)) == [("orig", (0,))]   # a 0-weight source is never drawn
    # A source that runs out leaves the draw to the others: k distinct texts while the pool has them.
    both = make_role("r", ["txt", "json:rewrites"], k=4, select="sample", probs=[5.0, 1.0])
    assert sorted(i for _, (i,) in select_texts(both, pool, random.Random(1))) == [0, 1, 2, 3]


def test_sentences_split_on_end_marks_and_newlines():
    assert split_sentences("A cat. It sits!  Why? e.g.x\nNew line 3.5 m") == [
        "A cat.", "It sits!", "Why?", "e.g.x", "New line 3.5 m"]


def test_subcaptions_merge_1_to_3_sentences_consecutive_half_the_time_and_distinct():
    role = make_role("r", ["txt"], k=4, select="subcaptions")
    sentences = [f"S{i}." for i in range(8)]
    pool = ((" ".join(sentences),),)
    consecutive, sizes = 0, Counter()
    for seed in range(500):
        chosen = select_texts(role, pool, random.Random(seed))
        assert len(chosen) == 4 and len({i for _, i in chosen}) == 4
        for text, indices in chosen:
            assert 1 <= len(indices) <= 3 and list(indices) == sorted(indices)
            assert text == " ".join(sentences[i] for i in indices)
            sizes[len(indices)] += 1
            consecutive += len(indices) > 1 and indices == tuple(range(indices[0], indices[0] + len(indices)))
    assert set(sizes) == {1, 2, 3}
    multi = sizes[2] + sizes[3]
    # Random picks are consecutive by chance too (2 of 8: 7/28), so the share sits above one half.
    assert 0.55 < consecutive / multi < 0.8


def test_subcaptions_of_a_short_pool_mask_what_it_cannot_fill():
    role = make_role("r", ["txt", "json:x"], k=4, select="subcaptions", merge=[1, 3])
    chosen = select_texts(role, (("One. Two.",), ()), random.Random(0))
    assert sorted(i for _, i in chosen) == [(0,), (0, 1), (1,)]   # every distinct pick, then masked
    assert select_texts(make_role("r", ["txt"], k=2, select="subcaptions", merge=[2, 3]),
                        (("Only one.",),), random.Random(0)) == [("Only one.", (0,))]
    assert select_texts(role, ((), ()), random.Random(0)) == []


def test_tokens_are_padded_to_k_with_the_empty_string_and_masked():
    role = make_role("r", ["txt"], k=3, context_length=5)
    tokens, valid = tokenize_role(char_tokenize, role, [["ab", "c"], [], ["defghij", "k", "l"]])
    assert tokens.shape == (3, 3, 5) and tokens.dtype == torch.int64 and valid.dtype == torch.bool
    assert valid.tolist() == [[True, True, False], [False] * 3, [True] * 3]
    assert [[untokenize(t) for t in row] for row in tokens] == [["ab", "c", ""], ["", "", ""], ["defgh", "k", "l"]]
    assert torch.equal(tokens[1, 0], char_tokenize([""], context_length=5)[0])
    default = tokenize_role(char_tokenize, make_role("r", ["txt"], k=1), [["x"]])[0]
    assert default.shape == (1, 1, 12)   # the tokenizer's own length


def test_open_clip_tokenizer_takes_each_roles_context_length(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    open_clip = pytest.importorskip("open_clip")
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    tokens, valid = tokenize_role(tokenizer, make_role("long", ["txt"], k=2, context_length=248), [["a b c"]])
    assert tokens.shape == (1, 2, 248) and valid.tolist() == [[True, False]]
    assert torch.equal(tokens[0, 1], tokenizer([""], context_length=248)[0])
    assert tokenize_role(tokenizer, make_role("alt", ["txt"]), [["a"]])[0].shape == (1, 1, 77)


# -- the stream and loader -------------------------------------------------------------------

ROLES = {"alt": {"sources": ["txt"]},
         "long": {"sources": ["json:long"], "k": 3, "select": "subcaptions", "context_length": 16, "required": False},
         "neg": {"sources": ["json:negatives"], "k": 2, "select": "sample", "negative": True, "required": False}}


def role_shards(root, n=4, per_shard=5):
    """n tars; every third sample lacks its long caption and negatives (optional roles)."""
    root.mkdir(parents=True, exist_ok=True)
    urls = []
    for s in range(n):
        members = []
        for i in range(per_shard):
            key = f"{s}_{i}"
            doc = {} if i % 3 == 2 else {"long": f"L{key} one. L{key} two. L{key} three. L{key} four.",
                                          "negatives": [f"N{key}a", f"N{key}b", f"N{key}c"]}
            members += [(f"{key}.png", _png(s)), (f"{key}.txt", f"A{key}".encode()),
                        (f"{key}.json", json.dumps(doc).encode())]
        urls.append(write_tar(root / f"{s:05d}.tar", members))
    return urls


def role_settings(**kw):
    return StreamSettings(**({"batch_size": 3, "streams_per_rank": 2, "shuffle_buffer": 4, "retry_delay_s": 0.0,
                              "texts": roles_from_config(ROLES)} | kw))


@pytest.fixture(scope="module")
def role_source(tmp_path_factory):
    return [Source("s", tuple(role_shards(tmp_path_factory.mktemp("roles"))))]


def test_the_stream_yields_each_roles_tokens_masks_and_the_indices_used(role_source):
    stream = ShardStream(role_source, role_settings(), preprocess=preprocess, tokenize=char_tokenize, rank=0,
                         world_size=1, seed=3)
    for batch, meta in itertools.islice(iter(stream), 8):
        assert sorted(batch) == ["image", "text_alt", "text_alt_valid", "text_long", "text_long_valid", "text_neg",
                                 "text_neg_valid"]
        assert batch["text_alt"].shape == (3, 1, 12) and batch["text_long"].shape == (3, 3, 16)
        assert batch["text_neg"].shape == (3, 2, 12) and batch["text_neg_valid"].dtype == torch.bool
        for row, key in enumerate(meta["keys"]):
            name = key.rsplit("#", 1)[1]
            assert untokenize(batch["text_alt"][row, 0]) == f"A{name}" and meta["texts"]["alt"][row] == [[0]]
            has_long = not name.endswith("_2")
            assert batch["text_long_valid"][row].tolist() == [has_long] * 3
            assert batch["text_neg_valid"][row].tolist() == [has_long] * 2
            negatives = [untokenize(t) for t in batch["text_neg"][row]]
            used = meta["texts"]["neg"][row]
            assert negatives == ([f"N{name}{'abc'[i]}" for (i,) in used] if has_long else ["", ""])
            for slot, indices in enumerate(meta["texts"]["long"][row]):
                text = " ".join(f"L{name} {['one', 'two', 'three', 'four'][i]}." for i in indices)
                assert untokenize(batch["text_long"][row, slot]) == text[:16]


def texts_by_key(batches_and_metas):
    """{(key, epoch): {role: indices}} from `(batch, meta)` pairs."""
    out = {}
    for _, meta in batches_and_metas:
        for row, (key, epoch) in enumerate(zip(meta["keys"], meta["epochs"])):
            out[key, epoch] = {role: used[row] for role, used in meta["texts"].items()}
    return out


def test_resume_mid_epoch_chooses_the_same_texts_as_an_uninterrupted_run(role_source):
    def stream(**kw):
        return ShardStream(role_source, role_settings(), preprocess=preprocess, tokenize=char_tokenize, rank=0,
                           world_size=1, seed=3, **kw)
    straight = list(itertools.islice(iter(stream()), 16))   # 20 samples per epoch: the run crosses into epoch 2
    positions = [StreamPosition(straight[i][1]["epoch"], straight[i][1]["offset"]) for i in (4, 5)]
    resumed = list(itertools.islice(iter(stream(start_batch=6, positions=positions)), 10))
    for (a, ma), (b, mb) in zip(straight[6:], resumed):
        assert ma["keys"] == mb["keys"] and ma["texts"] == mb["texts"]
        assert all(torch.equal(a[name], b[name]) for name in a if name != "image")
    epochs = texts_by_key(straight)
    same_key = [k for k, _ in epochs if (k, 0) in epochs and (k, 1) in epochs]
    assert same_key and any(epochs[k, 0]["long"] != epochs[k, 1]["long"] for k in same_key)   # epochs differ


def test_another_worker_count_or_world_size_chooses_the_same_texts(role_source, tmp_path):
    cfg = OmegaConf.create({"global_batch_size": 4, "workers": 2, "streams_per_rank": 2, "shuffle_buffer": 4,
                            "retry_delay_s": 0.0, "texts": ROLES})

    def run(world_size, workers):
        seen = {}
        for rank in range(world_size):
            train = build_train_loader(OmegaConf.merge(cfg, {"workers": workers}), role_source, preprocess=preprocess,
                                       tokenize=char_tokenize, rank=rank, world_size=world_size, seed=3,
                                       keys_dir=tmp_path / f"{world_size}_{workers}")
            metas = []
            original = train._consume
            train._consume = lambda meta, metas=metas, original=original: (metas.append((None, meta)), original(meta))
            list(itertools.islice(iter(train), 10))   # 40 samples over all ranks: 2 epochs of 20
            seen.update(texts_by_key(metas))
        return seen

    one = run(1, 0)
    assert len(one) == 40 and one == run(1, 2)
    # Another world size reads the samples in another order: (key, epoch) pairs both read agree.
    two = run(2, 1)
    common = one.keys() & two.keys()
    assert len(common) >= 20 and all(one[k] == two[k] for k in common)
    logged = [json.loads(line) for line in (tmp_path / "1_2" / "rank00000.jsonl").read_text().splitlines()]
    from_log = {(k, e): {role: used[i] for role, used in r["texts"].items()}
                for r in logged for i, (k, e) in enumerate(zip(r["keys"], r["epochs"]))}
    assert from_log == one


def test_role_skips_reach_the_loaders_stats(tmp_path):
    members = []
    for i in range(4):
        members += [(f"g{i}.png", _png()), (f"g{i}.txt", b"x"), (f"g{i}.json", b'{"negatives": ["n"]}')]
    members += [("nojson.png", _png()), ("nojson.txt", b"x"), ("bad.png", _png()), ("bad.txt", b"x"),
                ("bad.json", b"{"), ("blank.png", _png()), ("blank.txt", b" "), ("blank.json", b"{}")]
    url = write_tar(tmp_path / "0.tar", members)
    roles = {"alt": {"sources": ["txt"]}, "neg": {"sources": ["json:negatives"], "negative": True}}
    train = TrainLoader([Source("s", (url,))], StreamSettings(batch_size=4, shuffle_buffer=1,
                                                              texts=roles_from_config(roles)),
                        preprocess=preprocess, tokenize=char_tokenize, num_workers=0, rank=0, world_size=1, seed=0)
    batches = list(itertools.islice(iter(train), 3))   # three epochs of 4 good samples, the bad ones after them
    assert all(b["text_neg_valid"].all() for b in batches)
    stats = train.stats()
    assert {k: v for k, v in stats.items() if k.startswith("data/skipped/") and v} == {
        "data/skipped/missing_text_neg": 2, "data/skipped/json_invalid": 2, "data/skipped/empty_text_alt": 2}
    assert "data/skipped/text_neg_not_a_string" in stats and "data/skipped/missing_caption" in stats


def test_the_selection_rng_is_a_pure_function_of_seed_epoch_sample_and_role():
    def draw(*args):
        return role_rng(*args).random()
    assert draw(0, 1, "u.tar", "k", "a") == draw(0, 1, "u.tar", "k", "a")
    others = [(1, 1, "u.tar", "k", "a"), (0, 2, "u.tar", "k", "a"), (0, 1, "v.tar", "k", "a"),
              (0, 1, "u.tar", "j", "a"), (0, 1, "u.tar", "k", "b")]
    assert len({draw(0, 1, "u.tar", "k", "a"), *(draw(*o) for o in others)}) == 6
