"""The GPU check (`qspec_jax.bench.gpu_check`, run as `python -m experiments.gpu_check`) on a
CPU-only machine: the dry run, the JSON / markdown writers, the
schema check and the failure-recording path (a step that raises is written down, the check goes
on). The GPU steps themselves need a GPU and are exercised by `make gpu-check` where one is lent."""

from __future__ import annotations

import json
import os

import jax
import pytest

from qspec_jax.bench import gpu_check


@pytest.fixture(scope="module")
def gc():
    return gpu_check


def _read(out):
    with open(os.path.join(out, "gpu_check.json")) as f:
        return json.load(f)


def test_dry_run_records_gpu_steps_as_skipped(gc, tmp_path):
    rc = gc.main(["--dry", "--out", str(tmp_path), "--steps", "env,tests,kernels,e2e"])
    assert rc == 0
    data = _read(tmp_path)
    assert gc.validate(data) == [] and data["schema_problems"] == []
    assert data["gpu"] is False
    assert data["steps"]["env"]["status"] == "ok"
    assert data["steps"]["env"]["backend"] == "cpu"
    for s in ("tests", "kernels", "e2e"):
        assert data["steps"][s] == {"status": "skipped", "seconds": 0.0, "why": "--dry"}
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| kernels | skipped |" in md and "GPU present: False" in md


def test_lowering_step_exports_every_kernel_for_cuda(gc):
    out = gc.step_lowering(budget_s=300)
    assert out["status"] == "ok", out.get("error")
    assert out["passed"] == out["cases"] == len(gc._lowering_cases())


def test_failing_step_is_recorded_and_the_check_goes_on(gc, tmp_path):
    report = gc.Report(str(tmp_path))

    def broken(budget_s):
        raise RuntimeError("kernel exploded")

    gc.run_step(report, "kernels", broken, budget_s=5)
    gc.run_step(report, "e2e", lambda b: {"models": [], "status": "partial"}, budget_s=5)
    data = _read(tmp_path)
    k = data["steps"]["kernels"]
    assert k["status"] == "failed" and k["error"] == "RuntimeError: kernel exploded"
    assert any("kernel exploded" in line for line in k["traceback"])
    assert data["steps"]["e2e"]["status"] == "partial"
    assert gc.validate(data) == []
    assert "| kernels | failed |" in (tmp_path / "gpu_check.md").read_text()


def test_kernel_timing_errors_are_recorded_per_case(gc, monkeypatch):
    """On CPU the compiled Pallas kernels cannot run: each such case is an error row, the XLA
    rows are timed, and the step reports itself partial (not ok, not a crash)."""
    monkeypatch.setattr(gc, "MODEL_SHAPES", {"smollm2-135m": [(576, 576)]})

    def run_once(fn, *args, **kw):  # runs the case once (errors propagate), no timing on CPU
        jax.block_until_ready(fn(*args))
        return 1e-3

    monkeypatch.setattr(gc, "time_fn", run_once)
    out = gc.step_kernels(budget_s=120, ms=(1,), elementwise_ks=(576,), elementwise_ms=(1,))
    by_name = {r["kernel"]: r for r in out["matmuls"]}
    assert set(by_name) == {
        "w4a16 pallas",
        "w4a16 xla",
        "w4ax pallas",
        "w4ax xla",
        "dense bf16 (cuBLAS)",
    }
    assert by_name["w4a16 xla"]["us"] == pytest.approx(1000.0)
    # minimum bytes of a 576x576 int4 weight with group-64 bf16 scales, x and out in bf16
    assert by_name["w4a16 xla"]["gb_s"] == pytest.approx(
        (576 * 576 / 2 + 9 * 576 * 2 + 576 * 2 + 576 * 2) / 1e-3 / 1e9
    )
    for name in ("w4a16 pallas", "w4ax pallas"):  # compiled Pallas (Triton) needs a GPU
        assert "error" in by_name[name] and "us" not in by_name[name]
    for name in ("w4ax xla", "dense bf16 (cuBLAS)"):
        assert by_name[name]["us"] == pytest.approx(1000.0)
    assert {r["kernel"] for r in out["elementwise"] if "us" in r} == {
        "act_quant xla",
        "hadamard xla",
    }
    assert out["status"] == "partial" and out["error"] == "4 kernel timing(s) failed"


def test_validate_catches_malformed_reports(gc):
    assert gc.validate({}) != []
    bad = dict(
        schema_version=1,
        started_utc="x",
        gpu=False,
        steps={
            "kernels": {"status": "failed", "seconds": 1.0},
            "nope": {"status": "ok", "seconds": 0},
        },
    )
    problems = gc.validate(bad)
    assert any("records no error" in p for p in problems)
    assert any("unknown step 'nope'" in p for p in problems)


def test_markdown_renders_measured_rows(gc):
    data = dict(
        schema_version=1,
        started_utc="t",
        gpu=True,
        command="c",
        steps={
            "kernels": dict(
                status="ok",
                seconds=1.0,
                elementwise=[],
                matmuls=[
                    dict(
                        model="llama-2-7b",
                        m=1,
                        k=4096,
                        n=4096,
                        group=128,
                        kernel="w4a16 pallas",
                        us=10.0,
                        gb_s=850.0,
                        tops=3.4,
                        bw_frac=0.25,
                        compute_frac=0.0,
                    )
                ],
            ),
            "e2e": dict(
                status="ok",
                seconds=2.0,
                models=[
                    dict(
                        model="m",
                        load_s=1.0,
                        rows=[
                            dict(
                                batch=1,
                                w4a16_tps=100.0,
                                w4a4_tps=120.0,
                                qspec=[
                                    dict(
                                        gamma=3,
                                        tps=130.0,
                                        vs_w4a16=1.3,
                                        acceptance=0.9,
                                        tokens_per_step=3.4,
                                        same_tokens_as_w4a16=1,
                                        of=1,
                                        draft_over_verify=0.5,
                                        predicted_vs_w4a16=1.4,
                                        **{"predicted_at_acc_0.9": 1.5},
                                    )
                                ],
                            )
                        ],
                    )
                ],
            ),
        },
    )
    md = gc.markdown(data)
    assert "| llama-2-7b | 1 | 4096 | 4096 | w4a16 pallas | 10.0 | 850 | 0.25 | 3.4 |" in md
    assert "| 1 | qspec γ=3 | 130.0 | 1.30x | 0.90 | 3.40 | 1/1 | 0.50 | 1.40x | 1.50x |" in md


def test_bad_arguments_exit_2(gc, tmp_path, capsys):
    assert gc.main(["--steps", "env,warp", "--out", str(tmp_path)]) == 2
    assert "unknown step 'warp'" in capsys.readouterr().err
    assert not (tmp_path / "gpu_check.json").exists()
    assert gc.main(["--budget-s", "0", "--out", str(tmp_path)]) == 2
