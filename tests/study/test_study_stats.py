"""The report's numbers on hand-made records: comparisons, draws, the scoreboard, findings, wall time."""

from __future__ import annotations

import math
from typing import Any

import pytest

from normzoo.study import stats
from normzoo.study.report import build_blocks, render_html, render_markdown


def rec(
    experiment: str, level: str, variant: str, acc: float, *, seed: int = 0, model: str = "mlp", **kw: Any
) -> dict[str, Any]:
    bs = kw.pop("batch_size", 64)
    history = kw.pop(
        "history", [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "val_acc": acc, "time_s": 0.1}]
    )
    return {
        "dataset": "digits", "experiment": experiment, "level": level, "model": model, "variant": variant,
        "seed": seed, "test_acc": acc, "best_val_acc": acc, "num_classes": 10, "epochs": len(history),
        "max_epochs": 40, "stop_reason": "early_stopping", "stopped_early": True, "recipe": {"batch_size": bs},
        "history": history, "epoch_time_s": kw.pop("epoch_time_s", 0.1), "params": {}, **kw,
    }  # fmt: skip


def cell(variant: str, accs: list[float]) -> stats.Cell:
    return stats.Cell(
        "d", "e", "l", "m", variant, tuple(rec("e", "l", variant, a, seed=i) for i, a in enumerate(accs))
    )


def test_compare_uses_the_margin_with_one_seed() -> None:
    assert (
        stats.compare(cell("batchnorm", [0.95]), cell("vanilla", [0.94])).outcome == "draw"
    )  # 1.0 pt: not more
    assert stats.compare(cell("batchnorm", [0.951]), cell("vanilla", [0.94])).outcome == "win"
    assert stats.compare(cell("batchnorm", [0.90]), cell("vanilla", [0.94])).outcome == "loss"
    assert (
        stats.compare(cell("batchnorm", [0.951]), cell("vanilla", [0.94]), draw_margin=0.02).outcome == "draw"
    )


def test_compare_uses_the_seed_spread() -> None:
    # means 0.95 vs 0.92 (3 points); sds 0.05 and 0.01 -> pooled spread sqrt((25 + 1) / 2) = 3.6 points: a draw
    c = stats.compare(cell("batchnorm", [0.90, 1.00]), cell("vanilla", [0.91, 0.93]))
    assert c.outcome == "draw"
    assert c.spread == pytest.approx((0.5 * (0.0707107**2 + 0.0141421**2)) ** 0.5, rel=1e-4)
    c = stats.compare(cell("batchnorm", [0.96, 0.97]), cell("vanilla", [0.91, 0.93]))
    assert c.outcome == "win"
    assert c.threshold == pytest.approx((0.5 * (0.0070711**2 + 0.0141421**2)) ** 0.5, rel=1e-4)


def test_scoreboard_counts_and_text() -> None:
    records = [
        rec("baseline", "baseline", "vanilla", 0.90), rec("baseline", "baseline", "batchnorm", 0.95),
        rec("lr", "lr=0.1", "vanilla", 0.10), rec("lr", "lr=0.1", "batchnorm", 0.93),
        rec("dropout", "p=0.5", "vanilla", 0.93), rec("dropout", "p=0.5", "batchnorm", 0.935),
        rec("init", "n", "vanilla", 0.93), rec("init", "n", "batchnorm", 0.80),
        rec("baseline", "baseline", "renorm", 0.90), rec("lr", "lr=0.1", "noisy", 0.5),
        rec("wd", "x", "batchnorm", 0.99),  # no vanilla to compare with: not scored
    ]  # fmt: skip
    board = stats.scoreboard(records)
    assert list(board) == ["batchnorm", "renorm", "noisy"]
    assert board["batchnorm"].text == "batchnorm 2 - vanilla 1 (1 draw)"
    assert board["renorm"].text == "renorm 0 - vanilla 0 (1 draw)"
    assert board["noisy"].text == "noisy 1 - vanilla 0 (0 draws)"
    assert stats.scoreboard(records, model="cnn") == {}


def _findings(records: list[dict[str, Any]]) -> dict[str, stats.Finding]:
    return {f.key: f for f in stats.findings(records)}


def test_rescue_claims() -> None:
    records = [
        rec("activation", "sigmoid", "vanilla", 0.10), rec("activation", "sigmoid", "batchnorm", 0.95),
        rec("init", "normal(1.0)", "vanilla", 0.90), rec("init", "normal(1.0)", "batchnorm", 0.95),
        rec("lr", "lr=0.1", "vanilla", 0.12), rec("lr", "lr=0.1", "batchnorm", 0.11),
    ]  # fmt: skip
    f = _findings(records)
    assert f["sigmoid"].verdict == "reproduced"
    assert f["init"].verdict == "partly reproduced"  # BN ahead, but vanilla was not stuck
    assert any("does not get stuck" in c for c in f["init"].caveats)
    assert f["lr"].verdict == "partly reproduced"  # vanilla stuck, but so is BN
    assert f["dropout"].verdict == "not run"
    assert "--factors dropout" in f["dropout"].evidence[0]


def test_ceiling_and_cap_caveats() -> None:
    records = [
        rec("baseline", "baseline", "vanilla", 0.98, stop_reason="max_epochs", best_epoch=40, epochs=40),
        rec("baseline", "baseline", "batchnorm", 0.985),
    ]
    f = _findings(records)["accuracy"]
    assert f.verdict == "not shown"
    text = " ".join(f.caveats)
    assert "too easy" in text
    assert "40-epoch cap" in text
    assert "one seed" in text


def test_capped_means_still_improving_at_the_cap() -> None:
    assert stats._capped(rec("e", "l", "vanilla", 0.9, stop_reason="max_epochs", best_epoch=35, epochs=40))
    assert not stats._capped(rec("e", "l", "vanilla", 0.9, stop_reason="max_epochs", best_epoch=6, epochs=40))
    assert stats._capped(rec("e", "l", "vanilla", 0.9, stop_reason="max_steps", best_epoch=19, epochs=19))
    assert not stats._capped(
        rec("e", "l", "vanilla", 0.9, stop_reason="early_stopping", best_epoch=9, epochs=29)
    )


def test_small_batch_and_optimizer_and_noisy() -> None:
    records = [
        rec("batch_size", "bs=4", "vanilla", 0.95, batch_size=4),
        rec("batch_size", "bs=4", "batchnorm", 0.90, batch_size=4),
        rec("batch_size", "bs=4", "renorm", 0.94, batch_size=4),
        rec("baseline", "baseline", "vanilla", 0.90), rec("baseline", "baseline", "batchnorm", 0.95),
        rec("baseline", "baseline", "noisy", 0.94), rec("optimizer", "adam", "vanilla", 0.948),
    ]  # fmt: skip
    f = _findings(records)
    assert f["small_batch"].verdict == "reproduced"
    assert f["optimizer"].verdict == "reproduced"
    assert f["noisy"].verdict == "reproduced"
    assert f["batch_size"].verdict == "reproduced"  # only 64 is in 32..1024 here


def test_activation_claim_and_largest_gain() -> None:
    records = [rec("baseline", "baseline", "vanilla", 0.90), rec("baseline", "baseline", "batchnorm", 0.95)]
    for act, (v, b) in {"sigmoid": (0.5, 0.95), "tanh": (0.9, 0.93)}.items():
        records += [rec("activation", act, "vanilla", v), rec("activation", act, "batchnorm", b)]
    f = _findings(records)["activations"]
    assert f.verdict == "reproduced"
    assert "largest gain is with sigmoid" in " ".join(f.evidence)


def test_overhead_table_and_walltime_claim() -> None:
    records = [
        rec("baseline", "baseline", "vanilla", 0.9, epoch_time_s=1.0),
        rec("baseline", "baseline", "batchnorm", 0.9, epoch_time_s=1.18),
        rec("batch_size", "bs=256", "vanilla", 0.9, epoch_time_s=0.5, batch_size=256),
        rec("batch_size", "bs=256", "batchnorm", 0.9, epoch_time_s=0.55, batch_size=256),
    ]
    rows = stats.overhead_table(records)
    assert [(r["batch_size"], round(r["overhead"]["batchnorm"], 3)) for r in rows] == [(64, 0.18), (256, 0.1)]
    assert _findings(records)["walltime"].verdict == "reproduced"  # median 14 %
    records.append(rec("batch_size", "bs=16", "vanilla", 0.9, epoch_time_s=2.0, batch_size=16))
    records.append(rec("batch_size", "bs=16", "batchnorm", 0.9, epoch_time_s=1.5, batch_size=16))
    f = _findings(records)["walltime"]
    assert f.verdict == "not shown"  # BN "faster" at 16: noise larger than the effect, said so
    assert "appears faster than vanilla at MLP batch 16" in " ".join(f.caveats)


def test_cpu_time_is_used_on_the_cpu() -> None:
    records = [
        rec(
            "baseline", "baseline", "vanilla", 0.9, epoch_time_s=9.0, epoch_cpu_time_s=1.0, accelerator="cpu"
        ),
        rec(
            "baseline",
            "baseline",
            "batchnorm",
            0.9,
            epoch_time_s=3.0,
            epoch_cpu_time_s=1.2,
            accelerator="cpu",
        ),
    ]
    assert stats.time_measure(records) == "cpu"
    assert stats.overhead_table(records)[0]["overhead"]["batchnorm"] == pytest.approx(0.2)
    assert stats.overhead_table(records, "wall")[0]["overhead"]["batchnorm"] == pytest.approx(-2 / 3)
    records[0]["accelerator"] = "gpu"
    assert stats.time_measure(records) == "wall"


def _flow(first: float, last: float) -> dict[str, Any]:
    layers = {"fc1": {"mean_abs": first, "max_abs": 1.0}, "head": {"mean_abs": last, "max_abs": 1.0}}
    return {"gradient_flow": [{"step": 0, "epoch": 0, "layers": layers}], "weight_norm": []}


def test_gradient_flow_claim() -> None:
    records = [
        rec("activation", "sigmoid", "vanilla", 0.1, diagnostics=_flow(1e-6, 1e-2)),
        rec("activation", "sigmoid", "batchnorm", 0.9, diagnostics=_flow(5e-3, 2e-2)),
    ]
    f = _findings(records)["gradient_flow"]
    assert f.verdict == "reproduced"
    assert "batchnorm 5.00e-03, vanilla 1.00e-06" in f.evidence[0]
    records[1]["diagnostics"] = _flow(1.5e-6, 2e-2)
    assert _findings(records)["gradient_flow"].verdict == "not reproduced"


def test_epochs_to_target() -> None:
    h = [{"epoch": i, "val_acc": a} for i, a in enumerate([0.5, 0.8, 0.9, 0.95], start=1)]
    assert stats.epochs_to_target({"history": h}, 0.85) == 3
    assert stats.epochs_to_target({"history": h}, 0.99) is None


def test_render_markdown_and_html() -> None:
    records = [rec("baseline", "baseline", "vanilla", 0.90), rec("baseline", "baseline", "batchnorm", 0.95)]
    blocks = build_blocks(
        {"study": {"preset": "x", "draw_margin": 0.01}, "runs": records}, None, figures=False
    )
    md = render_markdown(blocks)
    assert md.startswith("# normzoo study report")
    assert "**batchnorm 1 - vanilla 0 (0 draws)**" in md
    assert "| baseline | MLP | batchnorm | 95.0 | 90.0 | +5.0 | 1.0 | win |" in md
    page = render_html(blocks)
    assert page.startswith("<!DOCTYPE html>")
    assert "<strong>batchnorm 1 - vanilla 0 (0 draws)</strong>" in page
    assert "<td>win</td>" in page
    assert "<script" not in page


# --- the claims registry, Ioffe 2017's recovery, the why-BN measures --------------------------------------


def _by_key(found: list[stats.Finding]) -> dict[str, stats.Finding]:
    return {f.key: f for f in found}


def test_every_claim_is_one_registry_entry() -> None:
    found = stats.findings([rec("baseline", "baseline", "vanilla", 0.5)])
    assert [f.key for f in found] == list(stats.CLAIMS)
    for f in found:
        claim = stats.CLAIMS[f.key]
        assert f.claim == f"{claim.text} ({claim.source})"
        assert f.source
        assert claim.factors
        assert claim.needs
    assert "--factors non_iid" in _by_key(found)["non_iid"].evidence[0]
    assert {c.key for c in stats.claims_for("activation")} >= {"sigmoid", "activations", "gradient_flow"}


@pytest.mark.parametrize(
    ("rn_acc", "verdict", "share"), [(0.56, "reproduced", 73), (0.50, "partly reproduced", 33)]
)
def test_tiny_batches_recovery_share(rn_acc: float, verdict: str, share: float) -> None:
    # vanilla 0.60, BN 0.45 (15 points lost), renorm recovers 11 or 5 of them
    runs = [
        rec("batch_size", "bs=4", v, acc + 0.002 * s, seed=s, batch_size=4)
        for v, acc in (("vanilla", 0.60), ("batchnorm", 0.45), ("renorm", rn_acc))
        for s in (0, 1)
    ]
    f = _by_key(stats.findings(runs))["small_batch"]
    assert f.verdict == verdict
    assert f"{share:.0f} % of BN's loss recovered" in " ".join(f.evidence)
    assert f.effect is not None
    assert f.effect[2] == "points"
    assert f.effect[0] == pytest.approx(rn_acc - 0.45)


def _diag(ics: float, beta: float, growth: float, rms: float) -> dict[str, Any]:
    return {
        "ics": [{"step": 0, "layers": {"fc1": {"l2": 0.0}, "fc2": {"l2": ics}, "fc3": {"l2": 3 * ics}}}],
        "landscape": [{"step": 0, "beta": beta}, {"step": 9, "beta": 3 * beta}],
        "weight_norm": [
            {"step": 0, "layers": {"fc1": {"norm": 1.0}, "fc2": {"norm": 2.0}}},
            {"step": 9, "layers": {"fc1": {"norm": growth}, "fc2": {"norm": 2.0 * growth}}},
        ],
        "jacobian": [{"step": 0, "layers": {"block1": {"rms": rms}, "block2": {"rms": 1 / rms}}}],
    }


def test_why_bn_measures_decide_their_claims() -> None:
    runs = [
        rec("baseline", "baseline", "vanilla", 0.50, diagnostics=_diag(1.0, 40.0, 3.0, 4.0)),
        rec("baseline", "baseline", "batchnorm", 0.60, diagnostics=_diag(0.5, 10.0, 1.5, 1.5)),
        rec("baseline", "baseline", "noisy", 0.59, diagnostics=_diag(2.0, 12.0, 1.4, 1.6)),
    ]
    found = _by_key(stats.findings(runs))
    # ics: mean over layers after the first: noisy 4.0 vs batchnorm 1.0
    assert found["ics"].verdict == "reproduced"
    assert found["ics"].effect == (4.0, 0.0, "ratio")
    assert "noisy BN vs BN" in " ".join(found["ics"].evidence)
    # beta: mean over samples: batchnorm 20 vs vanilla 80
    assert found["landscape"].verdict == "reproduced"
    assert found["landscape"].effect == (0.25, 0.0, "ratio")
    # weight-norm growth: last / first, mean over layers: 1.5 vs 3.0
    assert found["weight_norm"].effect == (0.5, 0.0, "ratio")
    # |log rms|: log(1.5) vs log(4)
    assert found["jacobian"].verdict == "reproduced"
    assert found["jacobian"].effect[0] == pytest.approx(math.log(1.5) / math.log(4.0))  # type: ignore[index]
    runs[1]["diagnostics"] = _diag(0.5, 100.0, 6.0, 8.0)  # now BN is rougher, grows more, farther from 1
    found = _by_key(stats.findings(runs))
    assert [found[k].verdict for k in ("landscape", "weight_norm", "jacobian")] == ["not reproduced"] * 3
    runs[1]["diagnostics"] = _diag(0.5, 38.0, 3.0, 4.0)  # within 10 % of vanilla's (one seed): not shown
    found = _by_key(stats.findings(runs))
    assert [found[k].verdict for k in ("landscape", "weight_norm", "jacobian")] == ["not shown"] * 3


def test_renorm_acted_reads_the_activity_after_warmup() -> None:
    layer = {"r_at_bound": 0.25, "d_at_bound": 0.0, "mean_abs_r_minus_1": 0.3, "mean_abs_d": 0.2}
    schedule = {"total_steps": 100, "warmup_steps": 5, "d_max_steps": 25, "r_max_steps": 40}
    acted = {"schedule": schedule, "after_warmup": {"norm1": layer}}
    idle = {
        "schedule": schedule,
        "after_warmup": {"norm1": dict(layer, mean_abs_r_minus_1=0.0, mean_abs_d=0.0)},
    }
    f = _by_key(stats.findings([rec("baseline", "baseline", "renorm", 0.6, renorm=acted)]))["renorm_acted"]
    assert f.verdict == "reproduced"
    assert "norm1 r at a bound 25 %, d at a bound 0 %, mean |r-1| 0.30, mean |d| 0.20" in f.evidence[0]
    f = _by_key(stats.findings([rec("baseline", "baseline", "renorm", 0.6, renorm=idle)]))["renorm_acted"]
    assert f.verdict == "not reproduced"
