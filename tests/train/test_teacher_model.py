"""--teacher_model on 2 ZeRO-3 gloo ranks: a separate frozen teacher model (partitioned like the backbone) gives the
KL target while the teacher LoRA bank gives the alignment target, and a stopped run resumes bit-exactly."""

import pytest
import torch
from safetensors.torch import load_file

from tagi_ds.recipes import get_recipe
from tests.core.test_teacher_model import save_backbone
from tests.train.harness import TINY, check, launch, metrics, partitioned_z3

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def setup(once) -> dict:
    """Built once: the teacher model dir (another tiny T5 of the same shape and tokenizer: in the miniature a
    concat-finetuned, merged copy, scripts/merge_lora.py), the teachers stage (the bank: alignment target), the
    pretrained hypernetwork, and the straight 2-rank finetuning run the resumed one must repeat. Made ``once``
    per session, also across pytest-xdist workers (both tests read it)."""

    def make(tmp):
        ds = partitioned_z3(tmp)
        teacher = save_backbone(get_recipe("tiny"), tmp / "teacher_model", init_seed=7)
        bank, pre = tmp / "teachers", tmp / "pretrain"
        # Every stage on 2 ranks: the teachers (the bank) and hypernetwork pretraining, then finetuning from both.
        check(launch("train_teachers.py", 2, ["--deepspeed", ds, "--output_dir", str(bank), "--max_steps", "3", *TINY]))
        check(launch("pretrain.py", 2, ["--deepspeed", ds, "--output_dir", str(pre), "--max_steps", "2", *TINY]))
        # loss.param_align=delta: 3 teacher steps leave many rows at zero, which the relative term leaves out.
        common = ["--deepspeed", ds, "--teacher_model", str(teacher), "--teachers", str(bank / "teachers")]
        common += ["--init_hypernet", str(pre / "hypernet")]
        common += ["--max_steps", "4", "--save_steps", "2", *TINY, "train.grad_accum=1", "loss.param_align=delta"]
        straight = tmp / "straight"
        proc = check(launch("finetune.py", 2, ["--output_dir", str(straight), *common]))
        return {"common": common, "stdout": proc.stdout, "teacher": str(teacher)}

    tmp, made = once("teacher-model", make)
    return {**made, "tmp": tmp, "straight": tmp / "straight"}


def test_teacher_model_trains_the_student_under_zero3(setup):
    out = setup["stdout"]
    # Backbone and teacher model (263,168 parameters each) both partitioned, half on each rank.
    assert "ZeRO-3: 526,336 parameters partitioned across 2 rank(s), 263,168 held by each rank" in out
    assert f"teacher model: the frozen teacher model {setup['teacher']}, 263,168 frozen parameters, partitioned" in out
    assert "teacher bank" in out  # the bank stays, for the alignment target
    m = metrics(setup["straight"])
    assert [r["step"] for r in m] == [1, 2, 3, 4]
    assert all(r["kl"] > 0 and r["param"] > 0 for r in m)
    assert (setup["straight"] / "hypernet" / "generator.safetensors").is_file()
    # The checkpoint holds the hypernetwork and its optimizer, never the frozen teacher model's weights (as for
    # the backbone, DeepSpeed keeps only empty placeholders of its tied embeddings).
    states = sorted((setup["straight"] / "checkpoints" / "step-4").glob("*model_states.pt"))
    modules = [torch.load(f, weights_only=False)["module"] for f in states]
    assert len(modules) == 2 and all(v.numel() == 0 for m in modules for k, v in m.items() if "teacher_model" in k)


def test_teacher_model_run_resumes_bit_exactly(setup):
    split = setup["tmp"] / "split"
    first = check(launch("finetune.py", 2, ["--output_dir", str(split), *setup["common"], "train.stop_after=2"]))
    assert "train.stop_after=2: saved step 2" in first.stdout
    proc = check(
        launch("finetune.py", 2, ["--output_dir", str(split), "--resume_from_checkpoint", "latest", *setup["common"]])
    )
    assert "resumed at step 2" in proc.stdout
    a, b = metrics(setup["straight"]), metrics(split)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for key in ("loss", "ce", "kl", "param"):
            assert x[key] == y[key], (key, x, y)
    wa = load_file(str(setup["straight"] / "hypernet" / "generator.safetensors"))
    wb = load_file(str(split / "hypernet" / "generator.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
