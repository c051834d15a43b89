"""``python -m tagi_ds.data``: the inspection tables, and errors as one line with exit status 2."""

import subprocess
import sys

from tagi_ds.data.__main__ import main


def test_builtin_summary(capsys, tmp_path):
    assert main(["--data", "builtin", "--max-rows", "3", "--write-sni", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "train: 76 tasks, 7600 instances" in out and "test: 29 tasks, 1450 instances" in out
    for needle in ("categories", "token lengths", "instruction (per task)", "concat prompt", "p90",
                   "task001_words_copy", "Arithmetic"):
        assert needle in out
    assert len(list((tmp_path / "out" / "tasks").glob("*.json"))) == 105


def test_sni_sample_and_corpus(capsys, sni_sample, tmp_path):
    assert main(["--data", f"sni:{sni_sample}", "--split", "test", "--set", "data.setting=def_pos"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps titles to the console width (80 off a TTY)
    assert "test: 12 tasks, 402 instances" in out and "setting def_pos" in out
    (tmp_path / "c.txt").write_text("one document\nanother document\n")
    assert main(["--data", f"text:{tmp_path / 'c.txt'}"]) == 0
    assert "2 documents" in capsys.readouterr().out


def test_errors_are_one_line_with_status_2():
    proc = subprocess.run([sys.executable, "-m", "tagi_ds.data", "--data", "s3://bucket/sni"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: data spec 's3://bucket/sni': unknown scheme 's3'; "
                                                "expected builtin | sni:DIR | p3:DIR | text:FILE_OR_DIR"]
