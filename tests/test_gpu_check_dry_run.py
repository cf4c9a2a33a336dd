"""benchmarks/gpu_check.py's dry run (stages 1-3 at toy size, on CPU): every stage reports `ok` with
its figures in gpu_check.json, the attention back ends agree with fp32 eager, and t5forge's step
and transformers' give the same losses from the same weights and batches."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


def test_dry_run_stages_1_to_3_write_their_figures(tmp_path, monkeypatch):
    import gpu_check

    monkeypatch.delenv("OUT", raising=False)
    gpu_check.main(["--dry-run", "--no-compile", "--stages", "ceilings,attention,step", "--steps", "3",
                    "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [report[s]["status"] for s in gpu_check.STAGES] == ["ok", "ok", "ok", "skipped", "skipped"]
    assert report["ceilings"]["matmul_tflops"] > 0 and report["ceilings"]["copy_gbps_read_plus_write"] > 0
    for backend in ("eager", "sdpa", "flex"):
        assert report["attention"][backend]["ok"], backend
    assert report["attention"]["sdpa"]["table_grad_rel_err"] <= 1e-4
    step = report["step"]
    assert step["losses_agree"] and set(step["sides"]) == {"t5forge-sdpa", "transformers-eager"}
    for side in step["sides"].values():
        assert len(side["losses"]) == 3 and side["s_per_step"] > 0 and side["tokens_per_s"] > 0


def test_a_stage_that_fails_is_reported_and_the_next_one_still_runs(tmp_path, monkeypatch):
    import gpu_check

    def broken(*_):
        raise RuntimeError("planted")

    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.setattr(gpu_check, "stage_ceilings", broken)
    gpu_check.main(["--dry-run", "--stages", "ceilings,attention", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["ceilings"] == {"status": "failed", "error": "RuntimeError: planted",
                                  "seconds": report["ceilings"]["seconds"]}
    assert report["attention"]["status"] == "ok"
