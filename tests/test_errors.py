"""One way errors travel: HarnessError and user-fixable OS/database errors become one line at
the top of the CLI; anything else keeps its traceback; no password reaches a message."""
import errno

import pytest
from typer.testing import CliRunner

from harness import cli
from harness.errors import HarnessError, mask_secrets, user_message


@pytest.mark.parametrize("text, hidden", [
    ("cannot use registry URL 'postgresql://alice:S3cretPW@db:5432/reg': No module", "S3cretPW"),
    ("postgresql+pg8000://bob:p%40ss@127.0.0.1/x", "p%40ss"),
    ("host=db user=alice password=S3cretPW dbname=reg", "S3cretPW"),
])
def test_mask_secrets(text, hidden):
    masked = mask_secrets(text)
    assert hidden not in masked and "***" in masked


def test_mask_keeps_plain_text():
    assert mask_secrets("sqlite:///results/registry.db: no such table") == "sqlite:///results/registry.db: no such table"
    assert mask_secrets("postgresql://alice@db/reg") == "postgresql://alice@db/reg"


def test_user_message_classes():
    assert user_message(HarnessError("x")) == "x"
    full = OSError(errno.ENOSPC, "No space left on device", "/ck/last.pt")
    assert "disk is full" in user_message(full) and "/ck/last.pt" in user_message(full)
    assert "too long" in user_message(OSError(errno.ENAMETOOLONG, "File name too long", "a" * 300))
    assert user_message(KeyError("bug")) is None
    assert user_message(OSError(errno.EIO, "I/O")) is None  # not something a user fixes: keep the traceback


def test_cli_prints_one_line_for_user_errors_and_tracebacks_for_bugs(monkeypatch):
    runner = CliRunner()

    def raise_(e):
        def f(*a, **k):
            raise e
        return f

    monkeypatch.setattr(cli.data_mod, "load_cifar100", raise_(HarnessError("bad data: postgresql://u:pw@h/db")))
    r = runner.invoke(cli.app, ["data", "info"])
    assert r.exit_code == 1 and r.output.strip() == "error: bad data: postgresql://u:***@h/db"
    monkeypatch.setattr(cli.data_mod, "load_cifar100", raise_(OSError(errno.EACCES, "Permission denied", "data/x")))
    r = runner.invoke(cli.app, ["data", "info"])
    assert r.exit_code == 1 and "permission denied" in r.output and len(r.output.strip().splitlines()) == 1
    monkeypatch.setattr(cli.data_mod, "load_cifar100", raise_(ZeroDivisionError("a bug")))
    r = runner.invoke(cli.app, ["data", "info"])
    assert r.exit_code == 1 and isinstance(r.exception, ZeroDivisionError)  # not swallowed into a line
