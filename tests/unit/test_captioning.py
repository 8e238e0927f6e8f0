"""CoCa caption generation (greedy and beam search) and the captioning eval metrics."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from clipkit.config import CONF_DIR
from clipkit.data.eval_reader import EvalBatch
from clipkit.errors import ClipkitConfigError
from clipkit.eval.captioning import corpus_scores, evaluate_captioning
from clipkit.models.captioning import beam_search, generate_captions, greedy_search
from clipkit.recipe import build_towers

SOT, EOT = 0, 1
# A Markov "decoder" over 4 tokens: log P(next | last). From SOT, token 2 looks best (0.6)
# but leads to a poor continuation; token 3 (0.4) leads to a near-certain EOT.
TABLE = torch.log(torch.tensor([
    [0.0, 0.0, 0.6, 0.4],    # after SOT
    [0.25, 0.25, 0.25, 0.25],  # after EOT (unused)
    [0.0, 0.3, 0.35, 0.35],  # after 2
    [0.0, 0.95, 0.03, 0.02],  # after 3
]).clamp_min(1e-12))


def markov(prefix: torch.Tensor) -> torch.Tensor:
    return TABLE[prefix[:, -1]]


def exhaustive_best(max_len: int, length_penalty: float) -> list[int]:
    best, best_seq = -math.inf, None
    for n in range(1, max_len):  # tokens after SOT, EOT included when it ends
        for body in itertools.product([2, 3], repeat=n - 1):
            seq = [SOT, *body, EOT]
            logp = sum(float(TABLE[a, b]) for a, b in zip(seq, seq[1:]))
            if logp / (len(seq) - 1) ** length_penalty > best:
                best, best_seq = logp / (len(seq) - 1) ** length_penalty, list(body)
    return best_seq


def test_greedy_takes_the_locally_best_token():
    assert greedy_search(markov, 2, sot_id=SOT, eot_id=EOT, max_len=4) == [[2, 2, 2], [2, 2, 2]]


def test_wide_beam_search_finds_the_exhaustive_optimum():
    for length_penalty in (0.0, 1.0):
        got = beam_search(markov, sot_id=SOT, eot_id=EOT, max_len=5, beams=16, length_penalty=length_penalty)
        assert got == exhaustive_best(5, length_penalty)
    assert beam_search(markov, sot_id=SOT, eot_id=EOT, max_len=5, beams=2, length_penalty=0.0) == [3]


def tiny_coca():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["model=tiny_coca"])
    torch.manual_seed(0)
    bundle = build_towers(cfg.model)
    return bundle.model.eval(), bundle.tokenizer


def test_coca_greedy_generation_follows_the_decoder_argmax():
    model, tokenizer = tiny_coca()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = generate_captions(model, images, sot_id=tokenizer.sot_token_id, eot_id=tokenizer.eot_token_id, max_len=6)
    assert len(ids) == 2 and all(len(seq) <= 5 for seq in ids)
    with torch.no_grad():  # replay: each generated token is the argmax given its prefix
        for i, seq in enumerate(ids):
            prefix = [tokenizer.sot_token_id]
            for token in seq:
                logits = model(images[i:i + 1], torch.tensor([prefix]), output_labels=False)["logits"][0, -1]
                assert int(logits.argmax()) == token
                prefix.append(token)
    beams = generate_captions(model, images, sot_id=tokenizer.sot_token_id, eot_id=tokenizer.eot_token_id,
                              max_len=6, beams=3)
    assert len(beams) == 2 and all(len(seq) <= 5 for seq in beams)


def test_captioning_eval_reports_ce_bleu_and_cider():
    model, tokenizer = tiny_coca()
    batch = EvalBatch(images=torch.randn(3, 3, 32, 32), captions=[["a photo of the digit 1"], ["a photo of the digit 2",
                      "a photo of a two"], ["a photo of the digit 3"]], labels=torch.tensor([1, 2, 3]), keys=["a", "b", "c"])
    metrics, captions = evaluate_captioning(model, [batch], tokenizer, device=torch.device("cpu"))
    assert abs(metrics["caption_ce"] - math.log(49408)) < 0.5  # untrained: near uniform
    assert 0.0 <= metrics["bleu4"] <= 1.0 and metrics["cider"] >= 0.0
    assert [c["references"] for c in captions] == batch.captions


def test_corpus_scores_are_perfect_for_exact_captions_and_lower_otherwise():
    refs = [["a photo of the digit one"], ["a photo of the digit two"], ["a photo of the digit three"]]
    perfect = corpus_scores(["A photo of the digit one.", "a photo of the digit two", "a photo of the digit three"], refs)
    assert perfect["bleu4"] > 0.99
    worse = corpus_scores(["a photo of the digit two", "a photo of the digit one", "a digit"], refs)
    assert worse["bleu4"] < perfect["bleu4"] and worse["cider"] < perfect["cider"]


def test_captioning_task_the_run_cannot_do_is_refused_before_training():
    from clipkit.eval.suite import EvalSetSpec, check_captioning

    specs = [EvalSetSpec("digits", [], ["zeroshot_classification", "captioning"], None, None)]
    with pytest.raises(ClipkitConfigError, match="needs a CoCa model"):
        check_captioning(specs, nn.Linear(1, 1))
    coca = nn.Module()
    coca.text_decoder = nn.Identity()
    check_captioning(specs, coca, zero_stage=3, world_size=1)
    check_captioning(specs, coca, zero_stage=2, world_size=4)
    with pytest.raises(ClipkitConfigError, match="cannot run under ZeRO-3 on 2 ranks"):
        check_captioning(specs, coca, zero_stage=3, world_size=2)
    retrieval_only = [EvalSetSpec("digits", [], ["retrieval"], None, None)]
    check_captioning(retrieval_only, nn.Linear(1, 1), zero_stage=3, world_size=2)
