"""Continual learning: the reservoir, replay mixing, EWC/L2 penalties and the Fisher (pure or on
a one-weight model), GEM's metrics on a hand-made matrix, topic tasks, the promotion gate, the
config's refusals; naive fine-tuning against replay on a toy stream of four tasks with a tiny
random Llama; the production update (files, buffer, partial training) and the report."""

from __future__ import annotations

import json
import math

import pydantic
import pytest
import torch

from services.trainer import continual as cl
from services.trainer import loop
from shared.datasets import QAItem
from shared.schemas import Document, Hit
from tests.tiny import CITIES, bpe_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: a 64-wide model's ops are smaller than the cost of syncing threads,
    and on busy shared cores the toy stream ran ~15x slower with two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- a toy stream: made-up countries whose capitals must be remembered -------------------------
# Every question shares one passage naming every capital, so the passage says *that* a capital
# is there but not *which*: the model has to remember the country -> capital mapping, and a
# later task can overwrite it.
ATLAS = Hit(doc_id="atlas", title="Atlas", text="Capitals: " + ", ".join(CITIES[:8]) + ".",
            score=1.0)


def toy_stream(tasks: int = 4, per_task: int = 2) -> tuple[list[cl.Task], dict[str, list[Hit]]]:
    items = [QAItem(id=f"toy:{i}", question=f"What is the capital of Land{i}?",
                    answers=[CITIES[i]], doc_ids=["atlas"], answerable=True)
             for i in range(tasks * per_task)]
    stream = [cl.Task(f"T{t + 1}", (), items[t * per_task:(t + 1) * per_task],
                      items[t * per_task:(t + 1) * per_task]) for t in range(tasks)]
    return stream, {i.question: [ATLAS] for i in items}


def config(**overrides) -> cl.ContinualConfig:
    base = {"method": "naive", "lr": 3e-3, "batch_size": 2, "steps_per_task": 40,
            "replay_ratio": 0.5, "top_k": 1, "max_seq_len": 512, "max_answer_tokens": 8,
            "eval_max_new_tokens": 6, "device": "cpu"}
    return cl.ContinualConfig(**{**base, **overrides})


# --- the reservoir ----------------------------------------------------------------------------
def test_reservoir_keeps_a_uniform_sample_of_fixed_size():
    n, capacity, trials = 200, 20, 3000
    counts = [0] * n
    for seed in range(trials):
        reservoir = cl.Reservoir(capacity, seed=seed)
        reservoir.extend(range(n))
        assert len(reservoir) == capacity and reservoir.seen == n
        assert len(set(reservoir.items)) == capacity
        for item in reservoir.items:
            counts[item] += 1
    # Each item is held with probability capacity / n: a chi-square test against that, df 199
    # (mean 199, sd ~20; the 0.1% critical value is ~272).
    expected = trials * capacity / n
    chi2 = sum((c - expected) ** 2 / expected for c in counts)
    assert chi2 < 272, chi2
    # Early items are no likelier to stay than late ones (a FIFO or first-k buffer fails this).
    first, last = sum(counts[:n // 2]), sum(counts[n // 2:])
    assert abs(first - last) / (first + last) < 0.03
    # Fixed seed, same sample.
    again = cl.Reservoir(capacity, seed=7)
    again.extend(range(n))
    same = cl.Reservoir(capacity, seed=7)
    same.extend(range(n))
    assert again.items == same.items


def test_reservoir_survives_a_restart_through_its_jsonl_file(tmp_path):
    straight = cl.Reservoir(5, seed=3)
    straight.extend(range(40))
    first = cl.Reservoir(5, seed=3)
    first.extend(range(17))
    path = first.save(tmp_path / "replay.jsonl", encode=lambda x: {"n": x})
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"reservoir": {"capacity": 5, "seed": 3, "seen": 17}}
    assert len(lines) == 6
    resumed = cl.Reservoir.load(path, decode=lambda obj: obj["n"])
    resumed.extend(range(17, 40))
    assert resumed.items == straight.items and resumed.seen == 40
    path.write_text(lines[0] + "\nnot json\n")
    with pytest.raises(ValueError, match=r"replay.jsonl:2: not a reservoir item"):
        cl.Reservoir.load(path)
    path.write_text('{"capacity": 5}\n')
    with pytest.raises(ValueError, match=r"replay.jsonl:1: not a reservoir header"):
        cl.Reservoir.load(path)


def test_records_round_trip_through_json():
    record = cl.Record(QAItem(id="q", question="Q?", answers=["A"], doc_ids=["d"],
                              answerable=True), (ATLAS,))
    assert cl.Record.from_json(json.loads(json.dumps(record.to_json()))) == record


# --- replay mixing (the generic loop on a one-weight model) -----------------------------------
def test_replay_count_makes_the_ratio_asked():
    assert cl.replay_count(4, 0.5) == 4
    assert cl.replay_count(3, 0.25) == 1
    assert cl.replay_count(6, 0.25) == 2
    assert cl.replay_count(1, 0.1) == 1  # never silently zero
    assert cl.replay_count(8, 0.0) == 0
    with pytest.raises(ValueError, match="but is 1.0"):
        cl.replay_count(4, 1.0)


@pytest.mark.parametrize(("batch_size", "ratio"), [(2, 0.5), (3, 0.25), (4, 0.2)])
def test_replay_mixes_the_ratio_asked_into_every_batch(batch_size, ratio):
    model = torch.nn.Linear(1, 1)
    new = [float(i) for i in range(12)]
    memory = [-float(i) - 1 for i in range(30)]
    seen: list[list[float]] = []

    def loss_fn(m, batch):
        seen.append(list(batch))
        x = torch.tensor(batch).unsqueeze(1)
        return m(x).pow(2).mean()

    cfg = cl.ContinualConfig(method="replay", replay_ratio=ratio, batch_size=batch_size,
                             epochs=2, device="cpu")
    history = cl.train_task(cfg, model, new, memory, loss_fn, task=1)
    assert len(history) == len(seen) == math.ceil(12 / batch_size) * 2
    for batch, record in zip(seen, history, strict=True):
        fresh = [x for x in batch if x >= 0]
        replayed = [x for x in batch if x < 0]
        assert len(fresh) == batch_size and record["replayed"] == len(replayed)
        assert len(replayed) / len(batch) == pytest.approx(ratio)
        assert len(set(replayed)) == len(replayed)  # drawn without replacement
    # Every new example is trained on once per epoch; naive adds nothing.
    assert sorted(x for b in seen for x in b if x >= 0) == sorted(new * 2)
    seen.clear()
    cl.train_task(config(method="naive", batch_size=batch_size, steps_per_task=3), model, new,
                  memory, loss_fn)
    assert all(x >= 0 for b in seen for x in b)
    # A memory smaller than the replay count is replayed whole.
    seen.clear()
    cl.train_task(cfg, model, new, memory[:1], loss_fn)
    assert all(sum(x < 0 for x in b) == 1 for b in seen)


# --- penalties and the Fisher -----------------------------------------------------------------
def test_ewc_penalty_is_zero_at_the_anchor_and_grows_with_distance_weighted_by_the_fisher():
    anchor = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([[0.5]])}
    fisher = {"a": torch.tensor([4.0, 0.0]), "b": torch.tensor([[1.0]])}
    at_anchor = {k: v.clone() for k, v in anchor.items()}
    assert float(cl.ewc_penalty(at_anchor, anchor, fisher, 10.0)) == 0.0

    def moved(name: str, index: tuple[int, ...], by: float) -> dict[str, torch.Tensor]:
        params = {k: v.clone() for k, v in anchor.items()}
        params[name][index] += by
        return params

    # strength/2 * F * d^2, by hand: 10/2 * 4 * 0.5^2 = 5
    assert float(cl.ewc_penalty(moved("a", (0,), 0.5), anchor, fisher, 10.0)) == pytest.approx(5)
    # quadratic in the distance
    assert float(cl.ewc_penalty(moved("a", (0,), 1.0), anchor, fisher, 10.0)) == pytest.approx(20)
    # weighted by the Fisher: the same move of a parameter with F = 0 costs nothing, F = 1 a
    # quarter of F = 4
    assert float(cl.ewc_penalty(moved("a", (1,), 1.0), anchor, fisher, 10.0)) == 0.0
    assert float(cl.ewc_penalty(moved("b", (0, 0), 1.0), anchor, fisher, 10.0)) == pytest.approx(5)
    # its gradient pulls back towards the anchor
    params = moved("a", (0,), 0.5)
    params["a"].requires_grad_(True)
    cl.ewc_penalty(params, anchor, fisher, 10.0).backward()
    assert params["a"].grad.tolist() == pytest.approx([20.0, 0.0])  # strength * F * d
    with pytest.raises(ValueError, match="needs importances"):
        cl.ewc_penalty(params, anchor, None, 1.0)


def test_l2_penalty_is_zero_at_the_anchor_and_grows_with_distance():
    anchor = {"a": torch.tensor([1.0, -2.0])}
    assert float(cl.l2_penalty({"a": anchor["a"].clone()}, anchor, None, 3.0)) == 0.0
    values = [float(cl.l2_penalty({"a": anchor["a"] + d}, anchor, None, 3.0))
              for d in (0.5, 1.0, 2.0)]
    assert values == pytest.approx([3 / 2 * 2 * d * d for d in (0.5, 1.0, 2.0)])
    # every parameter weighs the same: EWC with all importances 1
    ones = {"a": torch.ones(2)}
    moved = {"a": anchor["a"] + torch.tensor([0.3, -1.1])}
    assert float(cl.l2_penalty(moved, anchor, None, 2.0)) == pytest.approx(
        float(cl.ewc_penalty(moved, anchor, ones, 2.0)))


def test_penalties_anchor_at_the_weights_before_the_task():
    model = torch.nn.Linear(2, 1)

    def loss_fn(m, batch):
        return sum(m(torch.tensor(x)).pow(2).sum() for x in batch) / len(batch)

    memory = [[1.0, 0.0], [0.0, 2.0]]
    assert cl.make_penalty(config(method="naive"), model, loss_fn, memory) is None
    assert cl.make_penalty(config(method="ewc"), model, loss_fn, []) is None  # no data yet
    l2 = cl.make_penalty(config(method="l2", penalty_strength=2.0), model, loss_fn, [])
    assert l2 is not None and l2.importance is None and l2.strength == 2.0
    ewc = cl.make_penalty(config(method="ewc"), model, loss_fn, memory)
    assert set(ewc.importance) == set(ewc.anchor) == {"weight", "bias"}
    assert float(ewc(dict(model.named_parameters())).detach()) == 0.0
    assert torch.equal(ewc.anchor["weight"], model.weight.detach())


def test_diagonal_fisher_is_the_mean_squared_per_example_gradient_normalised():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -1.0]]))
    examples = [(torch.tensor([1.0, 0.0]), 1.0), (torch.tensor([2.0, 1.0]), 0.0),
                (torch.tensor([0.0, 3.0]), -1.0)]

    def loss_fn(m, batch):
        return sum((m(x) - y).pow(2).sum() for x, y in batch) / len(batch)

    # d/dw (w.x - y)^2 = 2 (w.x - y) x, squared and averaged by hand
    w = torch.tensor([0.5, -1.0])
    grads = [2 * (float(w @ x) - y) * x for x, y in examples]
    by_hand = torch.stack([g.pow(2) for g in grads]).mean(0)
    fisher = cl.diagonal_fisher(model, loss_fn, examples)
    assert fisher["weight"][0].tolist() == pytest.approx((by_hand / by_hand.mean()).tolist())
    assert float(fisher["weight"].mean()) == pytest.approx(1.0)
    assert model.weight.grad is None  # cleared
    with pytest.raises(ValueError, match="at least one example"):
        cl.diagonal_fisher(model, loss_fn, [])


# --- metrics ----------------------------------------------------------------------------------
def test_gem_metrics_match_hand_computation():
    r = [[0.8, 0.1, 0.2, 0.0],
         [0.6, 0.9, 0.3, 0.1],
         [0.5, 0.7, 0.7, 0.2],
         [0.4, 0.6, 0.5, 1.0]]
    b = [0.2, 0.1, 0.1, 0.1]
    m = cl.transfer_metrics(r, b)
    assert m.acc == pytest.approx((0.4 + 0.6 + 0.5 + 1.0) / 4)
    assert m.bwt == pytest.approx(((0.4 - 0.8) + (0.6 - 0.9) + (0.5 - 0.7)) / 3)  # -0.3
    assert m.fwt == pytest.approx(((0.1 - 0.1) + (0.3 - 0.1) + (0.2 - 0.1)) / 3)  # 0.1
    assert m.newest == 1.0
    assert cl.transfer_metrics([[0.5]], [0.1]) == cl.TransferMetrics(0.5, None, None, 0.5)
    with pytest.raises(ValueError, match=r"T x T"):
        cl.transfer_metrics([[0.1, 0.2]], [0.1])
    with pytest.raises(ValueError, match="3 accuracies for 4 tasks"):
        cl.transfer_metrics(r, b[:3])


# --- tasks ------------------------------------------------------------------------------------
def test_topic_tasks_group_questions_by_the_topic_of_their_gold_document():
    topics = ["Geography", "People", "Arts", "History", "Mathematics"]
    corpus = [Document(doc_id=f"d{i}", title=f"D{i}", text="x", topic=t)
              for i, t in enumerate(topics)]

    def item(n: int, doc: int | None) -> QAItem:
        return QAItem(id=f"q{n}", question=f"Q{n}?", answers=["a"],
                      doc_ids=[] if doc is None else [f"d{doc}"], answerable=doc is not None)

    splits = {"train": [item(0, 0), item(1, 1), item(2, 2), item(3, 3), item(4, 4),
                        item(5, None)],
              "test": [item(10, 0), item(11, 1), item(12, 4), item(13, 2)],
              "dev": [item(20, 3)]}
    groups = [("Geography",), ("People",), ("Mathematics",), (cl.OTHER_TOPICS,)]
    tasks = cl.topic_tasks(splits, corpus, groups)
    assert [t.name for t in tasks] == ["Geography", "People", "Mathematics", "other topics"]
    assert tasks[3].topics == ("Arts", "History")
    assert [[i.id for i in t.train] for t in tasks] == [["q0"], ["q1"], ["q4"], ["q2", "q3"]]
    assert [[i.id for i in t.test] for t in tasks] == [["q10"], ["q11"], ["q12"], ["q13"]]
    with pytest.raises(ValueError, match="at least 4 tasks, but 3"):
        cl.topic_tasks(splits, corpus, groups[:3])
    with pytest.raises(ValueError, match="unknown topic 'Sport'"):
        cl.topic_tasks(splits, corpus, [*groups[:3], ("Sport",)])
    with pytest.raises(ValueError, match="'History' has 1 train and 0 test"):
        cl.topic_tasks(splits, corpus, [*groups[:3], ("History",), ("Arts",)])


def test_a_batch_of_new_data_is_a_task_split_by_the_shared_seed():
    items = [QAItem(id=f"new:{i}", question=f"Q{i}?", answers=["a"], doc_ids=[],
                    answerable=True) for i in range(40)]
    task = cl.batch_task("batch 1", items, seed=13)
    assert sorted(i.id for i in task.train + task.test) == sorted(i.id for i in items)
    assert task.test and len(task.train) > len(task.test)
    assert cl.batch_task("batch 1", items, seed=13) == task
    with pytest.raises(ValueError, match="'empty' is empty"):
        cl.batch_task("empty", [])


# --- the gate ---------------------------------------------------------------------------------
def test_gate_blocks_a_bad_candidate_and_promotes_a_good_one_with_reasons():
    serving = {cl.REGRESSION: 0.80, cl.NEW_DATA: 0.40}
    promote, reason = cl.gate({cl.REGRESSION: 0.79, cl.NEW_DATA: 0.70}, serving, 0.02)
    assert promote and reason.startswith("promoted")
    assert "0.7900" in reason and "0.8000" in reason and "0.7000" in reason
    # forgot the regression set
    promote, reason = cl.gate({cl.REGRESSION: 0.70, cl.NEW_DATA: 0.90}, serving, 0.02)
    assert not promote
    assert "regression" in reason and "0.8000" in reason and "0.7000" in reason
    # learnt nothing (worse on the new data)
    promote, reason = cl.gate({cl.REGRESSION: 0.80, cl.NEW_DATA: 0.35}, serving, 0.02)
    assert not promote
    assert "new_data" in reason and "0.3500" in reason and "0.4000" in reason
    # exactly at the tolerance passes
    assert cl.gate({cl.REGRESSION: 0.78, cl.NEW_DATA: 0.40}, serving, 0.02)[0]
    with pytest.raises(ValueError, match="-0.1"):
        cl.gate(serving, serving, -0.1)
    with pytest.raises(ValueError, match="candidate metrics lack 'new_data'"):
        cl.gate({cl.REGRESSION: 0.8}, serving, 0.0)
    with pytest.raises(ValueError, match="serving 'regression' is nan"):
        cl.gate(serving, {cl.REGRESSION: math.nan, cl.NEW_DATA: 0.4}, 0.0)


# --- config -----------------------------------------------------------------------------------
def test_bad_config_values_are_refused_with_the_value_named():
    with pytest.raises(pydantic.ValidationError, match="unknown method 'sgd'; known: naive"):
        cl.ContinualConfig(method="sgd")
    with pytest.raises(pydantic.ValidationError, match="replay_ratio"):
        cl.ContinualConfig(replay_ratio=1.0)
    with pytest.raises(pydantic.ValidationError, match="`replay_ratio` has to be > 0"):
        cl.ContinualConfig(method="replay", replay_ratio=0.0)
    with pytest.raises(pydantic.ValidationError, match="`penalty_strength` has to be > 0"):
        cl.ContinualConfig(method="ewc", penalty_strength=0.0)
    with pytest.raises(pydantic.ValidationError, match="buffer_size"):
        cl.ContinualConfig(buffer_size=0)
    with pytest.raises(pydantic.ValidationError, match="Extra inputs are not permitted"):
        cl.ContinualConfig(replay=0.5)
    assert cl.ContinualConfig(method="naive", replay_ratio=0.0).replay_ratio == 0.0
    with pytest.raises(ValueError, match="capacity"):
        cl.Reservoir(0)


# --- the stream on a tiny model ---------------------------------------------------------------
def test_naive_fine_tuning_forgets_earlier_tasks_and_replay_does_not(tokenizer):
    tasks, passages = toy_stream()
    results = {}
    for method in ("naive", "replay"):
        results[method] = cl.run_stream(config(method=method), tiny_llama(tokenizer), tokenizer,
                                        tasks, passages)
    naive, replay = results["naive"].metrics, results["replay"].metrics
    # Each task is learnt when it is trained...
    assert all(results["replay"].matrix[i][i] == 1.0 for i in range(4))
    # ...naive fine-tuning then overwrites it, replay keeps it.
    assert naive.bwt <= -0.5
    assert replay.bwt >= -0.2 and replay.acc >= naive.acc + 0.5
    assert results["naive"].baseline == [0.0] * 4  # a random model knows none of it
    assert {h["replayed"] for h in results["naive"].history} == {0}
    assert {h["replayed"] for h in results["replay"].history if h["task"] > 0} == {2}


def test_continual_update_saves_the_candidate_and_the_buffer_and_keeps_the_callers(
        tokenizer, tmp_path):
    tasks, passages = toy_stream()
    model = tiny_llama(tokenizer)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    cfg = config(method="replay+ewc", buffer_size=3, steps_per_task=4, penalty_strength=5.0,
                 fisher_examples=2, train_last_layers=1)
    earlier = cl.Reservoir(3, seed=0)
    earlier.extend(cl.records(tasks[0].train, passages, 1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = cl.continual_update(cfg, model, tokenizer, tasks[1].train, earlier, passages,
                                 tmp_path / "run")
    assert result.model is model and result.steps == 4 and result.replayed == 4 * 2
    assert all(h["penalty"] >= 0 for h in result.history) and result.history[-1]["penalty"] > 0
    # only the last block (and the final norm) moved; the flags are as they were
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("model.layers.1.") or n == "model.norm.weight"
                           for n in changed)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    # the caller's reservoir is untouched; the new one holds 3 of the 4 records seen
    assert earlier.seen == 2 and len(earlier) == 2
    assert result.buffer.seen == 4 and len(result.buffer) == 3
    reloaded = cl.load_buffer(result.buffer_path, 3)
    assert [r.item.id for r in reloaded.items] == [r.item.id for r in result.buffer.items]
    meta = loop.read_meta(result.model_dir)
    assert meta["kind"] == "generator" and meta["trained_by"] == "continual"
    assert meta["method"] == "replay+ewc" and meta["buffer"] == {"held": 3, "seen": 4}
    assert json.loads((tmp_path / "run" / cl.UPDATE_JSON).read_text())["replayed"] == 8
    with pytest.raises(ValueError, match="capacity is 3, but buffer_size is 1000"):
        cl.continual_update(config(), model, tokenizer, tasks[1].train, earlier, passages,
                            tmp_path / "other")
    with pytest.raises(ValueError, match="capacity 3, but buffer_size is 5"):
        cl.load_buffer(result.buffer_path, 5)
    assert len(cl.load_buffer(tmp_path / "none.jsonl", 5)) == 0
    with pytest.raises(ValueError, match="`new_items` is empty"):
        cl.continual_update(cfg, model, tokenizer, [], earlier, passages, tmp_path / "x")


def test_train_last_layers_refuses_more_layers_than_the_model_has(tokenizer):
    model = tiny_llama(tokenizer)
    with pytest.raises(ValueError, match="`train_last_layers` is 3, but the model has 2"), \
            cl.only_last_layers(model, 3):
        pass
    assert all(p.requires_grad for p in model.parameters())


def test_the_report_writes_the_table_json_and_png(tmp_path):
    matrix = [[0.5, 0.0], [0.25, 1.0]]
    result = cl.StreamResult(method="naive", tasks=["A", "B"], test_items=[4, 4],
                             matrix=matrix, baseline=[0.0, 0.25],
                             metrics=cl.transfer_metrics(matrix, [0.0, 0.25]), history=[],
                             train_s=1.0, eval_s=2.0)
    table = cl.stream_table([result])
    assert "after T2" in table and "-0.250" in table  # BWT = 0.25 - 0.5
    json_path, text_path, png_path = cl.write_stream_report(tmp_path, [result], {"note": 1})
    assert json.loads(json_path.read_text())["results"][0]["metrics"]["bwt"] == -0.25
    assert text_path.read_text().strip() == table
    assert png_path.read_bytes()[:4] == b"\x89PNG"


def test_gate_metrics_score_both_sets_with_answer_contains(tokenizer):
    tasks, passages = toy_stream()
    model = tiny_llama(tokenizer)
    result = cl.run_stream(config(method="naive"), model, tokenizer, tasks[:2], passages)
    metrics = cl.gate_metrics(model, tokenizer, tasks[0].test, tasks[1].test, passages,
                              config())
    # the same answers as the stream's last evaluation: task 1 as regression set, task 2 new
    assert metrics == {cl.REGRESSION: result.matrix[-1][0], cl.NEW_DATA: result.matrix[-1][1]}
    assert metrics[cl.NEW_DATA] > metrics[cl.REGRESSION]  # the newest task is the one known
    with pytest.raises(ValueError, match="0 regression and 2 new-data"):
        cl.gate_metrics(model, tokenizer, [], tasks[1].test, passages, config())
