"""Text roles (`data.texts`): several texts per image, each role read, chosen and tokenized on its own.

    data.texts:
      alt:  {sources: [txt]}
      long: {sources: ["json:long_caption"], k: 4, select: subcaptions, context_length: 248, required: false}
      neg:  {sources: ["json:negatives"], k: 2, select: sample, negative: true, required: false}

A role's pool is the concatenation of its sources' texts, in order: a tar member (`txt`,
`long.txt`) is one text, its whole stripped content; a `.json` field (`json:a.b`, a dotted
path) is a string (one text) or a list of strings (empty ones dropped). Per step the role
gives K texts per image (`select`):

    as_is        the first K texts of the pool
    sample       K distinct texts drawn from the pool; with `probs` (one weight per source)
                 each draw picks a source by weight, then one of its texts uniformly (K=1:
                 open_clip's weighted choice among several caption keys)
    subcaptions  the pool split into sentences (after `.`, `!`, `?` followed by a space or
                 the end, and at newlines); K sub-captions of `merge` = [lo, hi] sentences,
                 consecutive half the time and any sentences (in order) the other half
                 (FLAIR's sampling; DreamLIP's merged sentences), distinct where the pool allows

Fewer than K texts leave masked slots (the tokens of ""). The choice is drawn from
`random.Random(f"texts/{seed}/{epoch}/{url}#{key}/{role}")`: a pure function of the sample and
its epoch, so it is the same at any world size, worker count and after a resume.

A sample without a usable text of a required role is skipped and counted (`role_skip_reasons`);
an optional role without one gives an all-False mask row.
"""

from __future__ import annotations

import json
import keyword
import math
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import torch

from clipkit.errors import ClipkitConfigError

SELECTS = ("as_is", "sample", "subcaptions")
# Batch and model outputs already named text_tokens / text_mask; text_<r>_valid is each role's mask.
RESERVED_ROLES = ("tokens", "mask")
JSON_PREFIX = "json:"
JSON_REASONS = ("json not utf-8", "json invalid")
# A sub-caption draw that keeps repeating chosen ones gives up after this many tries per slot
# and takes the first unchosen combinations in order (only reachable with tiny pools).
_SUBCAPTION_TRIES = 64
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\s*\n\s*")
_MEMBER = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*$")


@dataclass(frozen=True)
class TextSource:
    """One source of a role: a tar member extension (`member`) or a `.json` field path (`field`)."""

    spec: str
    member: str | None = None
    field: tuple[str, ...] | None = None


@dataclass(frozen=True)
class TextRole:
    """One `data.texts.<name>`, checked (see the module docstring)."""

    name: str
    sources: tuple[TextSource, ...]
    k: int = 1
    select: str = "as_is"
    probs: tuple[float, ...] | None = None
    merge: tuple[int, int] = (1, 3)
    context_length: int | None = None
    required: bool = True
    negative: bool = False

    @property
    def members(self) -> tuple[str, ...]:
        return tuple(s.member for s in self.sources if s.member is not None)

    @property
    def reads_json(self) -> bool:
        return any(s.field is not None for s in self.sources)


def parse_source(spec: str, where: str) -> TextSource:
    if not isinstance(spec, str) or not spec.strip():
        raise ClipkitConfigError(f"{where} must be a member extension (txt, long.txt) or json:<field>, got {spec!r}")
    if spec.startswith(JSON_PREFIX):
        path = tuple(spec[len(JSON_PREFIX):].split("."))
        if not all(path):
            raise ClipkitConfigError(f"{where}={spec!r}: the json field path has an empty part")
        return TextSource(spec, field=path)
    member = spec.lower()
    if not _MEMBER.match(member) or member == "json":
        raise ClipkitConfigError(f"{where}={spec!r} is not a tar member extension like txt or long.txt "
                                 f"(a .json field is json:<field>)")
    return TextSource(spec, member=member)


def check_role_name(name: Any) -> str:
    """A role name: a Python identifier that does not collide with the batch's other keys."""
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise ClipkitConfigError(f"data.texts role name {name!r} must be a Python identifier")
    if name in RESERVED_ROLES or name.endswith("_valid"):
        raise ClipkitConfigError(f"data.texts role name {name!r} is reserved (text_{name} would collide with "
                                 f"another output); choose another name")
    return name


def make_role(name: str, sources: Sequence[str], *, k: int = 1, select: str = "as_is",
              probs: Sequence[float] | None = None, merge: Sequence[int] = (1, 3), context_length: int | None = None,
              required: bool = True, negative: bool = False) -> TextRole:
    """A checked `TextRole`; each problem is a one-line ClipkitConfigError naming the key."""
    where = f"data.texts.{check_role_name(name)}"
    if not sources:
        raise ClipkitConfigError(f"{where}.sources is empty; give at least one (txt, long.txt or json:<field>)")
    parsed = tuple(parse_source(s, f"{where}.sources[{i}]") for i, s in enumerate(sources))
    if len({s.spec for s in parsed}) != len(parsed):
        raise ClipkitConfigError(f"{where}.sources lists a source twice: {list(sources)}")
    if select not in SELECTS:
        raise ClipkitConfigError(f"{where}.select must be one of {'|'.join(SELECTS)}, got {select!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ClipkitConfigError(f"{where}.k must be an integer >= 1, got {k!r}")
    if probs is not None:
        probs = tuple(float(p) for p in probs)
        if select != "sample":
            raise ClipkitConfigError(f"{where}.probs only applies to select: sample, not {select}")
        if len(probs) != len(parsed):
            raise ClipkitConfigError(f"{where}.probs has {len(probs)} weights for {len(parsed)} sources")
        if any(not math.isfinite(p) or p < 0 for p in probs) or not sum(probs) > 0:
            raise ClipkitConfigError(f"{where}.probs must be finite, >= 0 and not all 0, got {list(probs)}")
    merge = tuple(merge)
    if len(merge) != 2 or not all(isinstance(m, int) and not isinstance(m, bool) for m in merge) \
            or not 1 <= merge[0] <= merge[1]:
        raise ClipkitConfigError(f"{where}.merge must be [lo, hi] with 1 <= lo <= hi, got {list(merge)}")
    if context_length is not None and (isinstance(context_length, bool) or not isinstance(context_length, int)
                                       or context_length < 2):
        raise ClipkitConfigError(f"{where}.context_length must be an integer >= 2 or null, got {context_length!r}")
    return TextRole(name, parsed, k, select, probs, (merge[0], merge[1]), context_length, bool(required),
                    bool(negative))


def roles_from_config(texts: Any) -> tuple[TextRole, ...] | None:
    """`data.texts` (a plain mapping role -> settings, or None) -> checked roles (None: today's one caption).

    Each role's keys and types are checked against `clipkit.schema.TextRoleConfig` first."""
    from omegaconf import OmegaConf

    from clipkit.schema import TextRoleConfig, load_section

    if texts is None:
        return None
    if OmegaConf.is_config(texts):
        texts = OmegaConf.to_container(texts, resolve=True)
    if not isinstance(texts, Mapping) or not texts:
        raise ClipkitConfigError(f"data.texts must be a mapping role -> settings (or null), got {texts!r}")
    roles = []
    for name, raw in texts.items():
        check_role_name(name)
        cfg = load_section(TextRoleConfig, raw if raw is not None else {}, f"data.texts.{name}")
        roles.append(make_role(name, cfg.sources, k=cfg.k, select=cfg.select, probs=cfg.probs, merge=cfg.merge,
                               context_length=cfg.context_length, required=cfg.required, negative=cfg.negative))
    if all(role.negative for role in roles):
        raise ClipkitConfigError("data.texts has only negative roles; at least one role must give positives")
    return tuple(roles)


def role_skip_reasons(roles: Sequence[TextRole] | None) -> tuple[str, ...]:
    """The skip reasons the roles add to `clipkit.data.tar_reader.SKIP_REASONS` (none without roles)."""
    if not roles:
        return ()
    reasons: list[str] = list(JSON_REASONS) if any(r.reads_json for r in roles) else []
    for role in roles:
        if role.required:
            reasons += [f"missing text {role.name}", f"empty text {role.name}", f"text {role.name} not utf-8"]
            if role.reads_json:
                reasons.append(f"text {role.name} not a string")
    return tuple(reasons)


def kept_members(roles: Sequence[TextRole]) -> frozenset[str]:
    """The tar member extensions the reader keeps for the roles (`json` when one reads a field)."""
    members = {m for role in roles for m in role.members}
    if any(role.reads_json for role in roles):
        members.add("json")
    return frozenset(members)


# -- a sample's pools ------------------------------------------------------------------------

RoleTexts = tuple[tuple[str, ...], ...]   # per source, its texts


def _json_field(document: dict, path: tuple[str, ...]) -> Any:
    value: Any = document
    for part in path:
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def read_roles(roles: Sequence[TextRole], members: Mapping[str, bytes]) -> tuple[dict[str, RoleTexts] | None, str]:
    """`({role: texts per source}, "")` from a sample's member bytes, or `(None, skip reason)`.

    A problem of one source (missing, empty, not utf-8, not a string) only matters when the
    role's whole pool ends up empty: a required role then skips the sample with the most
    telling reason (not utf-8, not a string, empty, missing); an optional role is left empty.
    A `.json` that is not utf-8 or not a JSON object skips the sample whenever a role reads it.
    """
    document: dict | None = None
    if any(role.reads_json for role in roles) and "json" in members:
        try:
            document = json.loads(members["json"].decode("utf-8"))
        except UnicodeDecodeError:
            return None, "json not utf-8"
        except ValueError:
            return None, "json invalid"
        if not isinstance(document, dict):
            return None, "json invalid"
    decoded: dict[str, tuple[tuple[str, ...], str]] = {}
    out: dict[str, RoleTexts] = {}
    for role in roles:
        per_source, problems = [], set()
        for source in role.sources:
            if source.member is not None:
                if source.member not in decoded:
                    decoded[source.member] = _member_texts(members.get(source.member))
                texts, problem = decoded[source.member]
            else:
                texts, problem = _field_texts(None if document is None else _json_field(document, source.field))
            per_source.append(texts)
            problems.add(problem)
        if role.required and not any(per_source):
            worst = next(p for p in ("not utf-8", "not a string", "empty", "missing") if p in problems)
            return None, (f"text {role.name} {worst}" if worst.startswith("not") else f"{worst} text {role.name}")
        out[role.name] = tuple(per_source)
    return out, ""


def _member_texts(data: bytes | None) -> tuple[tuple[str, ...], str]:
    if data is None:
        return (), "missing"
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        return (), "not utf-8"
    return ((text,), "") if text else ((), "empty")


def _field_texts(value: Any) -> tuple[tuple[str, ...], str]:
    if value is None:
        return (), "missing"
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        return (), "not a string"
    texts = tuple(t for t in (item.strip() for item in items) if t)
    return (texts, "") if texts else ((), "empty")


# -- selection -------------------------------------------------------------------------------

def role_rng(seed: int, epoch: int, url: str, key: str, role: str) -> random.Random:
    """The selection RNG of one sample's role in one epoch (layout-independent, see the module docstring)."""
    return random.Random(f"texts/{seed}/{epoch}/{url}#{key}/{role}")


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`: cut after `.`, `!`, `?` followed by whitespace, and at newlines."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def select_texts(role: TextRole, texts: RoleTexts, rng: random.Random) -> list[tuple[str, tuple[int, ...]]]:
    """At most `role.k` `(text, indices)`: the indices are the text's position in the pool
    (as_is, sample) or the positions of its sentences among the pool's sentences (subcaptions)."""
    pool = [t for source in texts for t in source]
    if role.select == "as_is":
        return [(t, (i,)) for i, t in enumerate(pool[:role.k])]
    if role.select == "sample":
        return [(pool[i], (i,)) for i in _sample_indices(role, texts, rng)]
    sentences = [s for text in pool for s in split_sentences(text)]
    return [(" ".join(sentences[i] for i in chosen), chosen) for chosen in _subcaptions(role, len(sentences), rng)]


def _sample_indices(role: TextRole, texts: RoleTexts, rng: random.Random) -> list[int]:
    n = sum(len(source) for source in texts)
    if role.probs is None:
        return rng.sample(range(n), min(role.k, n))
    starts = [sum(len(s) for s in texts[:i]) for i in range(len(texts))]
    left = [list(range(start, start + len(source))) for start, source in zip(starts, texts)]
    chosen: list[int] = []
    while len(chosen) < role.k:
        open_sources = [i for i, items in enumerate(left) if items and role.probs[i] > 0]
        if not open_sources:
            break
        source = rng.choices(open_sources, [role.probs[i] for i in open_sources])[0]
        chosen.append(left[source].pop(rng.randrange(len(left[source]))))
    return chosen


def _subcaptions(role: TextRole, n: int, rng: random.Random) -> list[tuple[int, ...]]:
    if n == 0:
        return []
    lo, hi = min(role.merge[0], n), min(role.merge[1], n)
    total = sum(math.comb(n, m) for m in range(lo, hi + 1))
    want = min(role.k, total)
    chosen: list[tuple[int, ...]] = []
    tries = 0
    while len(chosen) < want and tries < _SUBCAPTION_TRIES * role.k:
        tries += 1
        m = rng.randint(lo, hi)
        if rng.random() < 0.5:
            start = rng.randrange(n - m + 1)
            pick = tuple(range(start, start + m))
        else:
            pick = tuple(sorted(rng.sample(range(n), m)))
        if pick not in chosen:
            chosen.append(pick)
    if len(chosen) < want:
        seen = set(chosen)
        rest = (c for m in range(lo, hi + 1) for c in combinations(range(n), m) if c not in seen)
        chosen += [next(rest) for _ in range(want - len(chosen))]
    return chosen


# -- tokens ----------------------------------------------------------------------------------

Tokenizer = Callable[..., torch.Tensor]


def tokenize_role(tokenize: Tokenizer, role: TextRole, chosen: Sequence[Sequence[str]]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample its chosen texts (at most K) -> `(tokens [b, K, L] int64, valid [b, K] bool)`.

    L is `role.context_length`, or the tokenizer's own length when None (open_clip tokenizers
    take `context_length`); empty slots hold the tokens of "" and are False in `valid`.
    """
    b, k = len(chosen), role.k
    flat = [texts[j] if j < len(texts) else "" for texts in chosen for j in range(k)]
    tokens = tokenize(flat) if role.context_length is None else tokenize(flat, context_length=role.context_length)
    valid = torch.tensor([[j < len(texts) for j in range(k)] for texts in chosen], dtype=torch.bool).reshape(b, k)
    return tokens.to(torch.int64).reshape(b, k, -1), valid
