"""The memory / step-time planner: sanity of its predictions, its CLI, and its accuracy on the tiny recipes.

The accuracy check compares the planner's ``--stage none`` peak with ``measure_step``: one plain-torch training
step on this CPU, tracked tensor bytes (definition in tagi_ds/plan/measure.py's docstring).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tagi_ds import loss_terms, plan
from tagi_ds.config import ConfigError
from tagi_ds.plan import PlanInput
from tagi_ds.plan import cli as plan_cli
from tests.train.harness import HANG_S

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = {"model": "t5-xxl", "nodes": 4, "gpus_per_node": 8, "gpu_mem_gb": 80}


def cli(*args: str, timeout: int = HANG_S) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tagi_ds.plan", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def total(**kw) -> int:
    return plan.plan(PlanInput(**kw))["memory"]["total"]


@pytest.mark.parametrize("model", ["t5-xl", "llama-7b"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_memory_grows_with_the_micro_batch(model, checkpointing):
    totals = [total(model=model, micro_batch=b, gradient_checkpointing=checkpointing) for b in (1, 2, 4, 8, 16)]
    assert all(a < b for a, b in zip(totals, totals[1:])), totals


def test_checkpointing_saves_activation_memory():
    on = plan.plan(PlanInput(**CLUSTER, gradient_checkpointing=True))["memory"]
    off = plan.plan(PlanInput(**CLUSTER, gradient_checkpointing=False))["memory"]
    assert on["activations"] < off["activations"] / 5 and on["total"] < off["total"]


def test_zero3_partitions_the_frozen_backbone_and_zero2_does_not():
    z3 = plan.plan(PlanInput(**CLUSTER, stage="z3"))
    z2 = plan.plan(PlanInput(**CLUSTER, stage="z2"))
    n = z3["params"]["backbone"]
    assert z2["memory"]["backbone"] == n * 2  # bf16, whole on every GPU
    assert z3["memory"]["backbone"] < z2["memory"]["backbone"] / 16
    # The frozen teacher bank never sits on the GPU: whole in host memory (fp32) on every rank, either stage.
    assert "teacher_bank" not in z3["memory"] and "teacher_bank" not in z2["memory"]
    assert z3["host_memory"]["teacher_bank"] == z2["host_memory"]["teacher_bank"] == z3["params"]["teacher_bank"] * 4
    assert z3["memory"]["hypernet"] == z2["memory"]["hypernet"] == z3["params"]["generator"] * 2  # whole, both
    assert z3["memory"]["optimizer"] == z2["memory"]["optimizer"]  # partitioned either way


def test_more_gpus_shrink_zero3_shares_and_offload_moves_them_off_the_gpu():
    small = plan.plan(PlanInput(**{**CLUSTER, "nodes": 1}))["memory"]
    big = plan.plan(PlanInput(**CLUSTER))["memory"]
    assert big["backbone"] < small["backbone"] and big["optimizer"] < small["optimizer"]
    off = plan.plan(PlanInput(**CLUSTER, offload="param"))["memory"]
    assert off["backbone"] == off["optimizer"] == 0


def test_parameter_counts_come_from_the_recipe_shapes():
    p = plan.plan(PlanInput(model="llama-7b", teacher_rows=0))["params"]
    assert 6.7e9 < p["backbone"] < 6.8e9  # LLaMA-7B: 6.74B
    assert p["teacher_bank"] == 0
    t5 = plan.plan(PlanInput(model="t5-xxl"))["params"]
    assert 10.9e9 < t5["backbone"] < 11.1e9  # T5 v1.1 XXL with tied embeddings
    assert t5["sites"] == 24 * 2 * 3  # q, v in encoder, decoder and cross attention


def test_llama_13b_on_one_24gb_gpu_does_not_fit_and_the_suggestion_does(capsys):
    plan_cli.main(["--model", "llama-13b", "--nodes", "1", "--gpus_per_node", "1", "--gpu_mem_gb", "24"])
    out = capsys.readouterr().out
    assert "does not fit" in out and "smallest working configuration" in out
    result = plan.plan(PlanInput(model="llama-13b", nodes=1, gpus_per_node=1, gpu_mem_gb=24))
    assert not result["fits"] and result["max_micro_batch"] == 0
    for option in result["suggestions"]:  # every suggested configuration really fits
        p = PlanInput(model="llama-13b", nodes=1, gpus_per_node=1, gpu_mem_gb=24)
        flags = " ".join(option["flags"]).split()
        p = _apply(p, flags)
        assert plan.plan(p)["fits"], option


def _apply(p: PlanInput, flags: list[str]) -> PlanInput:
    changes = {}
    for key, value in zip(flags[::2], flags[1::2]):
        key = key.removeprefix("--")
        current = getattr(p, key)
        changes[key] = (
            (value == "on")
            if key == "gradient_checkpointing"
            else type(current)(value)
            if current is not None
            else int(value)
        )
    return dataclasses.replace(p, **changes)


def test_the_t5_xxl_cluster_plan_prints_tables_and_json(capsys):
    proc = cli("--model", "t5-xxl", "--nodes", "4", "--gpus_per_node", "8", "--gpu_mem_gb", "80")  # the entry point
    assert proc.returncode == 0, proc.stderr[-2000:]
    for text in ("memory per GPU", "zero3_gather", "step time estimate", "largest micro-batch", "host memory per rank"):
        assert text in proc.stdout
    plan_cli.main(["--model", "t5-xxl", "--nodes", "4", "--gpus_per_node", "8", "--gpu_mem_gb", "80", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["input"]["stage"] == "z3" and data["shapes"]["micro_batch"] == 8
    parts = ("backbone", "hypernet", "optimizer", "activations", "transient", "zero3_gather")
    assert all(data["memory"][k] > 0 for k in parts)
    t = data["time"]  # compute and communication overlap; the ZeRO-3 hooks run on the host, in series
    assert t["step_s"] == pytest.approx(max(t["compute_s"], t["comm_s"]) + t["zero3_host_s"])
    if not data["fits"]:
        assert data["suggestions"] and all(o["micro_batch"] >= 1 for o in data["suggestions"])


def test_step_time_follows_throughput_and_bandwidth():
    base = plan.plan(PlanInput(**CLUSTER))["time"]
    fast = plan.plan(PlanInput(**CLUSTER, tflops_per_gpu=2 * plan.H100_BF16_DENSE_TFLOPS * plan.ASSUMED_MFU))["time"]
    assert fast["compute_s"] == pytest.approx(base["compute_s"] / 2)
    pcie_s = base["pcie_bytes"] / (PlanInput().pcie_gbps * 1e9 / 8)  # the batch's teacher rows from host memory
    assert pcie_s > 0
    wide = plan.plan(PlanInput(**CLUSTER, interconnect_gbps=800))["time"]
    assert wide["comm_s"] - pcie_s == pytest.approx((base["comm_s"] - pcie_s) / 2)
    single = plan.plan(PlanInput(model="t5-xxl", nodes=1, gpus_per_node=1, gpu_mem_gb=80, stage="z2"))["time"]
    assert single["network_bytes"] == 0 and single["comm_s"] == pytest.approx(pcie_s)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--stage", "z4"], "invalid choice"),
        (["--offload", "param", "--stage", "z2"], "--offload param needs --stage z3"),
        (["--micro_batch", "0"], "--micro_batch must be > 0"),
        (["--model", "gpt-5"], "invalid choice"),
        (["--gradient_checkpointing", "maybe"], "expected on or off"),
        (["--stage", "none", "--nodes", "2"], "--stage none is one process"),
        (["--measure"], "--measure runs one plain-torch step"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_cli_errors_name_the_flag(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        plan_cli.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err[-2000:]


def test_library_errors_are_config_errors():
    with pytest.raises(ConfigError, match="--teacher_rows"):
        plan.plan(PlanInput(teacher_rows=-1))
    with pytest.raises(ConfigError, match="--model"):
        plan.plan(PlanInput(model="nope"))


@pytest.mark.parametrize(
    "model, checkpointing",
    [("tiny", False), ("tiny", True), ("tiny-llama", False), ("tiny-gemma2", False), ("tiny-qwen2", True)],
)
def test_tiny_peak_prediction_is_within_ten_percent_of_the_measured_step(model, checkpointing):
    p = PlanInput(model=model, nodes=1, gpus_per_node=1, stage="none", gradient_checkpointing=checkpointing)
    predicted = plan.plan(p)["memory"]
    measured = plan.measure_step(p, device="cpu")
    static = measured["parameters"] + measured["buffers"] + measured["optimizer"]
    assert predicted["backbone"] + predicted["hypernet"] + predicted["optimizer"] == pytest.approx(
        static, rel=0.01
    )  # the static parts are exact counts
    assert predicted["total"] == pytest.approx(measured["peak"], rel=0.10), (predicted, measured)


def test_measure_flag_prints_prediction_and_measurement(capsys):
    result = plan_cli.main(
        [
            "--model",
            "tiny",
            "--stage",
            "none",
            "--measure",
            "--seq_len",
            "32",
            "--instr_len",
            "32",
            "--target_len",
            "8",
            "--micro_batch",
            "4",
        ]
    )
    out = capsys.readouterr().out
    assert "measured peak" in out and "predicted" in out
    assert result["measured"]["peak"] > result["measured"]["baseline"] > 0


def test_step_flops_match_torch_flop_counter_on_tiny():
    """The FLOP formula of the planner and the train-step benchmark against torch's counter (CPU SDPA included):
    hardware FLOPs, since the counter also sees the chunked loss recomputing the LM head in backward."""
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import common

    from tagi_ds.model import build_backbone, build_model

    common.register_cpu_sdpa_flops()
    for model_name, mode, variant in (
        ("tiny", "tagi", "tagi"),
        ("tiny", "concat", "concat"),
        ("tiny-llama", "no_instruction", "lora"),
        ("tiny-gemma2", "tagi", "tagi"),
    ):
        p, cfg = plan.resolve(PlanInput(model=model_name, nodes=1, gpus_per_node=1, stage="none"))
        cfg.mode = mode
        s = plan.shapes_of(p)
        torch.manual_seed(0)
        model = build_model(cfg, "finetune", build_backbone(cfg), num_bank_rows=60, with_teacher=mode == "tagi")
        batch = plan.synthetic_batch(cfg.model.arch, s, cfg.model.vocab_size, mode=mode)
        with FlopCounterMode(display=False) as counter:
            loss, _ = model(batch)
            loss.backward()
        terms = loss_terms.active(cfg.loss, teacher=mode == "tagi")
        formula = plan.step_flops(plan.count(cfg, 60), s, variant, terms=terms)["hardware"]
        # torch counts the attention backward as 5 matmuls (it recomputes the scores), the formula as 4.
        assert formula == pytest.approx(counter.get_total_flops(), rel=0.06), (model_name, mode)


def test_a_frozen_backbone_that_fits_is_replicated_and_its_step_has_no_zero3_hooks(capsys):
    one_gpu = {
        "model": "t5-xl",
        "nodes": 1,
        "gpus_per_node": 1,
        "gpu_mem_gb": 139,
        "micro_batch": 4,
        "examples_per_task": 2,
    }
    result = plan.plan(PlanInput(**one_gpu))
    bb = result["backbone"]
    assert bb["placement"] == "replicated" and "fits whole" in bb["why"]
    rep, part = bb["options"]["replicated"], bb["options"]["partitioned"]
    assert rep["fits"] and part["fits"] and rep["zero3_host_s"] == 0 < part["zero3_host_s"]
    assert rep["step_s"] < part["step_s"] and result["time"]["step_s"] == rep["step_s"]
    assert result["memory"]["backbone"] == result["params"]["backbone"] * 2 and result["memory"]["zero3_gather"] == 0
    forced = plan.plan(PlanInput(**one_gpu, backbone="partitioned"))
    assert forced["backbone"]["placement"] == "partitioned" and forced["time"]["step_s"] == part["step_s"]
    assert forced["time"]["zero3_hooks"] == plan.zero3_hook_calls(plan.count(plan.resolve(PlanInput(**one_gpu))[1], 60))
    # Too big to replicate on 24 GB GPUs: partitioned, and the plan says why.
    small = plan.plan(PlanInput(model="llama-13b", nodes=1, gpus_per_node=8, gpu_mem_gb=24))["backbone"]
    assert small["placement"] == "partitioned" and "replicated would need" in small["why"]
    assert not small["options"]["replicated"]["fits"]
    with pytest.raises(ConfigError, match="--backbone replicated"):
        plan.plan(PlanInput(**one_gpu, backbone="replicated", offload="param"))
    plan_cli.main(["--model", "t5-xl", "--nodes", "1", "--gpus_per_node", "1", "--gpu_mem_gb", "139"])
    out = capsys.readouterr().out
    assert "frozen backbone: replicated" in out and "ZeRO-3 backbone placements" in out


def test_a_run_config_gets_the_placement_its_plan_gets():
    """The engine asks ``placement.for_run`` with the run's own config; the plan of the same shapes agrees."""
    from tagi_ds.recipes import get_recipe

    for mem, want in ((139, "replicated"), (16, "partitioned")):
        cfg = get_recipe("t5-xl")
        got = plan.for_run(
            cfg,
            {
                "stage3_param_persistence_threshold": 100_000,
                "stage3_prefetch_bucket_size": 5e7,
                "reduce_bucket_size": 5e7,
            },
            1,
            int(mem * plan.GiB),
            "bf16",
        )
        planned = plan.plan(PlanInput(model="t5-xl", nodes=1, gpus_per_node=1, gpu_mem_gb=mem))["backbone"]
        assert got["placement"] == planned["placement"] == want, (got, planned)


def test_a_run_with_a_teacher_model_counts_it_in_its_placement():
    """A t5-base student replicated on one 16 GiB GPU is partitioned once a t5-xl teacher model shares the GPU."""
    from tagi_ds.recipes import get_recipe

    zero = {
        "stage3_param_persistence_threshold": 100_000,
        "stage3_prefetch_bucket_size": 5e7,
        "reduce_bucket_size": 5e7,
    }
    alone = plan.for_run(get_recipe("t5-base"), zero, 1, int(16 * plan.GiB), "bf16")
    taught = plan.for_run(get_recipe("t5-base"), zero, 1, int(16 * plan.GiB), "bf16", teacher_cfg=get_recipe("t5-xl"))
    assert alone["placement"] == "replicated" and taught["placement"] == "partitioned", (alone, taught)


def test_a_teacher_model_is_planned_with_its_own_weights_and_forward():
    """--teacher_model: its partitioned weights are a memory term of their own, its forward on instruction + input
    replaces the teacher-LoRA forward on the backbone, and each step gathers its weights once."""
    base = PlanInput(model="t5-base", gpus_per_node=2, teacher_rows=60)
    without, with_ = plan.plan(base), plan.plan(dataclasses.replace(base, teacher_model="t5-xl"))
    n = with_["params"]["teacher_model"]
    assert 2.7e9 < n < 2.9e9 and without["params"]["teacher_model"] == 0 and without["memory"]["teacher_model"] == 0
    mem = with_["memory"]
    assert 0.5 * n * 2 <= mem["teacher_model"] <= 0.51 * n * 2  # bf16, half of it on each of 2 GPUs
    assert mem["total"] > without["memory"]["total"] + mem["teacher_model"]
    assert with_["time"]["network_bytes"] > without["time"]["network_bytes"] + 0.4 * n * 2  # gathered per step
    z2 = plan.plan(dataclasses.replace(base, teacher_model="t5-xl", stage="z2"))
    assert z2["memory"]["teacher_model"] == n * 2  # whole below ZeRO-3
    # No bank rows: the teacher model alone still gives the KL (its forward is planned).
    alone = plan.plan(dataclasses.replace(base, teacher_model="t5-xl", teacher_rows=0))
    assert alone["input"]["kl"] and alone["memory"]["teacher_model"] == mem["teacher_model"]
    with pytest.raises(ConfigError, match="--teacher_model 'gpt-5' is not a recipe"):
        plan.plan(dataclasses.replace(base, teacher_model="gpt-5"))


def test_teacher_model_step_flops_match_torch_flop_counter_on_tiny():
    """A tiny student distilled from a separate, larger teacher model (the mini recipe's T5): the formula against
    torch's counter, as for the teacher bank above."""
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import common

    from tagi_ds.model import build_backbone, build_model
    from tagi_ds.plan.shapes import with_teacher_model
    from tagi_ds.recipes import get_recipe

    common.register_cpu_sdpa_flops()
    p, cfg = plan.resolve(PlanInput(model="tiny", nodes=1, gpus_per_node=1, stage="none", teacher_model="mini"))
    s = plan.shapes_of(p)
    torch.manual_seed(0)
    model = build_model(cfg, "finetune", build_backbone(cfg), num_bank_rows=60, with_teacher=True)
    model.teacher_model = build_backbone(get_recipe("mini")).requires_grad_(False).eval()
    batch = plan.synthetic_batch(cfg.model.arch, s, cfg.model.vocab_size, mode="tagi")
    with FlopCounterMode(display=False) as counter:
        loss, _ = model(batch)
        loss.backward()
    c = with_teacher_model(plan.count(cfg, 60), "mini")
    terms = loss_terms.active(cfg.loss, teacher=True)
    flops = plan.step_flops(c, s, "tagi", terms=terms)
    assert (
        flops["teacher_forward"] > 2 * plan.step_flops(plan.count(cfg, 60), s, "tagi", terms=terms)["teacher_forward"]
    )
    assert flops["hardware"] == pytest.approx(counter.get_total_flops(), rel=0.06)
