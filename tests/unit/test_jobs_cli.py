"""``xocsi jobs`` argument parsing (the commands themselves run in tests/integration/test_migration_ops.py)."""

from __future__ import annotations

import pytest

from services.xocsi import cli
from services.xocsi import jobs as cli_jobs


@pytest.mark.parametrize(
    "argv",
    [
        ["jobs", "list", "--json", "--redis-url", "redis://r:6379/0"],
        ["--json", "jobs", "list", "--redis-url", "redis://r:6379/0"],
    ],
)
def test_json_works_before_and_after_the_subcommand(argv: list[str]) -> None:
    args = cli.parse_args(argv)
    assert args.jobs_action is cli_jobs._list
    assert args.json is True
    assert args.redis_url == "redis://r:6379/0"
    assert args.timeout == cli.DEFAULT_TIMEOUT_S


def test_jobs_alone_lists_the_jobs_in_flight() -> None:
    args = cli.parse_args(["jobs"])
    assert args.jobs_action is cli_jobs._list
    assert (args.all, args.redis_url, args.redis_key_prefix, args.json) == (False, None, None, False)


def test_requeue_takes_a_job_id_and_both_backends() -> None:
    args = cli.parse_args(["jobs", "requeue", "job-1", "--amqp-url", "amqp://x", "--redis-key-prefix", "p:",
                           "--timeout", "3"])
    assert (args.job_id, args.amqp_url, args.redis_key_prefix, args.timeout) == ("job-1", "amqp://x", "p:", 3.0)
    assert args.jobs_action is cli_jobs._requeue


def test_dead_has_no_redis_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["jobs", "dead", "--redis-url", "redis://r"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --redis-url" in capsys.readouterr().err


def test_the_grpc_commands_are_unchanged() -> None:
    args = cli.parse_args(["--endpoint", "unix:///tmp/csi.sock", "probe"])
    assert not hasattr(args, "jobs_action") and len(args.requests) == 1
