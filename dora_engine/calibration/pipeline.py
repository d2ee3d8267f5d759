"""Phase 1 end to end: ``fit`` the classifiers of a scheme, ``score`` a dataset into h̃ (DESIGN.md section 4).

Prompts are split into training and held-out sets (never a prompt in both). Each trained classifier (its
encoder's ``save_pretrained`` folder plus its head) is saved under ``output_dir/classifiers/<key>``, where
the key hashes its training and held-out examples, its classes and the training settings: a rerun with
the same inputs reuses it.
A classifier folder appears only complete (it is written under a temporary name and renamed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from dora_engine.atomic import atomic_write
from dora_engine.calibration import classifier
from dora_engine.calibration.classifier import ClassifierSettings, Example
from dora_engine.calibration.metrics import classifier_metrics
from dora_engine.calibration.schemes import ClassifierSpec, SourceRule, plan
from dora_engine.calibration.weights import h_tilde
from dora_engine.data.schema import Record, RecordError
from dora_engine.errors import UserValueError

DEFAULT_MIN_EXAMPLES = 8
BETA_CHOICES = ("uniform", "source_fraction")
CALIBRATION_FILE = "calibration.json"
CLASSIFIER_META = "classifier.json"
PROBS_META_KEY = "calibration_c"


@dataclass
class FittedClassifier:
    """A trained (or reused) classifier with its training counts and held-out metrics."""

    spec: ClassifierSpec
    path: str
    train_counts: list[int]
    held_out_counts: list[int]
    source_counts: dict[str, int]
    metrics: dict[str, Any]
    reused: bool = False


@dataclass
class Calibration:
    """The result of ``fit``: what ``score`` needs to turn a dataset into h̃."""

    target: str
    scheme: str
    settings: ClassifierSettings
    classifiers: dict[str, FittedClassifier]
    rules: dict[str, SourceRule]
    held_out_ids: list[str]

    def gamma(self, source: str) -> float:
        rule = self.rules[source]
        return rule.gamma(self.classifiers[rule.classifier].train_counts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "scheme": self.scheme,
            "settings": asdict(self.settings),
            "classifiers": {name: asdict(c) for name, c in self.classifiers.items()},
            "rules": {source: asdict(rule) for source, rule in self.rules.items()},
            "held_out_ids": self.held_out_ids,
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
        classifiers = {}
        for name, c in data["classifiers"].items():
            spec = ClassifierSpec(c["spec"]["name"], tuple(tuple(m) for m in c["spec"]["classes"]))
            fitted = FittedClassifier(**{**c, "spec": spec})
            beside = path.parent / "classifiers" / Path(fitted.path).name
            if (beside / CLASSIFIER_META).is_file():
                fitted.path = str(beside)
            classifiers[name] = fitted
        rules = {
            s: SourceRule(r["classifier"], r["target_class"], tuple(r["against"])) for s, r in data["rules"].items()
        }
        return cls(
            data["target"],
            data["scheme"],
            ClassifierSettings(**data["settings"]),
            classifiers,
            rules,
            data["held_out_ids"],
        )


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
        if not Path(fitted.path, CLASSIFIER_META).is_file():
            raise UserValueError(
                f"{path}: classifier {name!r} is missing (not in {fitted.path} nor in "
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


def split_by_prompt(records: list[Record], held_out: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(training, held-out) records: a seeded shuffle of whole prompts, ``held_out`` of them held out."""
    if held_out <= 0:
        return list(records), []
    count = min(len(records) - 1, max(1, round(held_out * len(records))))
    order = np.random.default_rng(seed).permutation(len(records))
    held = set(order[:count].tolist())
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


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


def _check_enough(spec: ClassifierSpec, source_counts: Counter, min_examples: int) -> None:
    for members in spec.classes:
        for source in members:
            if source_counts[source] < min_examples:
                raise UserValueError(
                    f"source {source!r} has {source_counts[source]} response(s) in the training split of "
                    f"classifier {spec.name!r}; at least {min_examples} are needed to train it "
                    "(add data, lower --held-out or --min-examples, or drop the source)"
                )


def _cache_key(spec: ClassifierSpec, settings: ClassifierSettings, train: list[Example], held: list[Example]) -> str:
    digest = hashlib.sha256()
    header = {"classes": spec.classes, "settings": settings.training_identity()}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for tag, examples in (("train", train), ("held_out", held)):
        digest.update(tag.encode())
        for e in examples:
            digest.update(json.dumps([e.prompt, e.response, e.label]).encode())
    return digest.hexdigest()[:24]


def _fit_one(
    spec: ClassifierSpec,
    train: list[Example],
    held: list[Example],
    source_counts: dict[str, int],
    settings: ClassifierSettings,
    folder: Path,
) -> FittedClassifier:
    meta_path = folder / CLASSIFIER_META
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        return FittedClassifier(
            spec,
            str(folder),
            meta["train_counts"],
            meta["held_out_counts"],
            meta["source_counts"],
            meta["metrics"],
            reused=True,
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        classifier.train(train, len(spec.classes), settings, tmp, description=f"train {spec.name}")
        held_probs = classifier.predict(
            tmp,
            held,
            max_length=settings.max_length,
            batch_size=settings.batch_size,
            device=settings.device,
            description=f"held-out {spec.name}",
        )
        target_class = len(spec.classes) - 1
        metrics = classifier_metrics(held_probs, np.array([e.label for e in held], dtype=int), target_class)
        num_classes = len(spec.classes)
        fitted = FittedClassifier(
            spec,
            str(folder),
            _class_counts(train, num_classes),
            _class_counts(held, num_classes),
            source_counts,
            metrics,
        )
        meta = {k: v for k, v in asdict(fitted).items() if k not in ("path", "reused")}
        (tmp / CLASSIFIER_META).write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")
        try:
            os.replace(tmp, folder)
        except OSError:
            if not meta_path.is_file():
                raise
            # another run finished the same classifier first: keep its copy
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
    return fitted


def fit(
    records: list[Record],
    *,
    target: str,
    output_dir: str | os.PathLike,
    scheme: str = "per_source",
    settings: ClassifierSettings | None = None,
    min_examples: int = DEFAULT_MIN_EXAMPLES,
) -> Calibration:
    """Train (or reuse) the classifiers of ``scheme`` on ``records`` and save ``calibration.json``.

    The target class is always the last class of every classifier. Raises ``ValueError`` naming the
    record or source at fault: a prompt with fewer than 2 responses, a missing target, a source with
    fewer than ``min_examples`` training responses.
    """
    settings = settings or ClassifierSettings()
    if min_examples < 1:
        raise UserValueError(f"min_examples must be >= 1, got {min_examples}")
    sources = check_records(records)
    specs, rules = plan(sources, target, scheme)
    train_records, held_records = split_by_prompt(records, settings.held_out, settings.seed)
    source_counts = Counter(r.source for rec in train_records for r in rec.responses)
    output_dir = Path(output_dir)
    fitted = {}
    for spec in specs:
        _check_enough(spec, source_counts, min_examples)
    for spec in specs:
        train, held = _examples(spec, train_records), _examples(spec, held_records)
        counts = {s: source_counts[s] for members in spec.classes for s in members}
        folder = output_dir / "classifiers" / _cache_key(spec, settings, train, held)
        fitted[spec.name] = _fit_one(spec, train, held, counts, settings, folder)
    calibration = Calibration(target, scheme, settings, fitted, rules, [r.id for r in held_records])
    calibration.save(output_dir / CALIBRATION_FILE)
    return calibration


def slot_betas(record: Record, beta: str) -> np.ndarray | None:
    """β_k of each response slot: ``None`` (1/n) for ``uniform``; the prompt's share of the slot's source."""
    if beta == "uniform":
        return None
    if beta == "source_fraction":
        counts = Counter(r.source for r in record.responses)
        return np.array([counts[r.source] / record.num_responses for r in record.responses])
    raise UserValueError(f"unknown beta {beta!r}; valid: {list(BETA_CHOICES)}")


def score(
    records: list[Record],
    calibration: Calibration,
    *,
    beta: str = "uniform",
    batch_size: int | None = None,
    device: str | None = None,
) -> list[Record]:
    """New records with ``h_tilde`` set and each response's c in ``meta["calibration_c"]``.

    Every response is scored once, by the classifier its source's rule names. The input is not modified.
    """
    if beta not in BETA_CHOICES:
        raise UserValueError(f"unknown beta {beta!r}; valid: {list(BETA_CHOICES)}")
    check_records(records)
    settings = calibration.settings
    slots: dict[str, list[tuple[int, int]]] = {name: [] for name in calibration.classifiers}
    for i, record in enumerate(records):
        for k, response in enumerate(record.responses):
            rule = calibration.rules.get(response.source)
            if rule is None:
                raise RecordError(
                    f"record {i} (id={record.id!r}) response {k} has source {response.source!r}, which the "
                    f"calibration has no classifier for; calibrated sources: {sorted(calibration.rules)}"
                )
            slots[rule.classifier].append((i, k))
    probs = [np.empty(r.num_responses) for r in records]
    gammas = [np.array([calibration.gamma(resp.source) for resp in r.responses]) for r in records]
    for name, where in slots.items():
        if not where:
            continue
        fitted = calibration.classifiers[name]
        examples = [Example(records[i].prompt_text(), records[i].responses[k].text) for i, k in where]
        class_probs = classifier.predict(
            fitted.path,
            examples,
            max_length=settings.max_length,
            batch_size=batch_size or settings.batch_size,
            device=device or settings.device,
            description=f"score {name}",
        )
        for (i, k), p in zip(where, class_probs, strict=True):
            probs[i][k] = calibration.rules[records[i].responses[k].source].probability(p[None, :])[0]
    return [
        replace(
            record,
            h_tilde=h_tilde(probs[i], gammas[i], slot_betas(record, beta)),
            meta={**record.meta, PROBS_META_KEY: probs[i].tolist()},
        )
        for i, record in enumerate(records)
    ]
