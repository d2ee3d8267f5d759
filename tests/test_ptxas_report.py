"""benchmarks/ptxas_report.py on a recorded ``-Xptxas -v`` log (nvcc 13.0, sm_90, the row kernels before their
spills were removed): each entry keeps the spill figures ptxas prints for it, whatever its callees report."""

from __future__ import annotations

from pathlib import Path

from benchmark_script import load_benchmark

LOG = Path(__file__).resolve().parent / "fixtures" / "ptxas_sm90_row_kernels.log"


def load_report():
    return load_benchmark("ptxas_report")


def test_an_entry_keeps_its_spills_when_a_callee_block_follows() -> None:
    table = load_report().parse(LOG.read_text())
    # Each of these entries is followed by the 0-byte "Function properties" block of its callee load_values.
    assert table[("forward_rows<bf16>", "90")] == {"regs": 64, "stack": 56, "stores": 68, "loads": 76, "smem": 64}
    assert table[("forward_rows<fp64>", "90")] == {"regs": 64, "stack": 32, "stores": 176, "loads": 176,
                                                   "smem": 128}
    assert table[("backward_rows<fp64>", "90")] == {"regs": 64, "stack": 16, "stores": 32, "loads": 32, "smem": 0}
    assert table[("forward_rows<fp32>", "90")] == {"regs": 58, "stack": 0, "stores": 0, "loads": 0, "smem": 64}
    assert len(table) == 4, "only entry functions are rows"


def test_markdown_shows_the_spills() -> None:
    report = load_report()
    text = report.markdown(report.parse(LOG.read_text()))
    assert "| `forward_rows<bf16>` | – | 64 / 68+76 / 56 / 64 |" in text
