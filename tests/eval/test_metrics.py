"""SNI metrics against rouge-score (an independent implementation) on the real SNI sample."""

import json
import random
from pathlib import Path

import pytest

from tagi_ds.eval.metrics import (
    category_key,
    compute_metrics,
    exact_match,
    lcs_length,
    normalize_answer,
    rouge_l,
    rouge_l_fmeasure,
    tokenize,
)

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")

SNI_SAMPLE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "sni_sample"


def _load_instances():
    if not (SNI_SAMPLE / "tasks").is_dir():
        pytest.skip(f"SNI sample not found at {SNI_SAMPLE}")
    out = []
    for path in sorted((SNI_SAMPLE / "tasks").glob("*.json")):
        task = json.loads(path.read_text(encoding="utf-8"))
        for inst in task["Instances"]:
            out.append(
                {
                    "id": inst["id"],
                    "task": path.stem,
                    "category": task["Categories"][0],
                    "input": inst["input"],
                    "references": inst["output"],
                }
            )
    return out


@pytest.fixture(scope="module")
def instances():
    return _load_instances()


@pytest.fixture(scope="module")
def scorer():
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _reference_rouge(scorer, prediction, references):
    """What the official SNI script computes per instance: best rougeL F over the answers, x100."""
    return 100.0 * max(scorer.score(target=ref, prediction=prediction)["rougeL"].fmeasure for ref in references)


def _perturb(text: str, rng: random.Random) -> list[str]:
    words = text.split()
    shuffled = words[:]
    rng.shuffle(shuffled)
    return [
        text.upper() + "!!",
        "The " + text + ", indeed.",
        " ".join(words[: max(1, len(words) // 2)]),
        " ".join(shuffled),
        text.replace(" ", "-"),
        text + " running runs ran généralement naïve café",
        "",
    ]


def test_rouge_l_matches_rouge_score_on_sni_sample(instances, scorer):
    assert len(instances) > 1000  # the whole sample: 36 tasks, 1275 instances
    rng = random.Random(0)
    n = len(instances)
    checked = 0
    for i, inst in enumerate(instances):
        refs = inst["references"]
        other = instances[(i + 1) % n]["references"][0]  # usually the same task: partial overlap
        far = instances[(i + n // 2) % n]["references"][0]  # another task: mostly no overlap
        own = refs[-1]
        predictions = [own, other, far, inst["input"][:300]] + _perturb(own, rng)
        for pred in predictions:
            ours = rouge_l(pred, refs)
            theirs = _reference_rouge(scorer, pred, refs)
            assert ours == pytest.approx(theirs, abs=1e-6), (inst["id"], pred, refs)
            checked += 1
        # The instance's own answer is always a perfect ROUGE-L hit (when it has any token at all).
        if tokenize(own):
            assert rouge_l(own, refs) == pytest.approx(100.0)
    assert checked > 10000


def test_tokenize_matches_rouge_score_tokenizer(instances):
    from rouge_score.tokenizers import DefaultTokenizer

    theirs = DefaultTokenizer(use_stemmer=True)
    for inst in instances[::5]:
        for text in [inst["input"], *inst["references"]]:
            assert tokenize(text) == theirs.tokenize(text)


def test_rouge_l_hand_cases():
    # Stemming: "cats running" vs "cat runs" -> stems [cat, run] on both sides.
    assert rouge_l_fmeasure("cats running", "cat runs") == pytest.approx(1.0)
    # Tokens of <= 3 characters are not stemmed ("ran" stays "ran").
    assert rouge_l_fmeasure("ran", "run") == 0.0
    # LCS, not bag of words: "b a" vs "a b" share a subsequence of length 1 -> P = R = 1/2.
    assert rouge_l_fmeasure("b a", "a b") == pytest.approx(0.5)
    # Punctuation and case never matter; non-ASCII letters split words (rouge-score's [a-z0-9] rule).
    assert rouge_l_fmeasure("HELLO, World!", "hello world") == pytest.approx(1.0)
    assert tokenize("Yaoundé café") == ["yaound", "caf"]
    # Empty after tokenisation on either side -> 0, as rouge-score.
    assert rouge_l_fmeasure("", "anything") == 0.0
    assert rouge_l_fmeasure("?!", "?!") == 0.0
    # Best over references, x100.
    assert rouge_l("the answer is 4", ["5", "4"]) == pytest.approx(100 * 2 * 0.25 / 1.25)
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4


def test_exact_match_official_normalisation():
    assert normalize_answer("  The  Cat,\tsat! ") == "the cat sat"
    assert exact_match("The cat.", ["the cat"]) == 100.0
    assert exact_match("yes", ["No", "YES!"]) == 100.0
    # The official SNI script keeps articles (unlike SQuAD's): "cat" is not "the cat".
    assert exact_match("cat", ["the cat"]) == 0.0
    # Punctuation is removed, not replaced by a space.
    assert exact_match("don't", ["dont"]) == 100.0
    assert exact_match("1, 2, 3", ["1 2 3"]) == 100.0
    assert exact_match("", [""]) == 100.0
    with pytest.raises(ValueError, match="empty"):
        exact_match("x", [])
    with pytest.raises(ValueError, match="list"):
        rouge_l("x", "x")


def test_compute_metrics_averages_per_task_and_category():
    records = [
        # task a: 3 instances, rougeL 100, 200/3, 0; EM 100, 0, 0.
        {"id": "a1", "task": "a", "category": "Textual Entailment", "prediction": "yes", "references": ["Yes"]},
        # LCS("yes it is", "it is yes") = 2 of 3 tokens -> F = 2/3; not an exact match.
        {
            "id": "a2",
            "task": "a",
            "category": "Textual Entailment",
            "prediction": "yes it is",
            "references": ["no", "it is yes"],
        },
        {"id": "a3", "task": "a", "category": "Textual Entailment", "prediction": "no", "references": ["yes"]},
        # task b: 1 instance, rougeL 50 (P = 1, R = 1/3), EM 0.
        {"id": "b1", "task": "b", "category": "Title Generation", "prediction": "cat", "references": ["the black cat"]},
        # task c: same category as a.
        {"id": "c1", "task": "c", "category": "textual  entailment", "prediction": "x", "references": ["y"]},
    ]
    out = compute_metrics(records)
    assert out["num_examples"] == 5
    rouge_b = 100 * 2 * (1 * (1 / 3)) / (1 + 1 / 3)
    assert out["per_task"]["a"]["rougeL"] == pytest.approx((100 + 200 / 3 + 0) / 3)
    assert out["per_task"]["a"]["exact_match"] == pytest.approx(100 / 3)
    assert out["per_task"]["a"]["num_examples"] == 3
    assert out["per_task"]["b"]["rougeL"] == pytest.approx(rouge_b)
    # Overall = mean over instances (as the official script), not the mean of task means.
    assert out["rougeL"] == pytest.approx((100 + 200 / 3 + 0 + rouge_b + 0) / 5)
    assert out["exact_match"] == pytest.approx(100 / 5)
    assert set(out["per_category"]) == {"textual_entailment", "title_generation"}
    assert out["per_category"]["textual_entailment"]["num_examples"] == 4
    assert out["per_category"]["textual_entailment"]["rougeL"] == pytest.approx((100 + 200 / 3) / 4)
    assert category_key("Question  Rewriting") == "question_rewriting"


def test_compute_metrics_on_sni_sample_matches_rouge_score(instances, scorer):
    rng = random.Random(1)
    records = []
    for inst in instances:
        pred = rng.choice([inst["references"][0], instances[rng.randrange(len(instances))]["references"][0], ""])
        records.append({**inst, "prediction": pred})
    out = compute_metrics(records)
    by_task = {}
    for rec in records:
        by_task.setdefault(rec["task"], []).append(_reference_rouge(scorer, rec["prediction"], rec["references"]))
    for task, scores in by_task.items():
        assert out["per_task"][task]["rougeL"] == pytest.approx(sum(scores) / len(scores), abs=1e-6)
        assert out["per_task"][task]["num_examples"] == len(scores)
    all_scores = [s for scores in by_task.values() for s in scores]
    assert out["rougeL"] == pytest.approx(sum(all_scores) / len(all_scores), abs=1e-6)
    assert out["num_examples"] == len(instances)
    assert len(out["per_task"]) == 36
    assert sum(v["num_examples"] for v in out["per_category"].values()) == len(instances)
    json.dumps(out)  # results.json-ready


def test_compute_metrics_rejects_bad_records():
    ok = {"id": "1", "task": "t", "prediction": "a", "references": ["a"]}
    with pytest.raises(ValueError, match="duplicate id"):
        compute_metrics([ok, dict(ok)])
    with pytest.raises(ValueError, match="references"):
        compute_metrics([{**ok, "references": []}])
    with pytest.raises(ValueError, match="no 'task'"):
        compute_metrics([{k: v for k, v in ok.items() if k != "task"}])
    with pytest.raises(ValueError, match="category"):
        compute_metrics([{**ok, "category": "c"}, {**ok, "id": "2"}])
    with pytest.raises(ValueError, match="no prediction records"):
        compute_metrics([])
    assert compute_metrics([ok])["per_category"] == {}
