"""The rounds of ``dora-engine iterate`` (docs/design.md section 10), every step through the project's own
front doors, in this process:

* start: the training and held-out data (``data.synth`` or the user's files), the start policy (a tiny
  Llama or ``start.model``, SFT through ``Trainer``), its evaluation;
* round r of the chain of strategy s, from policy π (the start policy in round 1, else s's policy of round
  r − 1):

  1. generate ``generate.n`` responses per training prompt from π (``data.augment.augment_file``: sharded,
     resumable), source ``<name>-round<r>``;
  2. score them (``data.score.score_records``: the oracle or a reward model) and merge: the training data's
     responses, those of the ``score.previous_rounds`` earlier rounds of the chain, the round's own;
  3. calibrate (strategies that use h̃): golden-vs-source classifiers, cross-fitted
     (``calibration.pipeline.fit`` / ``score``), the report in the round's folder;
  4. align from π (``training.engine.Trainer``), the reference π (``align.reference: previous``) or the
     start policy (``start``), any loss × the chain's strategy;
  5. evaluate: one sampled response per held-out prompt (``eval.generate.generate_records``, the same
     sampling seeds for every policy), judged against the golden response (``eval.paired``), compared
     with round r − 1 and with the start policy (paired bootstrap over prompts).

Chains are separate because each generates from its own policy; round 1 generates from the start policy in
every chain, so its generation, data and calibration have the same inputs, hence the same content hash, and
are computed once. Steps run round by round, chains in ``strategies`` order within a round.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from dora_engine.atomic import atomic_write, give_default_modes, remove_stale_temporaries, temporary_dir
from dora_engine.errors import TrainingError, UserValueError
from dora_engine.generation import EXPORT_FOLDER, Sampling, derived_seed
from dora_engine.iterate.config import ORACLE, RESUMABLE_KEYS, REWARD_MODEL, SYNTH, TINY, IterateConfig
from dora_engine.iterate.report import Evaluation, write_results
from dora_engine.iterate.steps import Done, Step, content_digest, finished, record
from dora_engine.training.output_lock import LOCK_NAME
from dora_engine.training.signals import StopSignals

RUN_MANIFEST = "iterate.json"
START = "start"
TRAIN_FILE, EVAL_FILE = "train.jsonl", "eval.jsonl"
GENERATIONS, SCORES, COMPARE = "generations.jsonl", "scores.json", "compare.json"
CALIBRATED = "train.calibrated.jsonl"


class Stopped(Exception):
    """A stop signal arrived; the run stops between steps (an alignment after its current optimizer step)."""


@dataclass(frozen=True)
class Policy:
    """A model the run can generate from or train: its folder, content hash and name in tables."""

    path: Path
    digest: str
    name: str


# ---------------------------------------------------------------- the run's folder and its manifest


def _comparable(config: dict[str, Any], run_name: str) -> dict[str, Any]:
    """The config as a resume compares it: the name resolved, ``output_dir`` (the folder itself) and the keys
    that may change (``RESUMABLE_KEYS``) left out."""
    out = {k: v for k, v in config.items() if k not in (*RESUMABLE_KEYS, "output_dir")}
    out["name"] = run_name
    return out


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}.{key}" if prefix else key))
        return out
    return {prefix: value}


def open_run(cfg: IterateConfig, resume: bool) -> None:
    """Check the run's folder against ``cfg`` and record ``cfg`` in ``iterate.json``: a new folder (or an empty
    one) starts a run; a folder with a run continues it only with ``resume`` and the same config (the keys of
    ``RESUMABLE_KEYS`` may change); anything else is refused in one line naming what differs."""
    root = Path(cfg.output_dir)
    manifest = root / RUN_MANIFEST
    config = cfg.to_dict()
    if manifest.is_file():
        before = json.loads(manifest.read_text(encoding="utf-8"))
        if not resume:
            raise UserValueError(f"{root} holds an iterate run already; continue it with --resume auto, or set "
                                 "output_dir to a new folder")
        old = _flat(_comparable(before["config"], before["run_name"]))
        new = _flat(_comparable(config, cfg.run_name))
        changed = [f"{k} ({json.dumps(old.get(k))} then, {json.dumps(new.get(k))} now)"
                   for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if changed:
            raise UserValueError(f"the config differs from the one the run in {root} was started with: "
                                 f"{'; '.join(changed)}. Resume with the same config, or set output_dir to a new "
                                 "folder")
        record_run = {**before, "config": config}
    else:
        if root.is_dir() and any(p.name != LOCK_NAME for p in root.iterdir()):
            raise UserValueError(f"{root} is not empty and holds no iterate run ({RUN_MANIFEST}); set output_dir to "
                                 "a new or empty folder")
        record_run = {"run_name": cfg.run_name, "config": config, "steps": {}}
    _write_json(manifest, record_run)


def _write_json(path: Path, value: Any) -> None:
    with atomic_write(path) as handle:
        json.dump(value, handle, indent=1, ensure_ascii=False)
        handle.write("\n")


# ---------------------------------------------------------------- the runner


class Runner:
    """Runs the steps of one ``cfg``, each once: progress lines, manifests, the run's record of its steps."""

    def __init__(self, cfg: IterateConfig, stop: StopSignals, total_steps: int) -> None:
        self.cfg = cfg
        self.root = Path(cfg.output_dir)
        self.stop = stop
        self.total = total_steps
        self.number = 0
        self.tokenised = self.root / "cache" / "tokenised"
        self.ref_cache = self.root / "cache" / "ref_logps"
        self._rewards: dict[str, str] = {}

    def reward(self, spec: str) -> str:
        """What a reward spec stands for in a step's inputs: ``oracle``, or the reward model's content hash
        (computed once per run)."""
        if spec == ORACLE:
            return spec
        if spec not in self._rewards:
            self._rewards[spec] = content_digest(spec[len(REWARD_MODEL):])
        return self._rewards[spec]

    def say(self, message: str) -> None:
        print(f"[iterate {self.number:>{len(str(self.total))}}/{self.total}] {message}", flush=True)

    def step(self, label: str, name: str, inputs: dict[str, Any],
             run: Callable[[Path], tuple[list[str], dict[str, Any]]]) -> Done:
        """Step ``name`` (a folder under the run's) with ``inputs``: skipped when its manifest matches, else
        ``run(folder)`` makes its outputs and returns their names (relative to the folder) and a summary."""
        self.number += 1
        step = Step(self.root, name, inputs)
        done = finished(step)
        if done is not None:
            self.say(f"{label}: done already ({name}, same inputs){_summary(done.info)}")
            return done
        if self.stop.received is not None:
            raise Stopped(self.stop.received)
        self.say(f"{label} -> {name}")
        started = time.perf_counter()
        step.folder.mkdir(parents=True, exist_ok=True)
        for folder in (step.folder, *(p for p in step.folder.iterdir() if p.is_dir())):
            remove_stale_temporaries(folder)  # what writes of a killed attempt left
        outputs, info = run(step.folder)
        done = record(step, outputs, info)
        self._note(name, step.key)
        self.say(f"{label}: done in {time.perf_counter() - started:.1f} s{_summary(info)}")
        return done

    def _note(self, name: str, key: str) -> None:
        manifest = self.root / RUN_MANIFEST
        run = json.loads(manifest.read_text(encoding="utf-8"))
        run["steps"][name] = key
        _write_json(manifest, run)


def _summary(info: dict[str, Any]) -> str:
    text = info.get("summary")
    return f"; {text}" if text else ""


def score_model(spec: str) -> str:
    """``score.reward`` as ``data score`` names it: ``synth:oracle`` or the reward model's path."""
    from dora_engine.data.score import ORACLE as SCORE_ORACLE

    return SCORE_ORACLE if spec == ORACLE else spec[len(REWARD_MODEL):]


# ---------------------------------------------------------------- start: data, policy, evaluation


def start_data(runner: Runner) -> Done:
    """The training and held-out records in the run's folder (``synth`` or the user's files, read and
    checked against the schema; every held-out prompt needs a golden response)."""
    from dora_engine.data.schema import read_records, write_records
    from dora_engine.data.synth import synth_records
    from dora_engine.eval.winrate import golden_response

    d = runner.cfg.data
    synth = {k: v for k, v in asdict(d).items() if k.startswith("synth_")}
    inputs = {"step": "data", "target_source": d.target_source,
              "train": synth if d.train == SYNTH else content_digest(d.train),
              "eval": synth if d.eval == SYNTH else content_digest(d.eval)}

    def run(folder: Path) -> tuple[list[str], dict[str, Any]]:
        train = (synth_records(d.synth_prompts, k=d.synth_k, golden_fraction=d.synth_golden_fraction,
                               seed=d.synth_seed, split="train") if d.train == SYNTH else read_records(d.train))
        held_out = (synth_records(d.synth_eval_prompts, k=2, golden_per_prompt=1, seed=d.synth_seed + 20_000,
                                  split="eval") if d.eval == SYNTH else read_records(d.eval))
        for record_ in held_out:
            golden_response(record_, d.target_source)  # one line naming the record without one
        write_records(folder / TRAIN_FILE, train)
        write_records(folder / EVAL_FILE, held_out)
        return [TRAIN_FILE, EVAL_FILE], {"summary": f"{len(train)} training prompts, {len(held_out)} held-out"}

    return runner.step("start: data", f"{START}/data", inputs, run)


def start_policy(runner: Runner, data: Done) -> Policy:
    """The start policy: ``start.model`` (or a random tiny Llama), after ``start.sft_epochs`` of SFT."""
    s = runner.cfg.start
    base = None if s.model == TINY else content_digest(s.model)
    if base is not None and s.sft_epochs == 0:
        return Policy(Path(s.model), base, START)
    inputs = {"step": "start", "start": asdict(s) if s.model == TINY else {**asdict(s), "model": base},
              "seed": runner.cfg.seed, "data": data.digest, "tokens": _token_limits(runner.cfg)}

    def run(folder: Path) -> tuple[list[str], dict[str, Any]]:
        model = Path(s.model)
        if s.model == TINY:
            model = folder / "init"
            _write_tiny_llama(runner.cfg, model)
            if s.sft_epochs == 0:
                return ["init"], {}
        _train(runner, _sft_config(runner, model, folder / "sft", data), "SFT")
        return [f"sft/{EXPORT_FOLDER}"], {}

    done = runner.step("start: policy", f"{START}/policy", inputs, run)
    folder = runner.root / START / "policy"
    path = folder / "init" if s.model == TINY and s.sft_epochs == 0 else folder / "sft" / EXPORT_FOLDER
    return Policy(path, done.digest, START)


def _token_limits(cfg: IterateConfig) -> dict[str, int]:
    return {"prompt": cfg.data.max_prompt_tokens, "response": cfg.data.max_response_tokens}


def _write_tiny_llama(cfg: IterateConfig, destination: Path) -> None:
    """A random tiny Llama (seeded by ``seed``) with the synthetic data's tokenizer, written atomically."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dora_engine.data.synth import build_synth_tokenizer

    tokenizer = build_synth_tokenizer()
    s = cfg.start
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=s.hidden, intermediate_size=2 * s.hidden,
        num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.heads,
        max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True,
    ))
    if destination.exists():
        shutil.rmtree(destination)
    tmp = temporary_dir(destination)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    give_default_modes(tmp)
    tmp.rename(destination)


def _sft_config(runner: Runner, model: Path, output_dir: Path, data: Done) -> Any:
    from dora_engine.training.config import (
        CheckpointConfig,
        DataConfig,
        LoggingConfig,
        ModelConfig,
        TrainConfig,
        TrainingConfig,
    )

    cfg = runner.cfg
    s = cfg.start
    return TrainingConfig(
        stage="sft",
        model=ModelConfig(path=str(model)),
        data=DataConfig(train=[str(runner.root / START / "data" / TRAIN_FILE)], target_source=s.sft_source,
                        max_prompt_tokens=cfg.data.max_prompt_tokens, max_response_tokens=cfg.data.max_response_tokens,
                        cache_dir=str(runner.tokenised), ref_cache_dir=str(runner.ref_cache)),
        train=TrainConfig(micro_batch_prompts=s.sft_batch_rows, lr=s.sft_lr, schedule="cosine", warmup_steps=2,
                          epochs=s.sft_epochs, seed=cfg.seed, precision=cfg.align.precision, backend=cfg.align.backend),
        logging=LoggingConfig(tensorboard="off"),
        checkpoint=CheckpointConfig(every=cfg.align.checkpoint_every, resume="auto", export=True),
        output_dir=str(output_dir),
    )


def _train(runner: Runner, train_cfg: Any, what: str) -> None:
    """Train ``train_cfg`` as ``dora-engine train`` does, in this process (``Trainer``), to its export; a stop
    signal ends it after its current optimizer step, with a checkpoint that the next run resumes from."""
    from dora_engine.training.config import validate
    from dora_engine.training.engine import Trainer

    trainer = Trainer.from_config(validate(train_cfg), progress=False, stop=runner.stop)
    try:
        code = trainer.run()
        if trainer.stop_signal is not None:
            raise Stopped(trainer.stop_signal)
        if code != 0:
            raise TrainingError(f"the {what} run in {train_cfg.output_dir} ended with exit code {code}")
    finally:
        trainer.close()


# ---------------------------------------------------------------- evaluation


def evaluate(runner: Runner, name: str, label: str, policy: Policy, data: Done,
             baselines: tuple[Evaluation, ...] = ()) -> Evaluation:
    """Step 5: ``policy``'s responses to the held-out prompts, judged against their golden responses, and
    compared with each of ``baselines`` (paired by prompt)."""
    from dora_engine.data.schema import read_records
    from dora_engine.eval.generate import generate_records, write_generations
    from dora_engine.eval.judges import RewardJudge, make_reward_scorer
    from dora_engine.eval.paired import ModelScores, format_report, paired_report, score_against_golden
    from dora_engine.eval.winrate import pair_with_golden

    cfg = runner.cfg
    e = cfg.evaluate
    inputs = {"step": "evaluate", "policy": policy.digest, "data": data.digest,
              "evaluate": {**asdict(e), "reward": runner.reward(e.reward)}, "backend": cfg.generate.backend,
              "seed": cfg.seed, "target_source": cfg.data.target_source,
              "baselines": {b.name: b.digest for b in baselines}}

    def run(folder: Path) -> tuple[list[str], dict[str, Any]]:
        records = read_records(runner.root / START / "data" / EVAL_FILE)
        sampling = Sampling(temperature=e.temperature, top_k=e.top_k, top_p=e.top_p, max_new_tokens=e.max_new_tokens)
        generations = generate_records(records, str(policy.path), generator=policy.name,
                                       backend=cfg.generate.backend, sampling=sampling,
                                       seed=derived_seed(cfg.seed, "evaluate"), batch_size=e.batch_size)
        write_generations(folder / GENERATIONS, generations)
        judge = RewardJudge(make_reward_scorer(e.reward))
        scores = score_against_golden(policy.name, pair_with_golden(generations, records, cfg.data.target_source),
                                      judge)
        _write_json(folder / SCORES, {"name": policy.name, "judge": judge.name, "rewards": scores.rewards,
                                      "win_points": scores.win_points})
        outputs = [GENERATIONS, SCORES]
        reports = {b.name: paired_report(ModelScores(b.name, b.rewards, b.win_points), scores, n_boot=e.n_boot,
                                         seed=cfg.seed) for b in baselines}
        if reports:
            _write_json(folder / COMPARE, {base: report.to_dict() for base, report in reports.items()})
            with atomic_write(folder / "compare.md") as handle:
                handle.write("\n\n".join(format_report(r, judge.name) for r in reports.values()) + "\n")
            outputs += [COMPARE, "compare.md"]
        mean = sum(scores.rewards) / len(scores.rewards)
        win = sum(scores.win_points) / len(scores.win_points)
        changes = "".join(f", {r.reward['difference'].format()} vs {base}" for base, r in reports.items())
        return outputs, {"summary": f"mean reward {mean:.3f}{changes}; win rate {100 * win:.1f}%"}

    done = runner.step(label, name, inputs, run)
    saved = json.loads((runner.root / name / SCORES).read_text(encoding="utf-8"))
    return Evaluation(policy.name, saved["rewards"], saved["win_points"], done.digest)


# ---------------------------------------------------------------- one round of one chain


@dataclass(frozen=True)
class ChainState:
    """Where a chain stands: its current policy, its evaluation, and its rounds' data steps (round -> the
    step's folder name and manifest)."""

    strategy: str
    policy: Policy
    evaluation: Evaluation
    data: dict[int, tuple[str, Done]]


def lineage(strategy: str, round_: int) -> str:
    """Whose responses round ``round_`` of ``strategy``'s chain generates: the start policy's in round 1
    (every chain's), the chain's own afterwards. It names the folders of generation, data and calibration."""
    return START if round_ == 1 else strategy


def reference(cfg: IterateConfig, policy: Policy, start: Policy) -> Policy:
    """The reference model of a round that starts from ``policy``: itself (``align.reference: previous``) or
    the start policy (``start``)."""
    return policy if cfg.align.reference == "previous" else start


def kept_rounds(cfg: IterateConfig, round_: int) -> list[int]:
    """The earlier rounds whose generated responses round ``round_``'s data keeps (``score.previous_rounds``)."""
    return list(range(max(1, round_ - cfg.score.previous_rounds), round_))


def run_round(runner: Runner, round_: int, state: ChainState, start: Policy, start_eval: Evaluation,
              data: Done) -> ChainState:
    """Steps 1-5 of round ``round_`` for one chain; returns the chain's state after it."""
    from dora_engine.losses import get_strategy

    cfg = runner.cfg
    strategy, policy = state.strategy, state.policy
    who = lineage(strategy, round_)
    label = f"round {round_}/{cfg.rounds} · {strategy}"
    source = cfg.source(round_)
    generate_name, data_name = f"round{round_}/generate-{who}", f"round{round_}/data-{who}"
    generated = _generate(runner, round_, f"{label} · generate", generate_name, policy, data, source)
    kept = {r: state.data[r] for r in kept_rounds(cfg, round_)}
    merged = _merge(runner, f"{label} · score", data_name, (generate_name, generated), kept, source)
    train_data = (data_name, TRAIN_FILE, merged)
    if get_strategy(strategy).needs_h_tilde:
        calibrated = _calibrate(runner, f"{label} · calibrate", f"round{round_}/calibrate-{who}", (data_name, merged))
        train_data = (f"round{round_}/calibrate-{who}", CALIBRATED, calibrated)
    aligned = _align(runner, f"{label} · align", f"round{round_}/align-{strategy}", strategy, policy,
                     reference(cfg, policy, start), train_data)
    new_policy = Policy(runner.root / f"round{round_}" / f"align-{strategy}" / EXPORT_FOLDER, aligned.digest,
                        f"{strategy}-round{round_}")
    baselines = (state.evaluation,) if round_ == 1 else (state.evaluation, start_eval)
    evaluation = evaluate(runner, f"round{round_}/eval-{strategy}", f"{label} · evaluate", new_policy, data,
                          baselines)
    return ChainState(strategy, new_policy, evaluation, {**state.data, round_: (data_name, merged)})


def _generate(runner: Runner, round_: int, label: str, name: str, policy: Policy, data: Done, source: str) -> Done:
    """Step 1: ``generate.n`` responses per training prompt from ``policy``, as ``data augment`` adds them."""
    from dora_engine.data.augment import augment_file

    g = runner.cfg.generate
    seed = derived_seed(runner.cfg.seed, "generate", round_)
    inputs = {"step": "generate", "policy": policy.digest, "data": data.digest, "generate": asdict(g),
              "source": source, "seed": seed}

    def run(folder: Path) -> tuple[list[str], dict[str, Any]]:
        sampling = Sampling(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                            repetition_penalty=g.repetition_penalty, max_new_tokens=g.max_new_tokens)
        augment_file(runner.root / START / "data" / TRAIN_FILE, folder / GENERATIONS, str(policy.path), g.n,
                     backend=g.backend, sampling=sampling, batch_size=g.batch_size, source=source, seed=seed)
        return [GENERATIONS], {}

    return runner.step(label, name, inputs, run)


def _merge(runner: Runner, label: str, name: str, generated: tuple[str, Done], kept: dict[int, tuple[str, Done]],
           source: str) -> Done:
    """Step 2: the round's data: the training responses and the round's generations (``generated``: the
    generate step's folder and manifest), scored where they have no score yet (all of them with
    ``score.all_responses``), and the scored responses of the ``kept`` earlier rounds (round -> its data
    step's folder and manifest)."""
    from dora_engine.data.schema import read_records, write_records
    from dora_engine.data.score import score_records

    cfg = runner.cfg
    inputs = {"step": "score", "generated": generated[1].digest, "reward": runner.reward(cfg.score.reward),
              "all_responses": cfg.score.all_responses, "kept": {str(r): done.digest for r, (_, done) in kept.items()}}

    def run(folder: Path) -> tuple[list[str], dict[str, Any]]:
        records = score_records(read_records(runner.root / generated[0] / GENERATIONS),
                                score_model(cfg.score.reward), keep_existing=not cfg.score.all_responses)
        earlier = {r: {rec.id: rec for rec in read_records(runner.root / data_name / TRAIN_FILE)}
                   for r, (data_name, _) in kept.items()}
        merged = []
        for rec in records:
            own = [x for x in rec.responses if x.source == source]
            before = [x for r in kept for x in earlier[r][rec.id].responses if x.source == cfg.source(r)]
            base = [x for x in rec.responses if x.source != source]
            merged.append(replace(rec, responses=[*base, *before, *own]))
        write_records(folder / TRAIN_FILE, merged)
        return [TRAIN_FILE], {"summary": _mean_scores(merged)}

    return runner.step(label, name, inputs, run)


def _mean_scores(records: list[Any]) -> str:
    sums: dict[str, list[float]] = {}
    for rec in records:
        for x in rec.responses:
            sums.setdefault(x.source, []).append(x.score)
    return "mean score " + ", ".join(f"{s} {sum(v) / len(v):.3f}" for s, v in sorted(sums.items()))


def _calibrate(runner: Runner, label: str, name: str, data: tuple[str, Done]) -> Done:
    """Step 3: h̃ of the round's data (``data``: its step's folder and manifest) from golden-vs-source
    classifiers, cross-fitted, with the calibration report."""
    from dora_engine.calibration.classifier import ClassifierSettings
    from dora_engine.calibration.pipeline import fit, score
    from dora_engine.calibration.report import write_report
    from dora_engine.data.schema import read_records, write_records
    from dora_engine.data.summary import mean_h_tilde_by_target

    cfg = runner.cfg
    c = cfg.calibrate
    inputs = {"step": "calibrate", "data": data[1].digest, "calibrate": asdict(c),
              "target_source": cfg.data.target_source, "seed": cfg.seed}

    def run(folder: Path) -> tuple[list[str], dict[str, Any]]:
        records = read_records(runner.root / data[0] / TRAIN_FILE)
        settings = ClassifierSettings(backbone=c.backbone, seed=cfg.seed, folds=c.folds)
        calibration = fit(records, target=cfg.data.target_source, output_dir=folder / "calibration", scheme=c.scheme,
                          settings=settings, min_examples=c.min_examples)
        scored = score(records, calibration, beta=c.beta, ratio_power=c.ratio_power)
        write_report(calibration, scored, folder / "calibration", beta=c.beta, ratio_power=c.ratio_power)
        write_records(folder / CALIBRATED, scored)
        means = mean_h_tilde_by_target(scored, cfg.data.target_source)
        (with_m, with_n), (without_m, without_n) = means["with_target"], means["without_target"]
        return [CALIBRATED, "calibration/report.json", "calibration/report.md"], {
            "summary": f"mean h̃ {with_m:.3f} with a golden response ({with_n}), {without_m:.3f} without ({without_n})"
        }

    return runner.step(label, name, inputs, run)


def align_config(runner: Runner, strategy: str, policy: Policy, ref: Policy, data_file: Path,
                 output_dir: Path) -> Any:
    """The ``TrainingConfig`` of step 4: ``policy`` aligned on ``data_file`` under ``strategy``, with ``ref``
    as the reference model (``model.reference`` unset when it is the policy itself), exported to
    ``output_dir/final``; an interrupted run resumes from its last checkpoint."""
    from dora_engine.training.config import (
        CheckpointConfig,
        DataConfig,
        LoggingConfig,
        LossConfig,
        ModelConfig,
        RobustConfig,
        TrainConfig,
        TrainingConfig,
    )

    cfg = runner.cfg
    a = cfg.align
    return TrainingConfig(
        stage="align",
        model=ModelConfig(path=str(policy.path), reference=None if ref == policy else str(ref.path)),
        data=DataConfig(train=[str(data_file)], target_source=cfg.data.target_source,
                        max_prompt_tokens=cfg.data.max_prompt_tokens, max_response_tokens=cfg.data.max_response_tokens,
                        cache_dir=str(runner.tokenised), ref_cache_dir=str(runner.ref_cache),
                        allow_empty_responses=True),  # a policy may answer with nothing: EOS alone
        loss=LossConfig(name=a.loss, params=dict(a.loss_params)),
        robust=RobustConfig(strategy=strategy, lam=a.lam, h_scale=a.h_scale),
        train=TrainConfig(micro_batch_prompts=a.micro_batch_prompts, lr=a.lr, schedule=a.schedule,
                          warmup_steps=a.warmup_steps, epochs=a.epochs, seed=cfg.seed, precision=a.precision,
                          backend=a.backend),
        logging=LoggingConfig(tensorboard="off"),
        checkpoint=CheckpointConfig(every=a.checkpoint_every, resume="auto", export=True),
        output_dir=str(output_dir),
    )


def _align(runner: Runner, label: str, name: str, strategy: str, policy: Policy, ref: Policy,
           train_data: tuple[str, str, Done]) -> Done:
    """Step 4: align ``policy`` on the round's data (``train_data``: the step folder, file and manifest that
    hold it) under ``strategy`` with ``ref`` as the reference."""
    cfg = runner.cfg
    folder_name, file_name, data = train_data
    inputs = {"step": "align", "policy": policy.digest, "reference": ref.digest, "data": data.digest,
              "align": asdict(cfg.align), "strategy": strategy, "seed": cfg.seed, "tokens": _token_limits(cfg)}

    def run(folder: Path) -> tuple[list[str], dict[str, Any]]:
        _train(runner, align_config(runner, strategy, policy, ref, runner.root / folder_name / file_name, folder),
               "alignment")
        return [EXPORT_FOLDER], {}

    return runner.step(label, name, inputs, run)


# ---------------------------------------------------------------- the whole run


def planned_steps(cfg: IterateConfig) -> int:
    """How many steps the run goes through (shared steps once per chain; each is done once)."""
    from dora_engine.losses import get_strategy

    start = 2 + int(cfg.start.model == TINY or cfg.start.sft_epochs > 0)
    per_round = sum(4 + int(get_strategy(s).needs_h_tilde) for s in cfg.strategies)
    return start + cfg.rounds * per_round


def run_iterate(cfg: IterateConfig, *, resume: bool, stop: StopSignals) -> dict[str, Any]:
    """Every step of ``cfg`` not done yet, then the final table (``dora_engine.iterate.report``); returns the
    results. Raises ``Stopped`` when a stop signal ends the run early."""
    import torch

    open_run(cfg, resume)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    runner = Runner(cfg, stop, planned_steps(cfg))
    data = start_data(runner)
    start = start_policy(runner, data)
    start_eval = evaluate(runner, f"{START}/eval", "start: evaluate", start, data)
    chains = [ChainState(s, start, start_eval, {}) for s in cfg.strategies]
    history: dict[str, list[Evaluation]] = {s: [] for s in cfg.strategies}
    for round_ in range(1, cfg.rounds + 1):
        for i, state in enumerate(chains):
            chains[i] = run_round(runner, round_, state, start, start_eval, data)
            history[state.strategy].append(chains[i].evaluation)
    return write_results(cfg, start_eval, history)


def describe_stop(err: Stopped, cfg: IterateConfig) -> str:
    return (f"stopped on {err}; every finished step is kept in {cfg.output_dir}. Continue with "
            f"--resume auto")

