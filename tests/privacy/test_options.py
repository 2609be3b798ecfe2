"""``--privacy.*``, ``--secure_aggregation.*``, ``--audit.*``: every bad value is one error naming its flag, before
any work starts."""

from __future__ import annotations

import pytest

from fedhb.cli import main
from fedhb.config import AuditArgs, PrivacyArgs, SecureAggregationArgs

BAD = [
    (lambda: PrivacyArgs(mode="central"), "--privacy.mode"),
    (lambda: PrivacyArgs(clip=0), "--privacy.clip"),
    (lambda: PrivacyArgs(noise_multiplier=-1), "--privacy.noise_multiplier"),
    (lambda: PrivacyArgs(target_epsilon=0), "--privacy.target_epsilon"),
    (lambda: PrivacyArgs(delta=1), "--privacy.delta"),
    (lambda: PrivacyArgs(target_quantile=1), "--privacy.target_quantile"),
    (lambda: PrivacyArgs(clip_lr=0), "--privacy.clip_lr"),
    (lambda: PrivacyArgs(accountant="moments"), "--privacy.accountant"),
    (lambda: PrivacyArgs(mode="client"), "--privacy.noise_multiplier must be set (or --privacy.target_epsilon)"),
    (lambda: PrivacyArgs(mode="client", noise_multiplier=1, target_epsilon=2),
     "--privacy.target_epsilon must be unset"),
    (lambda: PrivacyArgs(mode="sample", noise_multiplier=1, adaptive_clip=True), "--privacy.adaptive_clip"),
    (lambda: SecureAggregationArgs(bits=1), "--secure_aggregation.bits"),
    (lambda: SecureAggregationArgs(clip_range=0), "--secure_aggregation.clip_range"),
    (lambda: SecureAggregationArgs(threshold=-1), "--secure_aggregation.threshold"),
    (lambda: SecureAggregationArgs(neighbors=3), "--secure_aggregation.neighbors"),
    (lambda: SecureAggregationArgs(max_weight=0), "--secure_aggregation.max_weight"),
    (lambda: SecureAggregationArgs(noise="local"), "--secure_aggregation.noise"),
    (lambda: AuditArgs(shadows=0), "--audit.shadows"),
    (lambda: AuditArgs(shadow_epochs=-1), "--audit.shadow_epochs"),
    (lambda: AuditArgs(max_samples=1), "--audit.max_samples"),
]


@pytest.mark.parametrize(("make", "flag"), BAD, ids=[f for _, f in BAD])
def test_every_option_is_checked_even_when_built_in_python(make, flag):
    with pytest.raises(ValueError, match=flag.replace("(", r"\(").replace(")", r"\)")):
        make()


CLI_BAD = [
    (["--privacy.mode", "client", "--privacy.clip", "-1", "--privacy.noise_multiplier", "1"], "--privacy.clip"),
    (["--privacy.mode", "client"], "--privacy.noise_multiplier"),
    (["--algorithm", "FedNova", "--privacy.mode", "client", "--privacy.noise_multiplier", "1"],
     "--privacy.mode client cannot wrap FedNova: FedNova rescales each update"),
    (["--algorithm", "EPFL", "--secure_aggregation.enabled", "true"], "--secure_aggregation.enabled cannot wrap EPFL"),
    (["--secure_aggregation.enabled", "true", "--secure_aggregation.threshold", "2"],
     "--secure_aggregation.threshold must be at most 1"),
    (["--secure_aggregation.noise", "distributed"], "--secure_aggregation.noise distributed needs"),
]


@pytest.mark.parametrize(("args", "message"), CLI_BAD, ids=[m for _, m in CLI_BAD])
def test_the_command_line_says_it_in_one_line_and_writes_nothing(args, message, organamnist_root, tmp_path, capsys):
    out = tmp_path / "run"

    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--data", "MedMNIST", "--data.root", organamnist_root, "--partition.num_clients", "4",
              "--federation.rounds", "1", "--fabric.accelerator", "cpu", "--out_dir", str(out), *args])

    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err, err[-2000:]
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3 and err.startswith("fedhb: "), err
    assert not out.exists() or not (out / "metrics.jsonl").exists()
