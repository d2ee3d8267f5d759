"""Phase 1 end to end: ``fit`` the classifiers of a scheme, ``score`` a dataset into h̃ (docs/design.md section 4.5).

Cross-fitting: the distinct prompts are dealt into K folds (a seeded shuffle); every classifier of the
scheme is trained K times, fold f's copy on the records of the other folds. A record of the training data
is scored by the copy of its prompt's fold, which never saw that prompt, so its c is as honest as a
held-out score; those out-of-fold scores are also the report's metrics. A record whose prompt was not in
the training data (``--apply`` to new data) gets the mean of the K copies' log density ratios:
logit c = mean_f logit c_f and log γ = mean_f log γ_f.

Calibrated probabilities, also cross-fitted: fold f's classifier(s) feed a logistic regression (the
"combiner") fitted on the out-of-fold scores of the *other* folds' records, with their labels. For one
backbone it is Platt scaling of the classifier's log-odds; for an ensemble (``minilm+tfidf``) it also weighs
the members (stacking). Fitted on scores of classifiers that did not see those records, it corrects the
over- or under-confidence a classifier shows on new data, and no record's own label is used for its c.

Each trained classifier (a fold's copy; for an ensemble backbone, one per member) is saved under
``output_dir/classifiers/<key>``, where the key hashes its classes, fold, training and held-out examples and
the settings that shape it: a rerun with the same inputs reuses it (a ``minilm+tfidf`` run reuses the
classifiers of earlier ``minilm`` and ``tfidf`` runs). Beside the model the folder keeps its predictions on
its held-out fold and on a sample of its own training responses (``predictions.npz``), so the report needs
no second pass and ``score`` reads the out-of-fold c of the training data from there. The combiners are
refitted from those predictions (milliseconds) and saved in ``calibration.json``.
A classifier folder appears only complete (it is written under a temporary name and renamed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dora_engine.atomic import atomic_write, give_default_modes, temporary_dir
from dora_engine.calibration import classifier
from dora_engine.calibration.classifier import ClassifierSettings, Example
from dora_engine.calibration.metrics import classifier_metrics
from dora_engine.calibration.schemes import ClassifierSpec, SourceRule, plan
from dora_engine.data.schema import Record, RecordError
from dora_engine.data.weights import CALIBRATION_RATIO_POWER, CLAMP_EPS, check_ratio_power, h_tilde
from dora_engine.errors import UserValueError

DEFAULT_MIN_EXAMPLES = 8
BETA_CHOICES = ("uniform", "source_fraction")
CALIBRATION_FILE = "calibration.json"
CALIBRATION_FORMAT = 2
CLASSIFIER_META = "classifier.json"
PREDICTIONS = "predictions.npz"
PROBS_META_KEY = "calibration_c"
FOLD_META_KEY = "calibration_fold"
IN_FOLD_SAMPLE = 256
"""Training responses per fold's classifier scored for the in-fold metrics (all when fewer)."""


@dataclass
class FoldModel:
    """The classifier of one fold: trained on every other fold's records, scores its own fold's.

    ``paths`` holds one classifier folder per member backbone (one for a single backbone); ``combiner`` maps
    their class probabilities to calibrated ones (``apply_combiner``). ``metrics`` are out-of-fold (on this
    fold's responses), ``in_fold`` on a sample of its training responses.
    """

    fold: int
    paths: list[str]
    train_counts: list[int]
    held_out_counts: list[int]
    metrics: dict[str, Any]
    in_fold: dict[str, Any]
    reused: bool = False
    seconds: float = 0.0
    combiner: dict[str, Any] | None = None


@dataclass
class FittedClassifier:
    """A classifier of the scheme, cross-fitted: one ``FoldModel`` per fold.

    ``metrics`` are out-of-fold over every fold's responses (each scored by the fold's classifier that did
    not train on it), ``in_fold`` the same classifiers on a sample of responses they trained on;
    ``member_metrics``: each member backbone alone, out of fold (ensembles only).
    """

    spec: ClassifierSpec
    folds: list[FoldModel]
    class_counts: list[int]
    source_counts: dict[str, int]
    metrics: dict[str, Any]
    in_fold: dict[str, Any]
    member_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def reused(self) -> bool:
        return all(f.reused for f in self.folds)


@dataclass
class Calibration:
    """The result of ``fit``: what ``score`` needs to turn a dataset into h̃.

    ``folds`` maps each training prompt (``prompt_key``) to its fold.
    """

    target: str
    scheme: str
    settings: ClassifierSettings
    classifiers: dict[str, FittedClassifier]
    rules: dict[str, SourceRule]
    folds: dict[str, int]

    def gamma(self, source: str, fold: int | None = None) -> float:
        """γ of ``source``'s responses as scored by fold ``fold``'s classifier; ``None``: the geometric mean
        over the folds (the γ of a prompt outside the training data)."""
        rule = self.rules[source]
        fitted = self.classifiers[rule.classifier]
        if fold is not None:
            return rule.gamma(fitted.folds[fold].train_counts)
        return float(np.exp(np.mean([np.log(rule.gamma(f.train_counts)) for f in fitted.folds])))

    def fold_of(self, record: Record) -> int | None:
        """The fold of ``record``'s prompt, ``None`` when the prompt was not in the training data."""
        return self.folds.get(prompt_key(record))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": CALIBRATION_FORMAT,
            "target": self.target,
            "scheme": self.scheme,
            "settings": asdict(self.settings),
            "classifiers": {name: asdict(c) for name, c in self.classifiers.items()},
            "rules": {source: asdict(rule) for source, rule in self.rules.items()},
            "folds": self.folds,
        }

    def save(self, path: str | os.PathLike) -> None:
        with atomic_write(path) as handle:
            json.dump(self.to_dict(), handle, indent=1, ensure_ascii=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        """Read a ``calibration.json`` written by ``save`` (``fit`` writes one in its output folder).

        A classifier found in the ``classifiers`` folder beside the file is used from there, so that a
        calibration folder can be moved or read from another working directory.
        """
        path = Path(path)
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != CALIBRATION_FORMAT:
            raise UserValueError(
                f"{path} was written by an earlier version of dora-engine (before cross-fitted classifiers); "
                "run `dora-engine calibrate` again to fit it anew"
            )
        classifiers = {}
        for name, c in data["classifiers"].items():
            spec = ClassifierSpec(c["spec"]["name"], tuple(tuple(m) for m in c["spec"]["classes"]))
            folds = []
            for f in c["folds"]:
                paths = []
                for member in f["paths"]:
                    beside = path.parent / "classifiers" / Path(member).name
                    paths.append(str(beside) if (beside / CLASSIFIER_META).is_file() else member)
                folds.append(FoldModel(**{**f, "paths": paths}))
            classifiers[name] = FittedClassifier(**{**c, "spec": spec, "folds": folds})
        rules = {
            s: SourceRule(r["classifier"], r["target_class"], tuple(r["against"])) for s, r in data["rules"].items()
        }
        return cls(data["target"], data["scheme"], ClassifierSettings(**data["settings"]), classifiers, rules,
                   data["folds"])


def load_calibration(folder: str | os.PathLike) -> Calibration:
    """The calibration fitted in ``folder`` (the output folder of ``fit`` / ``dora-engine calibrate``, or its
    ``calibration.json``); an error saying what to pass when it holds none or its classifiers are missing."""
    folder = Path(folder)
    path = folder if folder.name == CALIBRATION_FILE and folder.is_file() else folder / CALIBRATION_FILE
    if not path.is_file():
        hint = ""
        if (folder.parent / CALIBRATION_FILE).is_file():
            hint = f" (its parent {folder.parent} is one)"
        raise UserValueError(
            f"{folder} holds no {CALIBRATION_FILE}{hint}: pass the folder `dora-engine calibrate` wrote its "
            "classifiers and report to (its --output-dir; by default <out name>-calibration beside --out)"
        )
    calibration = Calibration.load(path)
    for name, fitted in calibration.classifiers.items():
        for fold in fitted.folds:
            for member in fold.paths:
                if not Path(member, CLASSIFIER_META).is_file():
                    raise UserValueError(
                        f"{path}: classifier {name!r} of fold {fold.fold} is missing (not in {member} nor in "
                        f"{path.parent / 'classifiers'}); rerun `dora-engine calibrate` to train it again"
                    )
    return calibration


def check_records(records: list[Record]) -> list[str]:
    """The sources found in ``records`` (sorted); every prompt must have at least 2 responses."""
    if not records:
        raise UserValueError("calibration needs a non-empty dataset")
    sources: set[str] = set()
    for index, record in enumerate(records):
        if record.num_responses < 2:
            raise RecordError(
                f"record {index} (id={record.id!r}) has {record.num_responses} response(s); "
                "calibration needs at least 2 per prompt"
            )
        sources.update(r.source for r in record.responses)
    return sorted(sources)


def prompt_key(record: Record) -> str:
    """A digest of the record's prompt (text or chat list): records with the same prompt share it."""
    text = json.dumps(record.prompt, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def assign_folds(records: list[Record], folds: int, seed: int) -> dict[str, int]:
    """prompt key → fold: the distinct prompts in a seeded shuffle, dealt round-robin into ``folds`` folds
    (so fold sizes differ by at most one prompt and a prompt is never in two folds)."""
    keys = list(dict.fromkeys(prompt_key(r) for r in records))
    if len(keys) < folds:
        raise UserValueError(
            f"{folds} folds need at least {folds} distinct prompts; the data has {len(keys)} (lower --folds)"
        )
    order = np.random.default_rng(seed).permutation(len(keys))
    return {keys[j]: position % folds for position, j in enumerate(order.tolist())}


def _examples(spec: ClassifierSpec, records: list[Record]) -> list[Example]:
    out = []
    for record in records:
        prompt = record.prompt_text()
        for response in record.responses:
            label = spec.label_of(response.source)
            if label is not None:
                out.append(Example(prompt, response.text, label))
    return out


def _class_counts(examples: list[Example], num_classes: int) -> list[int]:
    return np.bincount([e.label for e in examples], minlength=num_classes).tolist()


def _digest(example: Example) -> str:
    return hashlib.sha256(json.dumps([example.prompt, example.response]).encode()).hexdigest()[:32]


def _check_enough(spec: ClassifierSpec, source_counts: Counter, min_examples: int, fold: int) -> None:
    for members in spec.classes:
        for source in members:
            if source_counts[source] < min_examples:
                raise UserValueError(
                    f"source {source!r} has {source_counts[source]} response(s) in the training folds of "
                    f"classifier {spec.name!r} for fold {fold}; at least {min_examples} are needed to train it "
                    "(add data, lower --folds or --min-examples, or drop the source)"
                )


def _cache_key(spec: ClassifierSpec, fold: int, settings: ClassifierSettings, train: list[Example],
               held: list[Example]) -> str:
    digest = hashlib.sha256()
    header = {"classes": spec.classes, "fold": fold, "settings": settings.training_identity()}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for tag, examples in (("train", train), ("held_out", held)):
        digest.update(tag.encode())
        for e in examples:
            digest.update(json.dumps([e.prompt, e.response, e.label]).encode())
    return digest.hexdigest()[:24]


def in_fold_sample(count: int, fold: int, seed: int) -> np.ndarray:
    """Sorted indices of the training responses a fold's classifier is scored on for the in-fold metrics."""
    if count <= IN_FOLD_SAMPLE:
        return np.arange(count)
    return np.sort(np.random.default_rng([seed, fold]).choice(count, IN_FOLD_SAMPLE, replace=False))


@dataclass
class _Member:
    """One trained single-backbone classifier of one fold, with its saved predictions."""

    path: str
    held_probs: np.ndarray
    in_fold_probs: np.ndarray
    reused: bool
    seconds: float


def _fit_member(
    spec: ClassifierSpec,
    fold: int,
    train: list[Example],
    held: list[Example],
    settings: ClassifierSettings,
    folder: Path,
    trust_remote_code: bool,
) -> _Member:
    sample = in_fold_sample(len(train), fold, settings.seed)
    if (folder / CLASSIFIER_META).is_file():
        seconds = json.loads((folder / CLASSIFIER_META).read_text(encoding="utf-8")).get("seconds", 0.0)
        with np.load(folder / PREDICTIONS) as saved:
            return _Member(str(folder), saved["held_probs"], saved["in_fold_probs"], reused=True, seconds=seconds)
    tmp = temporary_dir(folder)
    name = f"{spec.name} fold {fold}" + ("" if settings.backbone == "minilm" else f" ({settings.backbone})")
    start = time.perf_counter()
    try:
        classifier.train(train, len(spec.classes), settings, tmp, description=f"train {name}",
                         trust_remote_code=trust_remote_code)
        options = {"max_length": settings.max_length, "batch_size": settings.batch_size, "device": settings.device,
                   "trust_remote_code": trust_remote_code}
        held_probs = classifier.predict(tmp, held, description=f"held-out {name}", **options)
        in_fold_probs = classifier.predict(tmp, [train[i] for i in sample], description=f"in-fold {name}",
                                           **options)
        with open(tmp / PREDICTIONS, "wb") as handle:
            np.savez(handle, held_digests=np.array([_digest(e) for e in held], dtype="S32"),
                     held_probs=held_probs, held_labels=np.array([e.label for e in held], dtype=np.int64),
                     in_fold_probs=in_fold_probs,
                     in_fold_labels=np.array([train[i].label for i in sample], dtype=np.int64))
        meta = {"classes": spec.classes, "fold": fold, "settings": settings.training_identity(),
                "train_counts": _class_counts(train, len(spec.classes)),
                "held_out_counts": _class_counts(held, len(spec.classes)),
                "seconds": time.perf_counter() - start}
        (tmp / CLASSIFIER_META).write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")
        give_default_modes(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / CLASSIFIER_META).is_file():
                raise
            # another run finished the same classifier first: keep its copy
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
    return _Member(str(folder), held_probs, in_fold_probs, reused=False, seconds=meta["seconds"])


COMBINER_C = 1.0
"""L2 penalty of the combiner's logistic regression (a handful of weights fitted on thousands of scores)."""


def member_features(member_probs: list[np.ndarray]) -> np.ndarray:
    """The combiner's input: for each member, log p_j − log p_0 for every class j > 0 (binary: the log-odds)."""
    columns = []
    for probs in member_probs:
        logs = np.log(np.clip(probs, CLAMP_EPS, 1.0))
        columns.append(logs[:, 1:] - logs[:, :1])
    return np.concatenate(columns, axis=1)


def fit_combiner(member_probs: list[np.ndarray], labels: np.ndarray, num_classes: int) -> dict[str, Any] | None:
    """A logistic regression from the members' scores to calibrated class probabilities, fitted on
    (out-of-fold) scores and their labels; ``None`` when some class is missing from ``labels``."""
    from sklearn.linear_model import LogisticRegression

    from dora_engine.calibration.bow import linear_head

    if len(labels) == 0 or set(np.unique(labels).tolist()) != set(range(num_classes)):
        return None
    model = LogisticRegression(C=COMBINER_C, max_iter=2000).fit(member_features(member_probs), labels)
    coef, intercept = linear_head(model, num_classes)
    return {"coef": coef.tolist(), "intercept": intercept.tolist()}


def apply_combiner(combiner: dict[str, Any] | None, member_probs: list[np.ndarray]) -> np.ndarray:
    """Calibrated class probabilities from the members' (N, C) probabilities. Without a combiner (too little
    data to fit one): the members' log-probabilities averaged and normalised."""
    from dora_engine.calibration.bow import softmax

    if combiner is None:
        logs = np.mean([np.log(np.clip(p, CLAMP_EPS, 1.0)) for p in member_probs], axis=0)
        return softmax(logs)
    z = member_features(member_probs) @ np.asarray(combiner["coef"]).T + np.asarray(combiner["intercept"])
    return softmax(z)


def _cross_fitted(held: list[list[np.ndarray]], labels: list[np.ndarray], num_classes: int, fold: int):
    """The combiner of ``fold``: fitted on the other folds' held-out member scores (``held[g][m]``)."""
    others = [g for g in range(len(held)) if g != fold]
    if not others:
        return None
    members = [np.concatenate([held[g][m] for g in others]) for m in range(len(held[fold]))]
    return fit_combiner(members, np.concatenate([labels[g] for g in others]), num_classes)


def fit(
    records: list[Record],
    *,
    target: str,
    output_dir: str | os.PathLike,
    scheme: str = "per_source",
    settings: ClassifierSettings | None = None,
    min_examples: int = DEFAULT_MIN_EXAMPLES,
    trust_remote_code: bool = False,
) -> Calibration:
    """Cross-fit (or reuse) the classifiers of ``scheme`` on ``records`` and save ``calibration.json``
    (``trust_remote_code``: ``dora_engine.hf_loading``, an opt-in of this call that is not saved).

    The target class is always the last class of every classifier. Raises ``ValueError`` naming the
    record or source at fault: a prompt with fewer than 2 responses, a missing target, fewer distinct
    prompts than folds, a source with fewer than ``min_examples`` responses in some fold's training data.
    """
    settings = settings or ClassifierSettings()
    if min_examples < 1:
        raise UserValueError(f"min_examples must be >= 1, got {min_examples}")
    sources = check_records(records)
    specs, rules = plan(sources, target, scheme)
    members = settings.members()
    fold_of = assign_folds(records, settings.folds, settings.seed)
    record_folds = [fold_of[prompt_key(r)] for r in records]
    splits = []
    for f in range(settings.folds):
        train_records = [r for r, g in zip(records, record_folds, strict=True) if g != f]
        held_records = [r for r, g in zip(records, record_folds, strict=True) if g == f]
        counts = Counter(x.source for rec in train_records for x in rec.responses)
        for spec in sorted(specs, key=lambda sp: min(counts[s] for members_ in sp.classes for s in members_)):
            _check_enough(spec, counts, min_examples, f)  # the rarest source first
        splits.append((train_records, held_records))
    all_counts = Counter(x.source for rec in records for x in rec.responses)
    output_dir = Path(output_dir)
    fitted = {}
    for spec in specs:
        num_classes = len(spec.classes)
        target_class = num_classes - 1
        trained_folds, held, held_labels, in_fold, in_fold_labels = [], [], [], [], []
        for f, (train_records, held_records) in enumerate(splits):
            train, held_examples = _examples(spec, train_records), _examples(spec, held_records)
            trained = []
            for member in members:
                key = _cache_key(spec, f, member, train, held_examples)
                trained.append(_fit_member(spec, f, train, held_examples, member, output_dir / "classifiers" / key,
                                           trust_remote_code))
            trained_folds.append((trained, _class_counts(train, num_classes),
                                  _class_counts(held_examples, num_classes)))
            held.append([m.held_probs for m in trained])
            held_labels.append(np.array([e.label for e in held_examples], dtype=int))
            in_fold.append([m.in_fold_probs for m in trained])
            sample = in_fold_sample(len(train), f, settings.seed)
            in_fold_labels.append(np.array([train[i].label for i in sample], dtype=int))
        folds, held_all, in_fold_all = [], [], []
        for f, (trained, train_counts, held_counts) in enumerate(trained_folds):
            combiner = _cross_fitted(held, held_labels, num_classes, f)
            held_probs = apply_combiner(combiner, held[f])
            in_fold_probs = apply_combiner(combiner, in_fold[f])
            folds.append(FoldModel(
                f,
                [m.path for m in trained],
                train_counts,
                held_counts,
                _summary(classifier_metrics(held_probs, held_labels[f], target_class)),
                _summary(classifier_metrics(in_fold_probs, in_fold_labels[f], target_class)),
                reused=all(m.reused for m in trained),
                seconds=sum(m.seconds for m in trained),
                combiner=combiner,
            ))
            held_all.append(held_probs)
            in_fold_all.append(in_fold_probs)
        labels = np.concatenate(held_labels)
        member_metrics = {}
        if len(members) > 1:
            for m, member in enumerate(members):
                alone = [[probs[m]] for probs in held]
                probs = [apply_combiner(_cross_fitted(alone, held_labels, num_classes, f), alone[f])
                         for f in range(len(held))]
                member_metrics[member.backbone] = _summary(classifier_metrics(np.concatenate(probs), labels,
                                                                              target_class))
        fitted[spec.name] = FittedClassifier(
            spec,
            folds,
            _class_counts(_examples(spec, records), num_classes),
            {s: all_counts[s] for members_ in spec.classes for s in members_},
            classifier_metrics(np.concatenate(held_all), labels, target_class),
            classifier_metrics(np.concatenate(in_fold_all), np.concatenate(in_fold_labels), target_class),
            member_metrics,
        )
    calibration = Calibration(target, scheme, settings, fitted, rules, fold_of)
    calibration.save(output_dir / CALIBRATION_FILE)
    return calibration


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics without the reliability bins (kept for the whole classifier only)."""
    return {k: v for k, v in metrics.items() if k != "reliability"}


def slot_betas(record: Record, beta: str) -> np.ndarray | None:
    """β_k of each response slot: ``None`` (1/n) for ``uniform``; the prompt's share of the slot's source."""
    if beta == "uniform":
        return None
    if beta == "source_fraction":
        counts = Counter(r.source for r in record.responses)
        return np.array([counts[r.source] / record.num_responses for r in record.responses])
    raise UserValueError(f"unknown beta {beta!r}; valid: {list(BETA_CHOICES)}")


def _saved_held_out(path: str) -> dict[bytes, np.ndarray]:
    with np.load(Path(path, PREDICTIONS)) as saved:
        return dict(zip(saved["held_digests"].tolist(), saved["held_probs"], strict=True))


def fold_probabilities(
    fold: FoldModel,
    examples: list[Example],
    settings: ClassifierSettings,
    *,
    batch_size: int | None = None,
    device: str | None = None,
    description: str = "score",
    trust_remote_code: bool = False,
) -> np.ndarray:
    """Class probabilities of ``examples`` from one fold's classifier (its members combined).

    A response the classifier already scored as part of its held-out fold is read from its saved
    predictions; the others are predicted (``trust_remote_code``: ``dora_engine.hf_loading``).
    """
    out = []
    for path, member in zip(fold.paths, settings.members(), strict=True):
        saved = _saved_held_out(path)
        digests = [_digest(e).encode() for e in examples]
        missing = [i for i, d in enumerate(digests) if d not in saved]
        probs = np.empty((len(examples), len(next(iter(saved.values()))) if saved else 0))
        if missing:
            predicted = classifier.predict(
                path,
                [examples[i] for i in missing],
                max_length=member.max_length,
                batch_size=batch_size or member.batch_size,
                device=device or member.device,
                description=description,
                trust_remote_code=trust_remote_code,
            )
            if probs.shape[1] == 0:
                probs = np.empty((len(examples), predicted.shape[1]))
            probs[missing] = predicted
        for i, d in enumerate(digests):
            if d in saved:
                probs[i] = saved[d]
        out.append(probs)
    return apply_combiner(fold.combiner, out)


def source_probability(
    calibration: Calibration,
    source: str,
    examples: list[Example],
    *,
    batch_size: int | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
) -> np.ndarray:
    """c of (prompt, response) pairs scored as responses of ``source``, for prompts outside the training
    data: the folds' log-odds averaged (logit c = mean_f logit c_f);
    ``trust_remote_code``: ``dora_engine.hf_loading``."""
    rule = calibration.rules[source]
    fitted = calibration.classifiers[rule.classifier]
    logits = []
    for fold in fitted.folds:
        probs = fold_probabilities(fold, examples, calibration.settings, batch_size=batch_size, device=device,
                                   description=f"score {rule.classifier} fold {fold.fold}",
                                   trust_remote_code=trust_remote_code)
        logits.append(_logit(rule.probability(probs)))
    return _sigmoid(np.mean(logits, axis=0))


def _logit(c: np.ndarray) -> np.ndarray:
    c = np.clip(c, CLAMP_EPS, 1.0 - CLAMP_EPS)
    return np.log(c) - np.log1p(-c)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def score(
    records: list[Record],
    calibration: Calibration,
    *,
    beta: str = "uniform",
    ratio_power: float = CALIBRATION_RATIO_POWER,
    batch_size: int | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
) -> list[Record]:
    """New records with ``h_tilde`` set, each response's c in ``meta["calibration_c"]`` and the fold whose
    classifiers scored the prompt in ``meta["calibration_fold"]``.

    A record whose prompt is in the training data is scored by its fold's classifiers (out of fold); any
    other record by all folds, their log density ratios averaged (module docstring; ``calibration_fold``
    is then ``None``). Every response is scored by the classifier its source's rule names. ``beta`` and
    ``ratio_power`` (τ) shape h̃ from c (``dora_engine.data.weights``). The input is not modified.
    ``trust_remote_code``: ``dora_engine.hf_loading``.
    """
    if beta not in BETA_CHOICES:
        raise UserValueError(f"unknown beta {beta!r}; valid: {list(BETA_CHOICES)}")
    try:
        check_ratio_power(ratio_power)
    except ValueError as err:
        raise UserValueError(str(err)) from None
    check_records(records)
    folds = [calibration.fold_of(r) for r in records]
    slots: dict[tuple[str, int | None], list[tuple[int, int]]] = {}
    for i, record in enumerate(records):
        for k, response in enumerate(record.responses):
            rule = calibration.rules.get(response.source)
            if rule is None:
                raise RecordError(
                    f"record {i} (id={record.id!r}) response {k} has source {response.source!r}, which the "
                    f"calibration has no classifier for; calibrated sources: {sorted(calibration.rules)}"
                )
            slots.setdefault((rule.classifier, folds[i]), []).append((i, k))
    probs = [np.empty(r.num_responses) for r in records]
    gammas = [np.empty(r.num_responses) for r in records]
    for (name, fold), where in sorted(slots.items(), key=lambda item: (item[0][0], item[0][1] is None,
                                                                       item[0][1] or 0)):
        fitted = calibration.classifiers[name]
        examples = [Example(records[i].prompt_text(), records[i].responses[k].text) for i, k in where]
        chosen = fitted.folds if fold is None else [fitted.folds[fold]]
        per_fold = []
        for fold_model in chosen:
            class_probs = fold_probabilities(fold_model, examples, calibration.settings, batch_size=batch_size,
                                             device=device, description=f"score {name} fold {fold_model.fold}",
                                             trust_remote_code=trust_remote_code)
            per_fold.append(np.array([
                calibration.rules[records[i].responses[k].source].probability(p[None, :])[0]
                for (i, k), p in zip(where, class_probs, strict=True)
            ]))
        c = per_fold[0] if fold is not None else _sigmoid(np.mean([_logit(x) for x in per_fold], axis=0))
        for (i, k), value in zip(where, c, strict=True):
            probs[i][k] = value
            gammas[i][k] = calibration.gamma(records[i].responses[k].source, fold)
    return [
        replace(
            record,
            h_tilde=h_tilde(probs[i], gammas[i], slot_betas(record, beta), ratio_power),
            meta={**record.meta, PROBS_META_KEY: probs[i].tolist(), FOLD_META_KEY: folds[i]},
        )
        for i, record in enumerate(records)
    ]
